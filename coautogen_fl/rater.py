"""Raters: the edge-side functions that turn (candidates, private data) into a clean score
vector with a declared L2 sensitivity per private sample. Raters never add noise; the
mechanism does (see :mod:`coautogen_fl.privacy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


def _squared_distances(queries: np.ndarray, keys: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pairwise squared L2 distances, (Q, D) x (K, D) -> (Q, K), in float64.

    Each row is computed from its own query alone (no shared matrix product, whose rounding
    depends on the batch): otherwise adding one private sample could flip another sample's
    nearest candidate at a tie and move the histogram by more than the declared sensitivity.
    """
    q = queries.astype(np.float64)
    k = keys.astype(np.float64)
    rows = [((q[i : i + chunk, None, :] - k[None, :, :]) ** 2).sum(-1) for i in range(0, q.shape[0], chunk)]
    return np.concatenate(rows) if rows else np.zeros((0, k.shape[0]))


def _has_voters(private_embeddings: np.ndarray, candidate_embeddings: np.ndarray, k: int) -> bool:
    """Check a rater's inputs (k >= 1, one embedding space); False when no private sample votes."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if private_embeddings.shape[0] == 0:
        return False
    if private_embeddings.shape[1:] != candidate_embeddings.shape[1:]:
        raise ValueError(
            f"embedding dimensions differ: private {private_embeddings.shape[1:]} vs candidates "
            f"{candidate_embeddings.shape[1:]}; the site and the server must use the same embedder"
        )
    return True


def vote_histogram(
    private_embeddings: np.ndarray,
    private_labels: np.ndarray,
    candidate_embeddings: np.ndarray,
    candidate_labels: np.ndarray,
    k: int = 1,
) -> np.ndarray:
    """Private Evolution votes: each private sample votes for its ``k`` nearest candidates
    of its own class, each vote weighing ``1/sqrt(k)``.

    A private sample therefore changes the histogram by a vector of L2 norm exactly 1
    (k entries of 1/sqrt(k)), whatever the data: the per-sample sensitivity is 1. When a
    class has fewer than ``k`` candidates, ``k`` shrinks to that count, norm still 1.

    Returns
    -------
    np.ndarray
        float64 votes, shape (num_candidates,).
    """
    votes = np.zeros(candidate_labels.shape[0], dtype=np.float64)
    if not _has_voters(private_embeddings, candidate_embeddings, k):
        # No voters (every image a site-test image): zero votes, like any other site, so that
        # whether a site answers never depends on its data.
        return votes
    for label in np.unique(private_labels):
        members = np.flatnonzero(candidate_labels == label)
        if members.size == 0:
            continue  # nothing of this class to vote for: these samples release nothing
        voters = private_embeddings[private_labels == label]
        k_eff = min(k, members.size)
        distances = _squared_distances(voters, candidate_embeddings[members])
        nearest = np.argpartition(distances, k_eff - 1, axis=1)[:, :k_eff]
        np.add.at(votes, members[nearest.ravel()], 1.0 / np.sqrt(k_eff))
    return votes


def filter_scores(
    private_embeddings: np.ndarray,
    private_labels: np.ndarray,
    candidate_embeddings: np.ndarray,
    candidate_labels: np.ndarray,
    k: int = 1,
) -> np.ndarray:
    """Real Filter (RF) votes made DP: each private sample looks at its ``k`` nearest candidates
    over *all* classes and gives each ``+1/sqrt(k)`` ("keep") when their labels agree and
    ``-1/sqrt(k)`` ("reject") otherwise; a candidate's score is keeps minus rejects.

    One sample moves ``k`` entries by ``1/sqrt(k)`` each: L2 sensitivity exactly 1, whatever the
    data. (The seed's own RF, a distance to any other-class real image, has no such bound.)

    Returns
    -------
    np.ndarray
        float64 scores, shape (num_candidates,), negative for candidates mostly rejected.
    """
    scores = np.zeros(candidate_labels.shape[0], dtype=np.float64)
    if not _has_voters(private_embeddings, candidate_embeddings, k) or candidate_labels.shape[0] == 0:
        return scores
    k_eff = min(k, candidate_labels.shape[0])
    nearest = np.argpartition(_squared_distances(private_embeddings, candidate_embeddings), k_eff - 1, axis=1)[:, :k_eff]
    agree = candidate_labels[nearest] == private_labels[:, None]
    np.add.at(scores, nearest.ravel(), np.where(agree, 1.0, -1.0).ravel() / np.sqrt(k_eff))
    return scores


def normalise_site_vector(votes: np.ndarray) -> np.ndarray:
    """Scale a site's whole vote vector to L2 norm <= 1 (the per-site privacy unit)."""
    norm = float(np.linalg.norm(votes))
    return votes / norm if norm > 1.0 else votes.copy()


def vote_sensitivity(unit: str, capped: bool = False) -> float:
    """L2 sensitivity of one site's vote vector for the privacy unit.

    - ``image``: adding or removing one image adds or removes its own votes, norm 1 for any
      ``k``. With a per-label cap (-rvpl) an added image can also push one other voter out:
      the difference of two non-negative unit vectors, at most sqrt 2.
    - ``site``: the server sees which sites answered, so neighbours replace a site's data
      rather than remove it; the vectors are L2-normalised to at most 1 and non-negative, so
      they differ by at most sqrt 2.
    """
    if unit not in ("image", "site"):
        raise ValueError(f"privacy unit {unit!r} not understood; expected image or site")
    return math.sqrt(2.0) if unit == "site" or capped else 1.0


ScoreFunction = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Rater:
    """A rater: the clean score function of ``name`` (no noise) with its ``k``; every rater
    here has per-sample L2 sensitivity :attr:`sensitivity` = 1."""

    name: str
    k: int = 1
    sensitivity: float = 1.0

    def score(
        self,
        private_embeddings: np.ndarray,
        private_labels: np.ndarray,
        candidate_embeddings: np.ndarray,
        candidate_labels: np.ndarray,
    ) -> np.ndarray:
        """The clean score vector, one entry per candidate."""
        return RATERS[self.name](private_embeddings, private_labels, candidate_embeddings, candidate_labels, self.k)


#: -r: PE (own-class nearest-candidate votes, >= 0) | RF (keep minus reject over all classes, any sign).
RATERS: dict[str, ScoreFunction] = {"PE": vote_histogram, "RF": filter_scores}


def build_rater(name: str, k: int = 1) -> Rater:
    """The rater named by ``feedback.rater`` (``-r``)."""
    if name not in RATERS:
        raise ValueError(f"unknown rater '{name}'; choose one of {', '.join(RATERS)}")
    return Rater(name, k)
