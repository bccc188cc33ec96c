"""Raters: the edge-side functions that turn (candidates, private data) into a clean score
vector with a declared L2 sensitivity per private sample. Raters never add noise; the
mechanism does (see :mod:`coautogen_fl.privacy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


def squared_distances(queries: np.ndarray, keys: np.ndarray, chunk: int = 256) -> np.ndarray:
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
        distances = squared_distances(voters, candidate_embeddings[members])
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
    nearest = np.argpartition(squared_distances(private_embeddings, candidate_embeddings), k_eff - 1, axis=1)[:, :k_eff]
    agree = candidate_labels[nearest] == private_labels[:, None]
    np.add.at(scores, nearest.ravel(), np.where(agree, 1.0, -1.0).ravel() / np.sqrt(k_eff))
    return scores


def _log_contrastive_confidence(
    candidate_embeddings: np.ndarray, candidate_labels: np.ndarray
) -> tuple[np.ndarray, float]:
    """``log q_j`` of every candidate (PCEvolve's public part), from the candidates alone.

    Prototypes ``P_c`` are the class means of the candidates; ``s2`` the mean squared distance of a
    candidate to its own prototype (1.0 when 0 or not finite); ``q_j`` the softmax over the classes
    with a prototype of ``-||e_j - P_c||^2 / s2``, at ``c = y_j``. Returns (log q, s2).
    """
    e = candidate_embeddings.astype(np.float64)
    classes, own = np.unique(candidate_labels, return_inverse=True)
    prototypes = np.stack([e[own == i].mean(axis=0) for i in range(classes.size)])
    distances = squared_distances(e, prototypes)  # (N, C), row by row
    s2 = float(distances[np.arange(e.shape[0]), own].mean())
    if not (math.isfinite(s2) and s2 > 0.0):
        s2 = 1.0
    logits = -distances / s2
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return log_softmax[np.arange(e.shape[0]), own], s2


def contrastive_votes(
    private_embeddings: np.ndarray,
    private_labels: np.ndarray,
    candidate_embeddings: np.ndarray,
    candidate_labels: np.ndarray,
    k: int = 1,
) -> np.ndarray:
    """PCEvolve votes (after "Private Contrastive Evolution", ICML'25), made DP with public prototypes.

    Public part, computed from the candidates the server sent (data-independent):

    - class prototypes ``P_c`` = mean embedding of the class-``c`` candidates (a class without
      candidates has no prototype);
    - a scale ``s2`` = mean over candidates of the squared distance to their own class prototype
      (1.0 when that is 0 or not finite);
    - each candidate ``j`` (label ``y_j``) gets a contrastive confidence ``q_j`` = softmax over the
      classes with a prototype of ``-||e_j - P_c||^2 / s2``, taken at ``c = y_j``: how clearly it
      belongs to its own class rather than to the others.

    Private part: each private sample ``x`` of label ``y`` votes for the own-class candidates with
    the highest contrastive utility ``u(x, j) = -||x - e_j||^2 / s2 + log q_j``; with ``k > 1`` its
    ``k`` best (``k`` shrinks to the class's candidate count) get ``1/sqrt(k)`` each. A sample whose
    class has no candidate releases nothing (as with PE). Votes are non-negative.

    Sensitivity: ``u(x, .)`` depends on ``x`` and public values only, so one private sample moves
    only its own ``k`` entries of ``1/sqrt(k)``: L2 norm exactly 1 per sample, as PE (distances are
    row-independent, :func:`squared_distances`, so ties cannot make one sample move another's vote).

    Why it differs from the paper: the paper's prototypes are means of the *private* data, so one
    private image moves every prototype and with it every other image's vote (and the utility of
    every candidate): the sensitivity would be unbounded. Here the prototypes are public (the
    candidates'), and the public scale ``s2`` stands in for the paper's temperature (no ``-tau``).

    Returns
    -------
    np.ndarray
        float64 votes >= 0, shape (num_candidates,).
    """
    votes = np.zeros(candidate_labels.shape[0], dtype=np.float64)
    if not _has_voters(private_embeddings, candidate_embeddings, k) or candidate_labels.shape[0] == 0:
        return votes
    log_q, s2 = _log_contrastive_confidence(candidate_embeddings, candidate_labels)
    for label in np.unique(private_labels):
        members = np.flatnonzero(candidate_labels == label)
        if members.size == 0:
            continue  # nothing of this class to vote for: these samples release nothing
        voters = private_embeddings[private_labels == label]
        k_eff = min(k, members.size)
        # -utility, element-wise from each voter's own row: smaller is better
        cost = squared_distances(voters, candidate_embeddings[members]) / s2 - log_q[members][None, :]
        best = np.argpartition(cost, k_eff - 1, axis=1)[:, :k_eff]
        np.add.at(votes, members[best.ravel()], 1.0 / np.sqrt(k_eff))
    return votes


def normalise_site_vector(votes: np.ndarray) -> np.ndarray:
    """Scale a site's whole vote vector to L2 norm <= 1 (the per-site privacy unit)."""
    norm = float(np.linalg.norm(votes))
    return votes / norm if norm > 1.0 else votes.copy()


def vote_sensitivity(unit: str, capped: bool = False, signed: bool = False) -> float:
    """L2 sensitivity of one site's vote vector for the privacy unit.

    - ``image``: adding or removing one image adds or removes its own votes, norm 1 for any
      ``k``. With a per-label cap (-rvpl) an added image can also push one other voter out:
      the difference of two unit vectors, at most sqrt 2 when both are non-negative.
    - ``site``: the server sees which sites answered, so neighbours replace a site's data
      rather than remove it; the vectors are L2-normalised to at most 1, so non-negative ones
      differ by at most sqrt 2.
    - ``signed`` (a rater whose scores can be negative, :data:`SIGNED_RATERS`: RF's keep minus
      reject): in the two replacement cases above, two unit vectors of any sign differ by up to 2.
    """
    if unit not in ("image", "site"):
        raise ValueError(f"privacy unit {unit!r} not understood; expected image or site")
    if unit == "site" or capped:
        return 2.0 if signed else math.sqrt(2.0)
    return 1.0


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


#: -r: PE (own-class nearest-candidate votes, >= 0) | RF (keep minus reject over all classes, any sign) |
#: PCEvolve (own-class votes by prototype-contrastive utility, public prototypes, >= 0).
RATERS: dict[str, ScoreFunction] = {"PE": vote_histogram, "RF": filter_scores, "PCEvolve": contrastive_votes}
#: Raters whose scores can be negative (their replacement sensitivity is 2, not sqrt 2).
SIGNED_RATERS = frozenset({"RF"})


def build_rater(name: str, k: int = 1) -> Rater:
    """The rater named by ``feedback.rater`` (``-r``)."""
    if name not in RATERS:
        raise ValueError(f"unknown rater '{name}'; choose one of {', '.join(RATERS)}")
    return Rater(name, k)
