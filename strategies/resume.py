"""Checkpoint and resume of a run on the server (see :mod:`coautogen_fl.checkpoint`).

:func:`checkpoint_of` captures a strategy after a finished round; :func:`restore` rebuilds a
freshly built strategy (same config) up to that point by replaying the finished rounds'
votes through the same evolution code, checking each replayed pool against the ids that were
voted on, so the next round asks the sites about exactly the pool the crashed run would have.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
from flwr.common import log

from coautogen_fl.checkpoint import Checkpoint, CheckpointError, TrainingRecord
from coautogen_fl.tracking import read_metrics

if TYPE_CHECKING:
    from .strategy import CoAutoGenStrategy


def checkpoint_of(strategy: "CoAutoGenStrategy") -> Checkpoint:
    """What the strategy cannot rebuild from its config, after its last finished round."""
    version, internal, gauss = strategy._node_rng.getstate()
    return Checkpoint(
        run_key=strategy.run_key,
        noise_multiplier=float(strategy.noise_multiplier),
        rounds=strategy.rounds,
        completed=list(strategy.history),
        sites=[asdict(site) for site in strategy.sites.values()],
        dropped=list(strategy.dropped),
        sampled={str(r): nodes for r, nodes in strategy.sampled.items()},
        planned_sites=strategy.planned_sites,
        node_rng_state=[version, list(internal), gauss],
        training=strategy.training.state() if strategy.training is not None else None,
    )


def restore(strategy: "CoAutoGenStrategy", checkpoint: Checkpoint) -> None:
    """Bring a freshly built ``strategy`` to the state after ``checkpoint``'s last round."""
    from .strategy import SiteRecord

    if (checkpoint.rounds, checkpoint.noise_multiplier) != (strategy.rounds, float(strategy.noise_multiplier)):
        raise CheckpointError(
            f"the checkpoint plans {checkpoint.rounds} rounds at noise multiplier {checkpoint.noise_multiplier:.6g}, "
            f"this config {strategy.rounds} at {strategy.noise_multiplier:.6g}: resume with the run's own config.yaml"
        )
    strategy.run_key = checkpoint.run_key
    logged = {line["round"] for line in read_metrics(strategy.final.store.run_dir)}
    if strategy.is_feedback and strategy.rounds:  # the crashed run drew round 1's pool (not Gen, not -tt real)
        strategy.evolution.start()
    feedback = strategy.cfg.feedback
    for record in checkpoint.completed:
        replayed = [c.candidate_id for c in strategy.evolution.pool]
        if replayed != record.candidate_ids:
            raise CheckpointError(
                f"replaying round {record.round} drew other candidates than the crashed run voted on "
                f"({sum(a != b for a, b in zip(replayed, record.candidate_ids))} of {len(replayed)} differ): the "
                "generator is not deterministic under its seed, so this run cannot be resumed without asking the "
                "sites about a different pool. Start a new run"
            )
        per_label = feedback.volume_per_label if record.round == strategy.rounds else feedback.candidates_per_label
        if record.class_errors is not None and strategy.evolution.active is not None:
            strategy.evolution.active.observe_errors(np.asarray(record.class_errors, dtype=np.float64))
        outcome = strategy.evolution.advance(
            record.round,
            np.asarray(record.votes, dtype=np.float64),
            record.noise_std,
            per_label,
            final=record.round == strategy.rounds,
        )
        # The crash may have come between the checkpoint and the round's files: write them again.
        strategy.final.store.write_round(record.round, outcome.voted)
        if record.round not in logged:
            strategy.final.log_round(record.round, record.metrics, outcome.voted)
    strategy.history = list(checkpoint.completed)
    strategy.sites = {int(s["node_id"]): SiteRecord(**s) for s in checkpoint.sites}
    strategy.dropped = list(checkpoint.dropped)
    strategy.sampled = {int(r): list(nodes) for r, nodes in checkpoint.sampled.items()}
    strategy.planned_sites = checkpoint.planned_sites
    version, internal, gauss = checkpoint.node_rng_state
    strategy._node_rng = random.Random()
    strategy._node_rng.setstate((version, tuple(internal), gauss))
    done = checkpoint.completed_rounds
    strategy.voting_done = done >= strategy.rounds
    strategy.round_offset = strategy.rounds - 1 if strategy.voting_done else done
    if checkpoint.training is not None:
        _restore_training(strategy, checkpoint.training)
        return
    log(INFO, "resumed run %s after round %d of %d (replayed and checked)", strategy.run_key, done, strategy.rounds)


def _restore_training(strategy: "CoAutoGenStrategy", record: TrainingRecord) -> None:
    """Past the vote rounds of a -tt real/mix run: keep the final dataset (mix), then continue the
    DP-SGD rounds after the last one finished."""
    if strategy.training is None:
        raise CheckpointError("the checkpoint holds DP-SGD rounds, but this run's config has none (-tt syn)")
    if strategy.cfg.feedback.task_type == "mix":  # its DP-SGD rounds take public steps on the dataset
        final = (
            strategy.evolution.pool
            if strategy.is_feedback
            else strategy.evolution.random_population(strategy.cfg.feedback.volume_per_label)
        )
        strategy.final.keep_dataset(final, strategy.rounds)
    strategy.voting_done = True
    strategy.round_offset = strategy.training.restore(strategy, record)
    replayed = " (the vote rounds replayed and checked)" if strategy.rounds else ""
    log(
        INFO,
        "resumed run %s after DP-SGD round %d of %d%s",
        strategy.run_key,
        record.done,
        strategy.training.rounds,
        replayed,
    )


def rounds_left(strategy: "CoAutoGenStrategy") -> int:
    """Flower rounds the resumed strategy still has to run (1 = only the final stage)."""
    return strategy.total_rounds - strategy.round_offset
