"""What the votes teach a latent generator: a Gaussian over z per class (refit from vote-weighted
latents, for ``feedback.evolve=distribution``) and an attribute direction per class (top-voted
minus bottom-voted latents, for ``vary``'s "direction" step). :class:`LatentDistribution` is pure
numpy, no model; :class:`LatentVoteLearner` is the generator's side (``observe_votes``, ``fit``,
``describe``), which feeds it the voted candidates' latents class by class."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import Candidate


class LatentDistribution:
    """Per-class Gaussians N(mean, diag(std^2)) over z, starting at the prior N(0, I), and
    per-class unit attribute directions.

    Parameters
    ----------
    num_classes : int
        Classes are ``0 .. num_classes - 1``.
    latent_dim : int
        Size of z.
    """

    def __init__(self, num_classes: int, latent_dim: int) -> None:
        self.mean = np.zeros((num_classes, latent_dim), dtype=np.float64)
        self.std = np.ones((num_classes, latent_dim), dtype=np.float64)
        self.directions: dict[int, np.ndarray] = {}

    def sample(self, label: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` latents of class ``label``, float32 (n, latent_dim)."""
        noise = rng.standard_normal((n, self.mean.shape[1]))
        return (self.mean[label] + self.std[label] * noise).astype(np.float32)

    def observe(self, label: int, z: np.ndarray, votes: np.ndarray) -> None:
        """Set the class's direction to the unit vector of (mean z of the top-voted quarter) minus
        (mean z of the bottom-voted quarter); fewer than 4 latents or equal means: no direction."""
        self.directions.pop(label, None)
        if len(z) < 4:
            return
        order = np.argsort(votes, kind="stable")
        quarter = len(z) // 4
        diff = z[order[-quarter:]].mean(axis=0) - z[order[:quarter]].mean(axis=0)
        norm = float(np.linalg.norm(diff))
        if np.isfinite(norm) and norm > 1e-12:
            self.directions[label] = diff / norm

    def refit(self, label: int, z: np.ndarray, weights: np.ndarray, mix: float, min_spread: float) -> None:
        """Blend the class's Gaussian toward the weighted moments of ``z``:
        ``mix * new + (1 - mix) * old``, std floored at ``min_spread``; zero total weight: unchanged."""
        total = float(weights.sum())
        if total <= 0:
            return
        w = weights / total
        m = w @ z
        s = np.sqrt(w @ (z - m) ** 2)
        self.mean[label] = mix * m + (1 - mix) * self.mean[label]
        self.std[label] = np.maximum(mix * s + (1 - mix) * self.std[label], float(min_spread))

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (for metrics and the run record)."""
        return {
            "mean_norm": [round(float(np.linalg.norm(m)), 4) for m in self.mean],
            "mean_std": [round(float(s.mean()), 4) for s in self.std],
            "directions": sorted(int(k) for k in self.directions),
        }


def check_fit_arguments(weights: np.ndarray, count: int, mix: float, min_spread: float) -> tuple[np.ndarray, float]:
    """Validate ``fit``'s arguments; return (weights as float64, mix as float)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (count,):
        raise ValueError(f"weights must have shape ({count},), one per candidate, got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and >= 0")
    if not (isinstance(mix, numbers.Real) and 0.0 <= float(mix) <= 1.0):
        raise ValueError(f"mix must be a number in [0, 1], got {mix!r}")
    if not (isinstance(min_spread, numbers.Real) and math.isfinite(min_spread) and min_spread >= 0):
        raise ValueError(f"min_spread must be a finite number >= 0, got {min_spread!r}")
    return weights, float(mix)


class LatentVoteLearner:
    """The generator's side of learning from votes: groups voted candidates' latents by class and
    hands them to its :class:`LatentDistribution`; a mixin of ``LatentGenerator``, which provides
    ``distribution``, ``_z_of`` (a candidate's z, or None) and ``_check_label``."""

    distribution: LatentDistribution

    def _voted_by_class(self, voted: Sequence[Candidate]) -> dict[int, list[int]]:
        """Indices of candidates with a z, by label."""
        groups: dict[int, list[int]] = {}
        for i, candidate in enumerate(voted):
            if self._z_of(candidate) is None:
                continue
            label = self._check_label(candidate.label, f"label of candidate {candidate.candidate_id}")
            groups.setdefault(label, []).append(i)
        return groups

    @property
    def mean(self) -> np.ndarray:
        """Per-class sampling means of z, (num_classes, latent_dim)."""
        return self.distribution.mean

    @property
    def std(self) -> np.ndarray:
        """Per-class sampling stds of z, (num_classes, latent_dim)."""
        return self.distribution.std

    @property
    def directions(self) -> dict[int, np.ndarray]:
        """Per-class unit attribute directions learned from the votes."""
        return self.distribution.directions

    def observe_votes(self, voted: Sequence[Candidate]) -> None:
        """Learn per class an attribute direction in z from voted candidates.

        For each class among ``voted`` (candidates with ``votes`` set and a "z"), the direction is
        the unit vector of mean z of the top-voted quarter minus mean z of the bottom-voted
        quarter. A class with fewer than 4 such candidates, or equal means, gets no direction;
        classes absent from ``voted`` keep theirs. Used by ``vary``'s "direction" operation.
        """
        usable = [c for c in voted if c.votes is not None]
        for label, members in self._voted_by_class(usable).items():
            z = np.stack([self._z_of(usable[i]) for i in members]).astype(np.float64)
            self.distribution.observe(label, z, np.array([float(usable[i].votes) for i in members]))

    def fit(
        self, candidates: Sequence[Candidate], weights: np.ndarray, mix: float = 0.8, min_spread: float = 0.08
    ) -> None:
        """Move each class's sampling Gaussian toward its vote-weighted z's (distribution evolution).

        Per class: the weighted mean and std (per dimension) of the candidates' z's, blended as
        ``mix * new + (1 - mix) * old``, the std floored at ``min_spread`` (in units of the prior
        std 1). A class whose weights sum to zero keeps its distribution. Then ``observe_votes``.

        Parameters
        ----------
        candidates : Sequence[Candidate]
            The voted candidates (latent genotypes; others are skipped).
        weights : np.ndarray
            One non-negative weight per candidate (see ``distribution.vote_weights``).
        mix : float, default 0.8
            Weight of the new moments, in [0, 1].
        min_spread : float, default 0.08
            Lower bound of every std, >= 0.
        """
        weights, mix = check_fit_arguments(weights, len(candidates), mix, min_spread)
        for label, members in self._voted_by_class(candidates).items():
            z = np.stack([self._z_of(candidates[i]) for i in members]).astype(np.float64)
            self.distribution.refit(label, z, weights[members], mix, min_spread)
        self.observe_votes(candidates)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary of the sampling distributions (for metrics and the run record)."""
        return self.distribution.describe()
