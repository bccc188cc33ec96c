"""The federated evaluation after the last round: the downstream model to every site, and the
count-weighted mean of the accuracies they release (noised and charged, or clear with consent)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from clients.wire import from_content, to_content
from coautogen_fl import protocol as P

if TYPE_CHECKING:
    from .strategy import CoAutoGenStrategy


def evaluation_requests(strategy: CoAutoGenStrategy, server_round: int, grid: Grid) -> list[Message]:
    """After the last round, the downstream model to every site (EVALUATE), else nothing."""
    if server_round != strategy.total_rounds or strategy.final.model_arrays is None:
        return []
    noised = strategy.cfg.privacy.evaluation == "noised"
    request = P.EvaluationRequest(
        round=server_round + 1 if noised else server_round,
        noise_multiplier=float(strategy.noise_multiplier) if noised else 0.0,
        weights={name: array.numpy() for name, array in strategy.final.model_arrays.items()},
        run_key=strategy.run_key,
        **strategy.final.model_spec(),
    )
    content = to_content(request.to_parts())
    nodes = sorted(grid.get_node_ids())
    strategy._outbox, strategy._sent_to = (
        [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes],
        {},
    )
    return strategy._outbox


def federated_accuracy(
    strategy: CoAutoGenStrategy, server_round: int, replies: Iterable[Message]
) -> MetricRecord | None:
    """Count-weighted mean of the sites' private test accuracies; sets ``federated_accuracy``.

    With ``privacy.evaluation=clear`` the sites' accuracies and counts are exact; with
    ``noised`` the sites send Gaussian-noised correct counts and test counts, and the
    ratio of their sums is the estimate (clipped to [0, 1]).
    """
    correct, count = 0.0, 0.0
    noised = strategy.cfg.privacy.evaluation == "noised"
    release = server_round + 1 if noised else server_round  # the round a site's ledger records
    for msg in replies:
        if msg.has_error():
            strategy._site_error(release, msg, what="evaluation: ")
            continue
        try:
            c, n = parse_evaluation(strategy, msg, noised)
        except (P.ReplyError, TypeError, ValueError, KeyError) as exc:
            strategy._drop(release, msg, f"evaluation: {exc}")
            continue
        strategy.sites[strategy.sender(msg)].evaluations_answered += 1
        correct += c
        count += n
    if count <= 0:
        return None
    strategy.federated_accuracy = min(max(correct / count, 0.0), 1.0)
    log(
        INFO,
        "federated evaluation: accuracy %.4f over %.0f private test images%s",
        strategy.federated_accuracy,
        count,
        " (noised)" if noised else "",
    )
    return MetricRecord({P.ACCURACY: strategy.federated_accuracy, P.NUM_EXAMPLES: float(count)})


def parse_evaluation(strategy: CoAutoGenStrategy, msg: Message, noised: bool) -> tuple[float, float]:
    """(correct, count) of one evaluation reply; raises ReplyError when unusable."""
    reply = P.EvaluationReply.from_parts(from_content(msg.content))
    site = strategy._site(msg, reply.partition_id, reply.site_label)  # names a site that refused every vote
    site.epsilon_spent = max(site.epsilon_spent, reply.epsilon_spent)
    site.epsilon_budget = reply.epsilon_budget
    c, n = reply.correct, reply.count
    if noised:
        bound = 10.0 * strategy.noise_multiplier * np.sqrt(2.0) + 1.0
        if not (np.isfinite(c) and np.isfinite(n) and n > -bound and -bound < c < n + bound):
            raise P.ReplyError(f"noised correct {c} / count {n} outside plausible bounds")
        return c, n
    if reply.accuracy is None or n < 0 or not 0.0 <= c <= n:
        raise P.ReplyError(f"clear evaluation reply with correct {c} of {n} (accuracy {reply.accuracy}) is invalid")
    return c, n
