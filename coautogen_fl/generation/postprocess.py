"""Post-processing around any generator: stages that transform candidates, filters that reject them.

``PostProcessedGenerator`` wraps a generator and still answers the generator protocol. Fresh
draws and variations go through the stages in order (e.g. ``DomainRandomizer``: each stage
stores its parameters in the genotype under its ``name``), then through the filters (e.g. a
CLIP class filter); a rejected candidate is replaced by a new draw. The inner generator only
ever sees its own genotype: the stage keys are stripped before ``vary`` and ``regenerate``.

A stage has ``name``, ``apply(candidates) -> list[Candidate]`` and ``reapply(image, genotype)
-> image``. A filter has ``name``, ``keep(candidates) -> bool array`` and ``scores(candidates)
-> float array`` (higher = better), used to pick the best rejected ones when too few pass.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from coautogen_fl.generation.base import Candidate, Generator, Regenerable, check_int
from coautogen_fl.generation.domain import DomainRandomizer
from coautogen_fl.generation.schedule import check_degree

logger = logging.getLogger("coautogen_fl")


@runtime_checkable
class Stage(Protocol):
    """A post-processing step whose parameters live in the genotype under ``name``."""

    name: str

    def apply(self, candidates: Sequence[Candidate]) -> list[Candidate]: ...

    def reapply(self, image: np.ndarray, genotype: dict[str, Any]) -> np.ndarray: ...


@runtime_checkable
class Filter(Protocol):
    """Accepts or rejects candidates and ranks them (higher score = better)."""

    name: str

    def keep(self, candidates: Sequence[Candidate]) -> np.ndarray: ...

    def scores(self, candidates: Sequence[Candidate]) -> np.ndarray: ...


def _new_stats() -> dict[str, int]:
    return {"drawn": 0, "kept": 0, "filled": 0}


class PostProcessedGenerator:
    """A generator whose output goes through ``stages`` then ``filters``; implements ``Generator``.

    Attributes the wrapper does not define (``fit``, ``observe_votes``, ``class_names``,
    ``image_size``, ...) are looked up on the inner generator, so ``hasattr(wrapper, "fit")``
    is true exactly when the inner generator has ``fit``.

    Parameters
    ----------
    generator : Generator
        The inner generator.
    stages : Sequence[Stage], default ()
        Applied in order to every fresh draw and variation; names must be unique.
    filters : Sequence[Filter], default ()
        A candidate is kept only if every filter keeps it.
    max_draws : int, default 4
        Rounds of drawing (``random``) or re-varying (``vary``) before the best rejected
        candidates fill the gap (with a warning on the "coautogen_fl" logger).

    Attributes
    ----------
    filter_stats : dict
        ``{"calls": [{"call", "drawn", "kept", "filled"}, ...], "total": {"drawn", "kept",
        "filled"}}``: candidates drawn, kept by the filters, and rejected ones used as fill.
    """

    def __init__(
        self, generator: Generator, stages: Sequence[Stage] = (), filters: Sequence[Filter] = (), max_draws: int = 4
    ) -> None:
        self.generator = generator
        self.stages = tuple(stages)
        self.filters = tuple(filters)
        self.max_draws = check_int("max_draws", max_draws, 1)
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise ValueError(f"stage {stage!r} needs name, apply(candidates) and reapply(image, genotype)")
        for filt in self.filters:
            if not isinstance(filt, Filter):
                raise ValueError(f"filter {filt!r} needs name, keep(candidates) and scores(candidates)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique (they are genotype keys), got {names}")
        self.stage_keys = frozenset(names)
        self.filter_stats: dict[str, Any] = {"calls": [], "total": _new_stats()}

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; guard against recursion before __init__ ran
        # (copy/pickle create the object without calling __init__).
        if name == "generator" or "generator" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["generator"], name)

    # -- generator protocol --------------------------------------------------------------------

    def random(self, label: int, n: int) -> list[Candidate]:
        """Exactly ``n`` post-processed candidates of class ``label`` that passed the filters
        (or, after ``max_draws`` rounds of drawing, the best-scoring rejected ones)."""
        n = check_int("n", n, 0)
        kept: list[Candidate] = []
        rejected: list[tuple[tuple[int, float], Candidate]] = []
        drawn = 0
        for _ in range(self.max_draws):
            need = n - len(kept)
            if need == 0:
                break
            batch = self._process(self.generator.random(label, need))
            drawn += len(batch)
            passed, ranks = self._judge(batch)
            kept.extend(c for c, ok in zip(batch, passed) if ok)
            rejected.extend((r, c) for c, ok, r in zip(batch, passed, ranks) if not ok)
        missing = n - len(kept)
        if missing > 0:
            rejected.sort(key=lambda pair: pair[0], reverse=True)  # stable: ties keep draw order
            kept.extend(c for _, c in rejected[:missing])
        self._record(f"random(label={label})", drawn, n - missing, missing)
        return kept

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One post-processed child per parent, in parent order.

        The inner generator varies copies of the parents whose genotypes have the stage keys
        removed (their images are the post-processed ones). A child the filters reject is
        re-varied from the same parent, up to ``max_draws`` attempts; then its best-scoring
        attempt is used.
        """
        degree = check_degree(degree)
        parents = [dataclasses.replace(p, genotype=self.strip(p.genotype)) for p in candidates]
        chosen: list[Candidate | None] = [None] * len(parents)
        best: list[tuple[tuple[int, float], Candidate] | None] = [None] * len(parents)
        pending = list(range(len(parents)))
        drawn = 0
        for _ in range(self.max_draws):
            if not pending:
                break
            children = self._process(self.generator.vary([parents[i] for i in pending], degree))
            if len(children) != len(pending):
                raise ValueError(
                    f"{type(self.generator).__name__}.vary returned {len(children)} children "
                    f"for {len(pending)} parents; it must return one per parent"
                )
            drawn += len(children)
            passed, ranks = self._judge(children)
            still = []
            for i, child, ok, rank in zip(pending, children, passed, ranks):
                if ok:
                    chosen[i] = child
                    continue
                if best[i] is None or rank > best[i][0]:
                    best[i] = (rank, child)
                still.append(i)
            pending = still
        for i in pending:
            chosen[i] = best[i][1]  # type: ignore[index]
        self._record("vary", drawn, len(parents) - len(pending), len(pending))
        return [c for c in chosen if c is not None]

    def regenerate(self, genotype: dict[str, Any], parent_image: np.ndarray | None = None) -> np.ndarray:
        """Re-create a candidate's pixels: the inner generator's ``regenerate`` on the stripped
        genotype, then every stage's ``reapply`` in order.

        Parameters
        ----------
        genotype : dict
            A genotype written through this wrapper (inner keys plus one key per stage).
        parent_image : np.ndarray or None
            The parent's (post-processed) image, for genotypes that need it (e.g. diffusers i2i).
        """
        if not isinstance(self.generator, Regenerable):
            raise TypeError(
                f"{type(self.generator).__name__} has no regenerate(genotype) method, so its "
                "candidates cannot be re-created from their genotypes"
            )
        stripped = self.strip(genotype)
        regenerate = self.generator.regenerate
        image = regenerate(stripped) if parent_image is None else regenerate(stripped, parent_image)
        for stage in self.stages:
            image = stage.reapply(image, genotype)
        return image

    # -- helpers ---------------------------------------------------------------------------

    def strip(self, genotype: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``genotype`` without the stage keys: what the inner generator wrote."""
        return {k: v for k, v in genotype.items() if k not in self.stage_keys}

    def _process(self, candidates: list[Candidate]) -> list[Candidate]:
        """Run the stages in order."""
        for stage in self.stages:
            out = stage.apply(candidates)
            if len(out) != len(candidates):
                raise ValueError(f"stage '{stage.name}' returned {len(out)} candidates for {len(candidates)}")
            candidates = list(out)
        return candidates

    def _judge(self, candidates: list[Candidate]) -> tuple[np.ndarray, list[tuple[int, float]]]:
        """Whether every filter keeps each candidate, and each one's rank for filling in:
        (number of filters passed, sum of the filters' scores), compared lexicographically.
        Scores are only computed for the rejected candidates (a CLIP pass costs as much as
        the verdict); kept ones get the rank (number of filters, inf)."""
        count = len(candidates)
        keeps = []
        for filt in self.filters:
            keep = np.asarray(filt.keep(candidates))
            if keep.shape != (count,) or keep.dtype != bool:
                raise ValueError(
                    f"filter '{filt.name}'.keep must return {count} booleans, got {keep.dtype} {keep.shape}"
                )
            keeps.append(keep)
        passed = np.logical_and.reduce(keeps) if keeps else np.ones(count, dtype=bool)
        ranks = [(len(self.filters), float("inf"))] * count
        rejected = np.flatnonzero(~passed)
        if rejected.size:
            subset = [candidates[i] for i in rejected]
            total = np.zeros(rejected.size, dtype=np.float64)
            for filt in self.filters:
                scores = np.asarray(filt.scores(subset), dtype=np.float64)
                if scores.shape != (rejected.size,) or not np.isfinite(scores).all():
                    raise ValueError(
                        f"filter '{filt.name}'.scores must return {rejected.size} finite numbers, "
                        f"got shape {scores.shape}"
                    )
                total += scores
            passes = np.sum(keeps, axis=0)[rejected]
            for j, i in enumerate(rejected):
                ranks[i] = (int(passes[j]), float(total[j]))
        return passed, ranks

    def _record(self, call: str, drawn: int, kept: int, filled: int) -> None:
        """Add one call's filter outcome to ``filter_stats``; warn when rejected ones filled in."""
        self.filter_stats["calls"].append({"call": call, "drawn": drawn, "kept": kept, "filled": filled})
        for key, value in (("drawn", drawn), ("kept", kept), ("filled", filled)):
            self.filter_stats["total"][key] += value
        if filled:
            names = ", ".join(f.name for f in self.filters)
            logger.warning(
                "%s: filters [%s] kept %d of %d drawn candidates after %d rounds; filled %d with "
                "the best-scoring rejected ones",
                call,
                names,
                kept,
                drawn,
                self.max_draws,
                filled,
            )


__all__ = ["PostProcessedGenerator", "DomainRandomizer", "Stage", "Filter"]
