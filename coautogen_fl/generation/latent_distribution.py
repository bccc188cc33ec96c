"""What the votes teach a latent generator: a Gaussian over z per class (refit from vote-weighted
latents, for ``feedback.evolve=distribution``) and an attribute direction per class (top-voted
minus bottom-voted latents, for ``vary``'s "direction" step). Pure numpy, no model."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


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
