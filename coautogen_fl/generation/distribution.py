"""A sampling distribution over genotypes that votes can move (distribution evolution).

Private Evolution varies individual voted candidates; under local DP with many sites each
candidate's vote is mostly noise. A parametric generator (glyphs, a latent GAN's attributes)
can instead learn *where in its parameter space* the private data lies: every candidate's
noised vote weighs its genotype, and the weighted moments over the whole pool average the
noise away (zero-mean noise cancels in a sum over many candidates). This is post-processing
of the noised votes, so it costs no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


def vote_weights(votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the votes above the class mean (zero elsewhere).

    Centring within each class removes the class's share of votes (classes differ in size)
    and keeps only "better than the other candidates of this class" as the signal.
    """
    weights = np.zeros(votes.shape[0], dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        centred = votes[members] - votes[members].mean()
        weights[members] = np.maximum(centred, 0.0)
    return weights


@dataclass
class GenotypeDistribution:
    """Independent truncated normals over numeric parameters and a categorical choice.

    Parameters
    ----------
    ranges : mapping name -> (low, high)
        The numeric parameters and the ranges samples are kept in.
    choices : sequence of str
        The values of the categorical parameter (e.g. fonts).
    choice_key : str
        Genotype key of the categorical parameter (default "font").
    integer_keys : frozenset of str
        Numeric parameters rounded to integers.
    mean, std, probabilities :
        The current parameters; None means the uniform prior (Gen's distribution).
    """

    ranges: Mapping[str, tuple[float, float]]
    choices: Sequence[str]
    choice_key: str = "font"
    integer_keys: frozenset = frozenset()
    mean: dict[str, float] | None = None
    std: dict[str, float] | None = None
    probabilities: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_prior(self) -> bool:
        return self.mean is None

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One genotype (without generator-specific extras such as noise seeds)."""
        n = len(self.choices)
        p = None if self.probabilities is None else self.probabilities
        genotype: dict[str, Any] = {
            self.choice_key: self.choices[int(rng.choice(n, p=p)) if p is not None else int(rng.integers(n))]
        }
        for name, (low, high) in self.ranges.items():
            if self.mean is None or self.std is None:
                value = (
                    float(rng.uniform(low, high))
                    if name not in self.integer_keys
                    else float(rng.integers(int(low), int(high) + 1))
                )
            else:
                value = self._truncated_normal(rng, self.mean[name], self.std[name], low, high)
            genotype[name] = int(round(value)) if name in self.integer_keys else float(value)
        return genotype

    @staticmethod
    def _truncated_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> float:
        for _ in range(20):  # rejection: cheap, and exact while the mean stays inside the range
            value = float(rng.normal(mean, std))
            if low <= value <= high:
                return value
        return min(max(value, low), high)

    def fitted(
        self, genotypes: Sequence[Mapping[str, Any]], weights: np.ndarray, mix: float = 0.8, min_spread: float = 0.08
    ) -> "GenotypeDistribution":
        """The distribution moved toward the weighted moments of ``genotypes``.

        Parameters
        ----------
        genotypes : sequence of mappings
            The voted candidates' genotypes.
        weights : np.ndarray
            Non-negative weights (see :func:`vote_weights`); all zero leaves it unchanged.
        mix : float (default: 0.8)
            Weight of the new moments against the current ones (smooths noisy rounds).
        min_spread : float (default: 0.08)
            Lower bound of each std as a fraction of its range, and of each choice's
            probability (/ number of choices), so that nothing collapses on noise.
        """
        total = float(weights.sum())
        if total <= 0:
            return self
        w = weights / total
        mean, std = {}, {}
        for name, (low, high) in self.ranges.items():
            x = np.array([float(g[name]) for g in genotypes])
            old_mean = self.mean[name] if self.mean else (low + high) / 2
            old_std = self.std[name] if self.std else (high - low) / np.sqrt(12)
            m = float(w @ x)
            s = float(np.sqrt(w @ (x - m) ** 2))
            mean[name] = mix * m + (1 - mix) * old_mean
            std[name] = max(mix * s + (1 - mix) * old_std, min_spread * (high - low))
        counts = np.array([sum(wi for wi, g in zip(w, genotypes) if g[self.choice_key] == c) for c in self.choices])
        old_p = (
            self.probabilities if self.probabilities is not None else np.full(len(self.choices), 1 / len(self.choices))
        )
        p = np.maximum(mix * counts + (1 - mix) * old_p, min_spread / 4)
        return GenotypeDistribution(
            self.ranges, self.choices, self.choice_key, self.integer_keys, mean, std, p / p.sum()
        )

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable state (for metrics and the run record)."""
        if self.is_prior:
            return {"prior": "uniform"}
        top = int(np.argmax(self.probabilities)) if self.probabilities is not None else 0
        return {
            "mean": {k: round(v, 4) for k, v in (self.mean or {}).items()},
            "std": {k: round(v, 4) for k, v in (self.std or {}).items()},
            f"top_{self.choice_key}": self.choices[top],
        }
