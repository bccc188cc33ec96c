"""The Message contract between the strategy and the sites, in plain Python (no flwr).

Both sides import these names, so a key is spelled once. ``strategies/`` and ``clients/``
translate between these values and Flower records.

TRAIN (server -> site): ArrayRecord ``candidates`` {``embeddings`` float16 (N, D), ``labels``
int64 (N,)} and ConfigRecord ``config`` {round, rater, k, noise-multiplier, privacy-mode,
privacy-unit, delta}. Reply: ArrayRecord ``votes`` {``votes`` float64 (N,)} and MetricRecord
``metrics`` {num-examples, epsilon-spent, partition-id, noise-multiplier}.

EVALUATE (server -> site): ArrayRecord ``arrays`` (the downstream model's state dict) and
ConfigRecord ``config`` {model, num-classes, channels, image-size, evaluation-noise-multiplier,
round}. Reply: MetricRecord ``metrics`` {correct, num-examples, partition-id, epsilon-spent} and,
when the evaluation noise multiplier is 0 (released in the clear), ``accuracy``; otherwise
``correct`` and ``num-examples`` carry Gaussian noise (sensitivity sqrt(2): one test image moves
both by 1) and are charged to the site's ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANDIDATES = "candidates"
EMBEDDINGS = "embeddings"
LABELS = "labels"
CONFIG = "config"
VOTES = "votes"
METRICS = "metrics"
ARRAYS = "arrays"
NUM_EXAMPLES = "num-examples"
EPSILON_SPENT = "epsilon-spent"
PARTITION_ID = "partition-id"
NOISE_MULTIPLIER = "noise-multiplier"
ACCURACY = "accuracy"
CORRECT = "correct"
EVALUATION_NOISE = "evaluation-noise-multiplier"

# Error codes of error replies a site sends instead of crashing.
ERROR_BUDGET_EXCEEDED = 1001
ERROR_BAD_REQUEST = 1002
ERROR_NO_DATA = 1003


class ReplyError(ValueError):
    """A site's reply is malformed; the strategy drops it and logs this reason."""


@dataclass
class VoteReply:
    """A validated vote reply."""

    votes: np.ndarray
    num_examples: int
    epsilon_spent: float
    partition_id: int


def validate_votes(
    votes: np.ndarray,
    num_candidates: int,
    num_examples: float,
    noise_std: float,
    k: int,
) -> None:
    """Check a vote vector before it is summed: shape, finite values, plausible size.

    Clean votes of one site are non-negative and sum to at most ``num_examples * sqrt(k)``
    (each private sample adds ``k`` votes of ``1/sqrt(k)``). Gaussian noise of std ``noise_std``
    adds about ``0.8 * N * noise_std`` to the L1 norm (std ``0.6 * sqrt(N) * noise_std``), so a
    reply beyond ``N * noise_std + 10 * sqrt(N) * noise_std`` of slack is not an honest one.
    """
    if votes.shape != (num_candidates,):
        raise ReplyError(f"votes have shape {votes.shape}, expected ({num_candidates},)")
    if not np.all(np.isfinite(votes)):
        raise ReplyError("votes contain NaN or infinite values")
    if not (np.isfinite(num_examples) and num_examples >= 0):
        raise ReplyError(f"num-examples is {num_examples}, expected a non-negative count")
    slack = noise_std * (num_candidates + 10.0 * np.sqrt(num_candidates))
    total = float(np.abs(votes).sum())
    if total > num_examples * np.sqrt(k) + slack + 1e-6:
        raise ReplyError(
            f"votes sum to {total:.1f} in absolute value, impossible for {int(num_examples)} "
            f"private samples at noise std {noise_std:.3g}"
        )
