"""Selection: from noised, summed votes to the parents of the next pool.

The threshold is expressed in units of the aggregate noise std, so the same setting means
the same thing in local mode (noise grows with sqrt(sites)) and central mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def threshold_votes(votes: np.ndarray, threshold: float, noise_std: float) -> np.ndarray:
    """Zero every vote below ``threshold * noise_std`` (mostly noise), keep the rest."""
    cut = threshold * noise_std
    return np.where(votes >= cut, np.maximum(votes, 0.0), 0.0)


def allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` children proportionally to ``weights`` (largest remainder)."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        counts[np.argsort(-(share - counts), kind="stable")[:remainder]] += 1
    return counts


@dataclass
class Selection:
    """Parent indices (into the pool, one per child) and the classes that had no signal."""

    parents: np.ndarray
    fallback_labels: list[int] = field(default_factory=list)


def select_parents(
    votes: np.ndarray,
    labels: np.ndarray,
    per_label: int,
    mode: str,
    rng: np.random.Generator,
) -> Selection:
    """Choose ``per_label`` parents for every class present in ``labels``.

    Parameters
    ----------
    votes : np.ndarray
        Thresholded votes (>= 0), one per pool candidate.
    labels : np.ndarray
        The class of each pool candidate.
    per_label : int
        Children to produce per class.
    mode : str
        ``"sample"``: parents drawn with probability proportional to votes (PE's choice);
        ``"rank"``: children allocated to the voted candidates in proportion to their votes,
        deterministically (less selection noise, less diversity).
    rng : np.random.Generator
        Randomness for ``sample`` mode.

    A class whose candidates all have zero votes keeps its candidates uniformly and is
    reported in ``fallback_labels`` (the votes carried no signal above the noise).
    """
    if mode not in ("sample", "rank"):
        raise ValueError(f"selection mode must be 'sample' or 'rank' (got {mode!r})")
    parents: list[np.ndarray] = []
    fallback: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        weights = votes[members].astype(np.float64)
        if weights.sum() <= 0:
            fallback.append(int(label))
            weights = np.ones_like(weights)
        if mode == "sample":
            chosen = rng.choice(members, size=per_label, replace=True, p=weights / weights.sum())
        else:
            chosen = np.repeat(members, allocate(weights, per_label))
        parents.append(chosen)
    return Selection(np.concatenate(parents) if parents else np.arange(0), fallback)
