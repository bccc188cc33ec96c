"""The site's side of a secure round (``privacy.mode=secagg``) on Flower's SecAgg+: a vote round,
or a secure DP-SGD round of ``-tt real`` / ``mix``.

Flower's ``secaggplus_mod`` runs the protocol's four stages; in its third it calls this
ClientApp's ``train`` handler with a legacy FitIns (the vote or DP-SGD request) and masks the
FitRes arrays it gets back (the noised integer votes or gradient sum) before anything leaves. :func:`make_secagg_mod`
installs it for SecAgg+ messages only, and keeps its exceptions (which Flower would otherwise
send to the server as text) on the site: the server gets an error code, as for any refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key

from coautogen_fl import protocol as P
from coautogen_fl.secure_gradients import SecureGradientEncoding
from coautogen_fl.secure_votes import MODULUS, SecAggShape, SecureVoteEncoding

ClientAppCallable = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class SecAggSetup:
    """What the server's SecAgg+ setup stage told this site (kept in the mod's node state)."""

    sampled: int
    neighbours: int
    threshold: int
    clipping_range: float
    target_range: int
    mod_range: int
    max_weight: float

    @classmethod
    def from_context(cls, context: Context) -> "SecAggSetup":
        """The setup of the round under way, as ``secaggplus_mod`` stored it."""
        state = context.state.config_records.get(RECORD_KEY_STATE)
        if state is None or Key.THRESHOLD not in state:
            raise P.ReplyError("a secure request arrived before SecAgg+'s setup stage")
        return cls(
            int(state[Key.SAMPLE_NUMBER]),
            int(state[Key.SHARE_NUMBER]),
            int(state[Key.THRESHOLD]),
            float(state[Key.CLIPPING_RANGE]),
            int(state[Key.TARGET_RANGE]),
            int(state[Key.MOD_RANGE]),
            float(state[Key.MAX_WEIGHT]),
        )

    @property
    def sites_in_sum(self) -> int:
        """The fewest sites any sum this SecAgg+ round reveals can hold (from its own setup)."""
        return SecAggShape(self.sampled, self.neighbours, self.threshold).sites_in_sum

    def check(self, encoding: SecureVoteEncoding | SecureGradientEncoding) -> None:
        """Refuse a setup under which SecAgg+'s quantisation would not be the identity on this
        site's integers (votes or a gradient sum: they would be clipped or stochastically rounded)
        or the sum could wrap."""
        bound = encoding.bound
        if (self.clipping_range, self.target_range, self.mod_range, self.max_weight) != (
            float(bound),
            2 * bound,
            MODULUS,
            1.0,
        ):
            raise P.SiteRefusal(
                f"SecAgg+ setup (clipping range {self.clipping_range:g}, quantization range {self.target_range}, "
                f"modulus {self.mod_range}, max weight {self.max_weight:g}) does not carry this site's integers "
                "exactly; "
                f"it needs {bound}, {2 * bound}, {MODULUS} and 1"
            )


def is_secure_vote(msg: Message) -> bool:
    """Whether a TRAIN message belongs to SecAgg+ (its collect stage carries the request)."""
    return P.SECAGG_CONFIGS in msg.content.config_records


def secure_request(msg: Message) -> P.VoteRequest | P.TrainRequest:
    """The request a SecAgg+ round carries as a legacy FitIns: a vote request, or a DP-SGD
    request (``-tt real`` / ``mix``) when its config says so."""
    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise P.ReplyError(f"secure request is not a legacy FitIns: {exc!r}") from None
    arrays = parameters_to_ndarrays(fitins.parameters)
    if fitins.config.get(P.REQUEST_KIND) == P.TRAIN_DPSGD:
        return P.TrainRequest.from_legacy(arrays, fitins.config)
    return P.VoteRequest.from_legacy(arrays, fitins.config)


def _legacy_fitres(arrays: list, metrics: dict) -> RecordDict:
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def secure_vote_content(reply: P.VoteReply) -> RecordDict:
    """The legacy FitRes ``secaggplus_mod`` masks: integer votes, weight 1, public bookkeeping."""
    return _legacy_fitres(*reply.to_legacy())


def secure_gradient_content(reply: tuple[P.TrainReply, np.ndarray]) -> RecordDict:
    """The legacy FitRes of a secure DP-SGD round: the noised integer gradient sum, weight 1,
    public bookkeeping."""
    train_reply, integers = reply
    return _legacy_fitres(*train_reply.to_legacy(integers))


class _Declined(Exception):
    """The site answered SecAgg+'s collect stage with an error reply (a refusal)."""

    def __init__(self, reply: Message) -> None:
        super().__init__("declined")
        self.reply = reply


def make_secagg_mod(
    error_reply: Callable[[Message, BaseException], Message],
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A client mod running Flower's ``secaggplus_mod`` on SecAgg+ messages only (a local- or
    central-mode vote is a TRAIN message too). A refusal of the site passes through as its error
    reply; an exception of the protocol becomes ``error_reply(msg, exc)``, logged on the site."""

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_secure_vote(msg):
            return call_next(msg, context)

        def site(inner: Message, ctxt: Context) -> Message:
            reply = call_next(inner, ctxt)
            if reply.has_error():
                raise _Declined(reply)
            return reply

        try:
            return secaggplus_mod(msg, context, site)
        except _Declined as declined:
            return Message(declined.reply.error, reply_to=msg)
        except Exception as exc:  # noqa: BLE001  (its text stays in the site's log)
            return error_reply(msg, exc)

    return secagg_mod


def secure_vote_fields(configs: dict[str, Any]) -> str:
    """The SITE_REPLY_FIELDS kind of a SecAgg+ reply, from the keys of its SecAgg+ record."""
    keys = set(configs.get(P.SECAGG_CONFIGS, {}))
    for kind in ("secagg-setup", "secagg-share-keys", "secagg-collect", "secagg-unmask"):
        if keys and keys <= {f.key for f in P.SITE_REPLY_FIELDS[kind] if f.record == P.SECAGG_CONFIGS}:
            return kind
    return "train"
