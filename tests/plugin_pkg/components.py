"""Tiny user components: a generator class, a generator factory function and an embedder."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from coautogen_fl.generation.base import Candidate


class SolidGenerator:
    """Each class is one flat grey level; vary moves it by degree/10."""

    def __init__(
        self,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        device: str = "cpu",
        task_mode: str = "I2I",
        seed: int = 0,
    ) -> None:
        self.class_names, self.image_size, self.channels, self.seed = tuple(class_names), image_size, channels, seed
        self.prompts = None  # takes prompts, so prompts.* may attach a source
        self.count = 0

    def _make(self, label: int, level: float, parent: Candidate | None = None) -> Candidate:
        shape = (self.image_size, self.image_size) + ((3,) if self.channels == 3 else ())
        self.count += 1
        return Candidate(
            f"solid-{self.count}",
            label,
            np.full(shape, level, np.float32),
            {"level": level},
            parent.candidate_id if parent else None,
            parent.round + 1 if parent else 0,
        )

    def random(self, label: int, n: int) -> list[Candidate]:
        return [self._make(label, (label + 1) / (len(self.class_names) + 1)) for _ in range(n)]

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        return [self._make(c.label, min(1.0, c.genotype["level"] + degree / 10), c) for c in candidates]


class ConfiguredSolidGenerator(SolidGenerator):
    """Builds itself from the run config (the ``from_config`` convention): its seed says so."""

    @classmethod
    def from_config(cls, cfg, context) -> "ConfiguredSolidGenerator":
        return cls(context.class_names, context.image_size, context.channels, seed=cfg.generator.seed + 1000)


def solid_factory(cfg, context) -> SolidGenerator:
    """A factory function: gets the RunConfig and the GeneratorContext."""
    return SolidGenerator(context.class_names, context.image_size, context.channels, seed=cfg.generator.seed + 100)


class MeanEmbedder:
    """Mean intensity as a one-dimensional feature."""

    name = "mean"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def embed(self, images: np.ndarray) -> np.ndarray:
        flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        return flat.mean(axis=1, keepdims=True)


def not_a_generator(cfg, context) -> MeanEmbedder:
    """A factory that returns the wrong kind of object."""
    return MeanEmbedder()


def not_an_embedder(cfg, context) -> object:
    """An embedder factory that returns something without embed()."""
    return object()
