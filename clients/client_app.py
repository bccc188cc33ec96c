"""The ClientApp of a site: answers TRAIN with differentially private votes, ``train.dpsgd``
with the global model after DP-SGD steps on its private data (``-tt real`` / ``mix``), and
EVALUATE with the downstream model's accuracy on the site's private test split.

Only the fields declared in :data:`coautogen_fl.protocol.SITE_REPLY_FIELDS` leave the site.
An error reply carries a code and its generic line; the details (paths, sizes, tracebacks)
go to the site's own log only.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from functools import lru_cache
from logging import ERROR, WARNING
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from coautogen_fl import protocol as P
from coautogen_fl.config import RunConfig, config_from_run_config
from coautogen_fl.data import DataError
from coautogen_fl.downstream import build_classifier, evaluate_classifier, load_numpy_state_dict
from coautogen_fl.privacy import BudgetExceededError, LedgerCorruptError, PrivacyError
from coautogen_fl.privacy.release_store import ReleaseMismatchError
from coautogen_fl.privacy.site_key import SiteKeyError

from .secagg import (
    SecAggSetup,
    is_secure_vote,
    make_secagg_mod,
    secure_gradient_content,
    secure_request,
    secure_vote_content,
)
from .site import Site
from .terms import DataPathError, SiteTermsError
from .wire import from_content, to_content
from .wire_log import wire_log_mods

app = ClientApp(mods=[*wire_log_mods(), make_secagg_mod(lambda msg, exc: error_reply(msg, exc))])
_SITES: dict[tuple, Site] = {}  # one per (run, node) in this process: data embedded once
_START_FAILURES: dict[tuple, Exception] = {}  # why the site of the message being handled could not start

# Which error code each failure gets; anything else is a bad request.
_ERROR_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    ((BudgetExceededError, LedgerCorruptError), P.ERROR_BUDGET_EXCEEDED),  # cannot prove budget left: release nothing
    (SiteTermsError, P.ERROR_SITE_TERMS),
    ((P.SiteRefusal, ReleaseMismatchError), P.ERROR_NOT_ALLOWED),
    (DataPathError, P.ERROR_DATA_PATH),  # before DataError, its base
    ((DataError, SiteKeyError), P.ERROR_NO_DATA),
)
_HANDLED = (
    BudgetExceededError,
    LedgerCorruptError,
    SiteTermsError,
    P.SiteRefusal,
    ReleaseMismatchError,
    SiteKeyError,
    DataError,
    P.ReplyError,
    KeyError,
    ValueError,
    TypeError,
    RuntimeError,
    PrivacyError,
)


def _site_key(context: Context) -> tuple:
    return (context.run_id, tuple(sorted((k, str(v)) for k, v in context.node_config.items())))


@lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    """The validated config of a run config, parsed once per process: a simulation process
    serves many sites of one run, and omegaconf's validation is most of a site's start-up.
    Shared by those sites: nothing on the site side changes it."""
    return config_from_run_config(dict(items))


def get_site(context: Context) -> Site:
    """The cached site of this run and node (built on first use)."""
    key = _site_key(context)
    if key in _START_FAILURES:
        raise _START_FAILURES[key]  # it failed at start-up: the handler answers with its code
    if key not in _SITES:
        _SITES[key] = Site(_run_config(tuple(sorted(context.run_config.items()))), context.node_config, context.run_id)
    return _SITES[key]


@app.lifespan()
def start_site(context: Context) -> Iterator[None]:
    """Start-up, before a message is handled: build this node's site (node config, data folder,
    embeddings). A site that cannot start (e.g. its data-path is not set, not found or empty)
    fails here; the handler then answers with the error code, because an exception leaving the
    ClientApp would carry its text (paths and all) to the server."""
    key = _site_key(context)
    try:
        get_site(context)
    except Exception as exc:  # noqa: BLE001  (kept for the handler, which raises it again)
        _START_FAILURES[key] = exc
    try:
        yield
    finally:
        _START_FAILURES.pop(key, None)


def error_reply(msg: Message, exc: BaseException) -> Message:
    """An error reply with the code for ``exc`` and its generic line; details stay in this log."""
    code = next((c for kinds, c in _ERROR_CODES if isinstance(exc, kinds)), P.ERROR_BAD_REQUEST)
    if isinstance(exc, DataPathError):  # the operator's configuration: one line naming the key
        log(ERROR, "site cannot start (reply: error %d): %s", code, exc)
    else:
        log(
            WARNING, "site reply error %d: %s: %s\n%s", code, exc.__class__.__name__, exc, traceback.format_exc(limit=3)
        )
    return Message(Error(code=code, reason=P.ERROR_REASONS[code]), reply_to=msg)


def answer(msg: Message, handle: Callable[[], Any], content: Callable[[Any], RecordDict] | None = None) -> Message:
    """The reply to ``msg``: what ``handle`` returns (a typed record, as ``content`` makes it a
    RecordDict; default its parts), or the error reply for a refusal or a bad request it raises."""
    try:
        reply = handle()
    except _HANDLED as exc:
        return error_reply(msg, exc)
    return Message(content=content(reply) if content else to_content(reply.to_parts()), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Vote on the candidates in ``msg`` (see coautogen_fl.protocol for the contract); inside
    SecAgg+ (``privacy.mode=secagg``), with integer votes and a noise share the mod then masks,
    or (``-tt real`` / ``mix``) with an integer clipped gradient sum and a noise share."""
    if is_secure_vote(msg):

        def secure() -> P.VoteReply | tuple[P.TrainReply, Any]:
            request, setup = secure_request(msg), SecAggSetup.from_context(context)
            if isinstance(request, P.TrainRequest):  # -tt real/mix: a secure DP-SGD round
                return get_site(context).secure_gradient_step(request, setup, run_id=str(context.run_id))
            return get_site(context).secure_vote(request, setup, run_id=str(context.run_id))

        return answer(
            msg, secure, lambda r: secure_gradient_content(r) if isinstance(r, tuple) else secure_vote_content(r)
        )
    return answer(
        msg,
        lambda: get_site(context).vote(P.VoteRequest.from_parts(from_content(msg.content)), run_id=str(context.run_id)),
    )


@app.train("dpsgd")
def train_dpsgd(msg: Message, context: Context) -> Message:
    """Run the requested DP-SGD steps on the global model (``-tt real`` / ``mix``), charged first."""
    return answer(
        msg,
        lambda: get_site(context).train_dp(
            P.TrainRequest.from_parts(from_content(msg.content)), run_id=str(context.run_id)
        ),
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the downstream model on this site's private test split.

    The correct count and the test count are released through the Gaussian mechanism (one
    test image moves both by 1: L2 sensitivity sqrt 2), charged to the site's ledger first; a
    request with noise multiplier 0 gets them in the clear only if the site's terms allow it.
    """

    def release() -> P.EvaluationReply:
        request = P.EvaluationRequest.from_parts(from_content(msg.content))
        site = get_site(context)
        model = build_classifier(request.model, request.num_classes, request.channels, request.image_size)
        load_numpy_state_dict(model, request.weights)
        accuracy, count = evaluate_classifier(model, site.data.test.images, site.data.test.labels)
        return site.release_accuracy(int(round(accuracy * count)), count, request, str(context.run_id))

    return answer(msg, release)
