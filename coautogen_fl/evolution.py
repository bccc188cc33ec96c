"""The server's frameworks without Flower: Gen (generate once) and Feedback (Private
Evolution across sites). The strategy in ``strategies/`` only moves data in and out.

Two ways to evolve (``feedback.evolve``, default ``auto`` = distribution when the generator has a
``fit`` method, else candidates): ``candidates`` is Private Evolution (voted candidates
are selected and varied into the next pool); ``distribution`` lets the votes refit the
generator's sampling distribution over genotypes and draws the next pool fresh from it, which
averages the per-candidate noise over the whole pool (see generation/distribution.py).

The Active framework (``-f Active``) accumulates like Filter, and its :class:`~coautogen_fl.active.ActiveLoop`
draws each next pool from a model trained on what accumulated (see coautogen_fl/active.py).

The Filter framework (``-f Filter``) does not evolve: every round draws a fresh pool, the votes
keep the candidates whose noised score clears ``threshold x`` the aggregate noise std, and the kept
ones accumulate until ``volume_per_label`` per class; after the last round a class still short is
filled with that round's best-scoring candidates, then fresh draws (named in ``fallback_labels``).

Round numbering follows Flower: round ``r`` (1..T) votes on the pool born in round ``r - 1``
(round 0 is the initial random population); the variations made after round ``r`` are born
in round ``r`` and use the degree ``schedule.degree(r - 1)``. After the last round the
variations of the voted parents, ``volume_per_label`` per class, are the final dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .active import ActiveLoop
from .config import FeedbackConfig
from .embedding import Embedder
from .frameworks import FRAMEWORKS
from .generation.base import Candidate, Generator, GeneratorCapabilities, stack_images
from .generation.distribution import vote_weights
from .generation.schedule import DegreeSchedule
from .selection import select_parents, threshold_votes


@dataclass
class RoundOutcome:
    """What one voting round decided."""

    voted: list[Candidate]
    children: list[Candidate]
    kept: int  # candidates whose votes cleared the threshold
    fallback_labels: list[int] = field(default_factory=list)
    degree: float = 0.0


class Evolution:
    """The pool of candidates and how votes turn it into the next pool.

    Parameters
    ----------
    generator : Generator
        Draws and varies candidates.
    embedder : Embedder
        The public embedder both server and sites use.
    num_classes : int
        Labels are ``0 .. num_classes - 1``.
    cfg : FeedbackConfig
        Pool size, volume, selection mode and threshold.
    schedule : DegreeSchedule
        Degree of variation per round (annealed).
    seed : int (default: 0)
        Seed of the selection randomness.
    active : ActiveLoop or None (default: None)
        The Active framework's model and steering (required by ``-f Active``).
    """

    def __init__(
        self,
        generator: Generator,
        embedder: Embedder,
        num_classes: int,
        cfg: FeedbackConfig,
        schedule: DegreeSchedule,
        seed: int = 0,
        active: ActiveLoop | None = None,
    ) -> None:
        self.generator = generator
        self.embedder = embedder
        self.num_classes = num_classes
        self.cfg = cfg
        self.schedule = schedule
        self.rng = np.random.default_rng(seed)
        #: What the generator can do beyond random() and vary(), checked once (generation/base.py).
        self.capabilities = GeneratorCapabilities.of(generator)
        can_fit = self.capabilities.refit
        #: The evolution mode in effect: ``auto`` becomes distribution when the generator can fit();
        #: the Filter framework filters and accumulates instead.
        self.evolve = ("distribution" if can_fit else "candidates") if cfg.evolve == "auto" else cfg.evolve
        self.evolve = FRAMEWORKS[cfg.framework].evolve or self.evolve
        self.active = active
        if self.evolve == "active" and active is None:
            raise ValueError("-f Active needs its ActiveLoop (the model trained each round): pass active=")
        #: Filter and Active: the candidates kept so far, per class.
        self.accepted: dict[int, list[Candidate]] = {label: [] for label in range(num_classes)}
        if self.evolve == "distribution" and not can_fit:
            raise ValueError(
                f"feedback.evolve=distribution needs a generator with a fit() method; "
                f"{type(generator).__name__} has none: set feedback.evolve=candidates"
            )
        self.pool: list[Candidate] = []
        self._payload: tuple[np.ndarray, np.ndarray] | None = None

    def diagnostics(self) -> dict:
        """What this round did to the generator, for ``metrics.jsonl``: where the votes moved its
        distribution (distribution mode) and what its filters drew, kept and filled."""
        found: dict = {}
        if self.evolve == "distribution" and self.capabilities.refit:
            found["distribution"] = self.generator.distribution.describe()  # type: ignore[attr-defined]
        if self.capabilities.filtering and self.generator.filter_stats:  # type: ignore[attr-defined]
            found["filter"] = dict(self.generator.filter_stats["total"])  # type: ignore[attr-defined]
        if self.active is not None:
            found.update(self.active.diagnostics())
        return found

    def random_population(self, per_label: int) -> list[Candidate]:
        """``per_label`` fresh candidates of every class (born in round 0)."""
        return [c for label in range(self.num_classes) for c in self.generator.random(label, per_label)]

    def start(self) -> list[Candidate]:
        """Draw the initial pool that round 1 votes on."""
        self._set_pool(self.random_population(self.cfg.candidates_per_label))
        return self.pool

    def _set_pool(self, pool: list[Candidate]) -> None:
        self.pool = pool
        self._payload = None

    def payload(self) -> tuple[np.ndarray, np.ndarray]:
        """(float16 embeddings (N, D), int64 labels (N,)) of the pool, embedded once per round."""
        if self._payload is None:
            embeddings = self.embedder.embed(stack_images(self.pool)).astype(np.float16)
            labels = np.array([c.label for c in self.pool], dtype=np.int64)
            self._payload = (embeddings, labels)
        return self._payload

    def advance(
        self, server_round: int, votes: np.ndarray, noise_std: float, children_per_label: int, final: bool = False
    ) -> RoundOutcome:
        """Record the summed noised votes on the pool and breed the next pool from them.

        Parameters
        ----------
        server_round : int
            The round the votes came from (1-based).
        votes : np.ndarray
            Aggregated noised votes, one per pool candidate.
        noise_std : float
            Std of the noise on ``votes`` (scales the threshold).
        children_per_label : int
            Size per class of the next pool (``volume_per_label`` after the last round).
        final : bool (default: False)
            The last round: the children are the final dataset (the Filter framework's accumulated one).
        """
        if votes.shape != (len(self.pool),):
            raise ValueError(f"votes have shape {votes.shape}, the pool has {len(self.pool)} candidates")
        voted = self.pool
        for candidate, value in zip(voted, votes):
            candidate.votes = float(value)
        _, labels = self.payload()
        if self.evolve == "distribution":
            return self._refit(server_round, voted, votes, labels, children_per_label)
        if self.evolve == "filter":
            return self._filter(server_round, voted, votes, noise_std, final)
        if self.evolve == "active":
            return self._active(server_round, voted, votes, noise_std, final)
        if self.capabilities.observes_votes:  # e.g. latent generators estimate attribute directions from the votes
            self.generator.observe_votes(voted)  # type: ignore[attr-defined]
        kept = threshold_votes(votes, self.cfg.threshold, noise_std)
        selection = select_parents(kept, labels, children_per_label, self.cfg.selection, self.rng)
        degree = self.schedule.degree(server_round - 1)
        children = self.generator.vary([voted[i] for i in selection.parents], degree)
        for child in children:
            child.round = server_round
        self._set_pool(children)
        return RoundOutcome(voted, children, int((kept > 0).sum()), selection.fallback_labels, degree)

    def _refit(
        self, server_round: int, voted: list[Candidate], votes: np.ndarray, labels: np.ndarray, per_label: int
    ) -> RoundOutcome:
        """Distribution evolution: the votes refit the generator's sampling distribution and
        the next pool (or the final dataset) is drawn fresh from it."""
        weights = vote_weights(votes, labels)
        self.generator.fit(voted, weights, self.cfg.distribution_mix, self.cfg.min_spread)  # type: ignore[attr-defined]  (Refittable)
        children = self.random_population(per_label)
        for child in children:
            child.round = server_round
        self._set_pool(children)
        fallback = [int(c) for c in np.unique(labels) if weights[labels == c].sum() <= 0]
        return RoundOutcome(voted, children, int((weights > 0).sum()), fallback, 0.0)

    def _filter(
        self, server_round: int, voted: list[Candidate], votes: np.ndarray, noise_std: float, final: bool
    ) -> RoundOutcome:
        """The Filter framework: keep what clears the threshold (best first, up to the volume),
        then a fresh pool, or after the last round the accumulated dataset, topped up."""
        volume = self.cfg.volume_per_label
        kept = self._accumulate(voted, votes, noise_std)
        if not final:
            return self._next_pool(server_round, voted, self.random_population(self.cfg.candidates_per_label), kept)
        taken = {id(c) for bucket in self.accepted.values() for c in bucket}
        short = [label for label, bucket in self.accepted.items() if len(bucket) < volume]
        for label in short:  # this round's best-scoring leftovers, then fresh draws (the prior: no votes)
            bucket = self.accepted[label]
            rest = [
                i for i in np.argsort(-votes, kind="stable") if voted[i].label == label and id(voted[i]) not in taken
            ]
            bucket.extend(voted[i] for i in rest[: volume - len(bucket)])
            if len(bucket) < volume:
                bucket.extend(self.generator.random(label, volume - len(bucket)))
        final_set = [c for label in range(self.num_classes) for c in self.accepted[label]]
        self._set_pool(final_set)
        return RoundOutcome(voted, final_set, kept, short)

    def _accumulate(self, voted: list[Candidate], votes: np.ndarray, noise_std: float) -> int:
        """Add what clears ``threshold x noise_std`` to :attr:`accepted`, best first, up to the
        volume per class; returns how many were added."""
        cleared = np.flatnonzero((votes >= self.cfg.threshold * noise_std) & (votes > 0))
        kept = 0
        for i in cleared[np.argsort(-votes[cleared], kind="stable")]:
            bucket = self.accepted[voted[i].label]
            if len(bucket) < self.cfg.volume_per_label:
                bucket.append(voted[i])
                kept += 1
        return kept

    def _next_pool(
        self, server_round: int, voted: list[Candidate], pool: list[Candidate], kept: int, degree: float = 0.0
    ) -> RoundOutcome:
        for child in pool:
            child.round = server_round
        self._set_pool(pool)
        return RoundOutcome(voted, pool, kept, degree=degree)

    def _active(
        self, server_round: int, voted: list[Candidate], votes: np.ndarray, noise_std: float, final: bool
    ) -> RoundOutcome:
        """The Active framework: accumulate, train the round's model, then a steered pool of the
        model's most uncertain candidates, or after the last round the mixed final dataset."""
        assert self.active is not None  # checked in __init__
        kept = self._accumulate(voted, votes, noise_std)
        if self.capabilities.refit:  # fresh draws (pool and final) come from the distribution the votes refit
            _, labels = self.payload()
            self.generator.fit(voted, vote_weights(votes, labels), self.cfg.distribution_mix, self.cfg.min_spread)  # type: ignore[attr-defined]
        self.active.fit(self.accepted, voted)
        degree = self.schedule.degree(server_round - 1)
        if not final:
            pool = self.active.pool(self.accepted, self.cfg.candidates_per_label, degree)
            return self._next_pool(server_round, voted, pool, kept, degree)
        final_set = self.active.final(self.accepted, self.cfg.volume_per_label)
        self._set_pool(final_set)
        short = [label for label, bucket in self.accepted.items() if not bucket]
        return RoundOutcome(voted, final_set, kept, short, degree)
