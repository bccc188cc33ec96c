"""The Active framework (``-f Active``): the second seed's active-learning loop, federated and DP.

Each round the sites vote on the pool (the rater of ``-r``) and the candidates whose noised votes
clear ``threshold x`` the noise std accumulate per class, as in the Filter framework. Then:

1. **A model.** The server trains the downstream model on the accumulated images plus fresh
   synthetic ones at ``feedback.mix_ratio`` (the mixing ratio of synthetic to accumulated data).
2. **Where it is wrong (charged).** The next vote request carries that model; each site releases
   its errors per class on its voters *together with its votes*, one Gaussian release of the
   joint vector (one image moves the votes by at most the vote sensitivity and its class's
   error count by at most 1, or as much for the site unit: joint sensitivity sqrt 2 times the
   votes'), charged to its ledger once per round like any vote.
3. **Steering.** The summed noised errors move the share of generation volume per class
   (``feedback.active_steer`` between uniform and proportional to errors) and its variation
   degree (a class with twice its uniform share varies twice as far, within [0, 1]).
4. **Uncertainty sampling (public, free).** Of ``feedback.active_oversample`` candidates drawn
   per one sent, the model's most uncertain (highest predictive entropy) go to the vote.
5. **Refit.** A generator that can refit its sampling distribution (Glyph, Latent) refits it to the
   round's votes, as in ``feedback.evolve=distribution``; the final dataset's fresh images are drawn
   from it (plain draws: ambiguous images are for voting, not training).

After the last round the final dataset holds ``volume_per_label x classes`` images split over
the classes by the steered shares: per class the best-voted accumulated images, and
``mix_ratio`` of fresh draws (more where the accumulated run short).
Everything here but the sites' releases is post-processing of released values and public data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .generation.base import Candidate, Generator, stack_images
from .selection import allocate

#: Builds and trains a model on (images, labels); returns it (a torch module).
Trainer = Callable[[np.ndarray, np.ndarray], Any]
#: Class probabilities (N, C) of a model on images.
Predictor = Callable[[Any, np.ndarray], np.ndarray]


def volume_shares(noised_errors: np.ndarray, steer: float) -> np.ndarray:
    """Share of generation volume per class: ``(1 - steer) / C + steer x errors / sum(errors)``.

    Negative noised counts count as 0; when nothing is left (no errors, or noise only), the
    shares stay uniform.
    """
    errors = np.maximum(np.asarray(noised_errors, dtype=np.float64), 0.0)
    uniform = np.full(errors.shape[0], 1.0 / errors.shape[0])
    if errors.sum() <= 0:
        return uniform
    return (1.0 - steer) * uniform + steer * errors / errors.sum()


def class_degrees(degree: float, shares: np.ndarray) -> np.ndarray:
    """Variation degree per class: ``degree`` scaled by the class's share over the uniform one,
    within [0, 1] (the classes the model gets wrong are explored further)."""
    return np.clip(degree * shares * shares.shape[0], 0.0, 1.0)


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row of class probabilities (N, C), in nats."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def most_uncertain(probabilities: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` rows of highest predictive entropy, most uncertain first (stable)."""
    return np.argsort(-predictive_entropy(probabilities), kind="stable")[:n]


@dataclass
class ActiveLoop:
    """The Active framework's state between rounds (no Flower, no privacy: it only sees
    released sums and public candidates).

    Parameters
    ----------
    generator : Generator
        Draws and varies candidates.
    num_classes : int
        Labels are ``0 .. num_classes - 1``.
    train : Trainer
        Trains a fresh model on (images, labels) (the server's downstream settings).
    predict : Predictor
        The model's class probabilities on images.
    steer : float (default: 0.5)
        ``feedback.active_steer``.
    oversample : int (default: 4)
        ``feedback.active_oversample``: candidates drawn per one kept by uncertainty.
    mix_ratio : float (default: 0.25)
        ``feedback.mix_ratio``: share of fresh synthetic images beside the accumulated ones.
    seed : int (default: 0)
        Seeds which synthetic images join the per-round training data.
    """

    generator: Generator
    num_classes: int
    train: Trainer
    predict: Predictor
    steer: float = 0.5
    oversample: int = 4
    mix_ratio: float = 0.25
    seed: int = 0
    model: Any = None
    shares: np.ndarray = field(init=False)
    errors: np.ndarray | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shares = np.full(self.num_classes, 1.0 / self.num_classes)
        self.rng = np.random.default_rng(self.seed)

    def observe_errors(self, noised_errors: np.ndarray) -> None:
        """The round's summed noised errors per class (of the model the request carried)."""
        if noised_errors.shape != (self.num_classes,):
            raise ValueError(f"class errors have shape {noised_errors.shape}, expected ({self.num_classes},)")
        self.errors = np.asarray(noised_errors, dtype=np.float64)
        self.shares = volume_shares(self.errors, self.steer)

    def fit(self, accepted: dict[int, list[Candidate]], voted: Sequence[Candidate]) -> None:
        """Train this round's model: the accumulated images plus ``mix_ratio`` of synthetic ones
        (drawn from the pool just voted on; the whole pool when nothing has accumulated yet)."""
        kept = [c for bucket in accepted.values() for c in bucket]
        if kept:
            extra = int(round(len(kept) * self.mix_ratio / (1.0 - self.mix_ratio)))
            picks = self.rng.choice(len(voted), size=min(extra, len(voted)), replace=False) if extra else []
            data = kept + [voted[i] for i in picks]
        else:
            data = list(voted)
        self.model = self.train(stack_images(data), np.array([c.label for c in data], dtype=np.int64))

    def draw(
        self, label: int, n: int, parents: Sequence[Candidate], degree: float, uncertain: bool = True
    ) -> list[Candidate]:
        """``n`` candidates of ``label``: variations of ``parents`` at ``degree`` (fresh draws when
        there are none); with ``uncertain``, the model's most uncertain of ``oversample x n``."""
        if n <= 0:
            return []
        uncertain = uncertain and self.model is not None
        m = n * self.oversample if uncertain else n
        if parents:
            drawn = self.generator.vary([parents[i % len(parents)] for i in range(m)], degree)
        else:
            drawn = self.generator.random(label, m)
        if not uncertain or len(drawn) <= n:
            return drawn[:n]
        keep = most_uncertain(self.predict(self.model, stack_images(drawn)), n)
        return [drawn[i] for i in sorted(keep)]

    def pool(self, accepted: dict[int, list[Candidate]], per_label: int, degree: float) -> list[Candidate]:
        """The next pool: ``per_label x classes`` candidates split by the steered shares."""
        counts = allocate(self.shares, per_label * self.num_classes)
        degrees = class_degrees(degree, self.shares)
        return [
            c
            for label in range(self.num_classes)
            for c in self.draw(label, int(counts[label]), accepted[label], float(degrees[label]))
        ]

    def final(self, accepted: dict[int, list[Candidate]], volume_per_label: int) -> list[Candidate]:
        """The final dataset: per class its steered volume, the best-voted accumulated images up to
        ``1 - mix_ratio`` of it, the rest fresh draws of the generator (from the distribution the
        votes refit, for a generator that refits; not picked by uncertainty: the ambiguous ones are
        for voting, not training)."""
        counts = allocate(self.shares, volume_per_label * self.num_classes)
        dataset: list[Candidate] = []
        for label in range(self.num_classes):
            bucket = sorted(accepted[label], key=lambda c: -(c.votes or 0.0))
            own = bucket[: min(len(bucket), int(round(counts[label] * (1.0 - self.mix_ratio))))]
            dataset += own + self.draw(label, int(counts[label]) - len(own), [], 0.0, uncertain=False)
        return dataset

    def diagnostics(self) -> dict[str, Any]:
        """For ``metrics.jsonl``: the released errors the round steered by and the shares they gave."""
        return {
            "active": {
                "class_errors": None if self.errors is None else [round(float(e), 3) for e in self.errors],
                "volume_shares": [round(float(s), 4) for s in self.shares],
            }
        }
