"""The ClientApp of a site: answers TRAIN with differentially private votes and EVALUATE with
the downstream model's accuracy on the site's private test split.

Only noised votes (or, in central mode, clean votes to a trusted server) and aggregate
metrics leave the site: no images, no embeddings of private data, no per-sample scores.
"""

from __future__ import annotations

import traceback
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from coautogen_fl import protocol as P
from coautogen_fl.config import config_from_run_config
from coautogen_fl.data import DataError
from coautogen_fl.downstream import build_classifier, evaluate_classifier, load_numpy_state_dict
from coautogen_fl.privacy import BudgetExceededError, LedgerCorruptError, PrivacyError

from .site import Site

app = ClientApp()
_SITES: dict[tuple, Site] = {}  # one per (run, node) in this process: data embedded once


def get_site(context: Context) -> Site:
    """The cached site of this run and node (built on first use)."""
    key = (context.run_id, tuple(sorted((k, str(v)) for k, v in context.node_config.items())))
    if key not in _SITES:
        _SITES[key] = Site(config_from_run_config(context.run_config), context.node_config, context.run_id)
    return _SITES[key]


def error_reply(msg: Message, code: int, reason: str) -> Message:
    log(WARNING, "site reply error %d: %s", code, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Vote on the candidates in ``msg`` (see coautogen_fl.protocol for the contract)."""
    try:
        site = get_site(context)
        record = msg.content.array_records[P.CANDIDATES]
        embeddings = np.asarray(record[P.EMBEDDINGS].numpy())
        labels = np.asarray(record[P.LABELS].numpy()).astype(np.int64)
        request = dict(msg.content.config_records[P.CONFIG])
        request["run-id"] = str(context.run_id)
        result = site.vote(embeddings, labels, request)
    except BudgetExceededError as exc:
        return error_reply(msg, P.ERROR_BUDGET_EXCEEDED, str(exc))
    except DataError as exc:
        return error_reply(msg, P.ERROR_NO_DATA, str(exc))
    except LedgerCorruptError as exc:
        return error_reply(msg, P.ERROR_BUDGET_EXCEEDED, str(exc))  # cannot prove budget left: release nothing
    except (KeyError, ValueError, TypeError, PrivacyError) as exc:
        return error_reply(msg, P.ERROR_BAD_REQUEST, f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=3)}")
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: site.num_examples,
            P.EPSILON_SPENT: float(result.epsilon_spent),
            P.PARTITION_ID: site.partition_id,
            P.NOISE_MULTIPLIER: result.noise_multiplier,
        }
    )
    content = RecordDict({P.VOTES: ArrayRecord({P.VOTES: Array(result.votes.astype(np.float64))}), P.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the downstream model on this site's private test split.

    When the request carries an evaluation noise multiplier > 0, the correct count and the
    test count are released through the Gaussian mechanism (one test image moves both by 1:
    L2 sensitivity sqrt(2)) and the release is charged to the site's ledger first.
    """
    try:
        site = get_site(context)
        config = msg.content.config_records[P.CONFIG]
        model = build_classifier(str(config["model"]), int(config["num-classes"]), int(config["channels"]), int(config["image-size"]))
        arrays = msg.content.array_records[P.ARRAYS]
        load_numpy_state_dict(model, {name: arrays[name].numpy() for name in arrays})
        accuracy, count = evaluate_classifier(model, site.data.test.images, site.data.test.labels)
        sigma = float(config.get(P.EVALUATION_NOISE, 0.0))  # type: ignore[arg-type]
        values = site.release_counts(accuracy * count, count, sigma, int(config.get("round", 0)), str(context.run_id))  # type: ignore[arg-type]
    except BudgetExceededError as exc:
        return error_reply(msg, P.ERROR_BUDGET_EXCEEDED, str(exc))
    except DataError as exc:
        return error_reply(msg, P.ERROR_NO_DATA, str(exc))
    except (KeyError, ValueError, TypeError, RuntimeError, PrivacyError) as exc:
        return error_reply(msg, P.ERROR_BAD_REQUEST, f"{exc.__class__.__name__}: {exc}")
    metrics = {**values, P.PARTITION_ID: site.partition_id}
    if sigma == 0:
        metrics[P.ACCURACY] = float(accuracy)
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
