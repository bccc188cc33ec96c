"""Generators behind one protocol (``random``, ``vary``), chosen by name (``-sgen``)."""

from __future__ import annotations

from typing import Callable, Sequence

from ..config import GeneratorConfig
from .base import Candidate, Generator, stack_images


def _glyph(cfg: GeneratorConfig, class_names: Sequence[str], image_size: int, channels: int, device: str) -> Generator:
    from .glyph import GlyphGenerator

    if channels != 1:
        raise ValueError("the Glyph generator renders grayscale images; set data.channels=1")
    return GlyphGenerator(class_names, image_size=image_size, seed=cfg.seed)


GENERATORS: dict[str, Callable[..., Generator]] = {"Glyph": _glyph}


def build_generator(cfg: GeneratorConfig, class_names: Sequence[str], image_size: int, channels: int = 1, device: str = "cpu") -> Generator:
    """The generator named by ``generator.name``."""
    if cfg.name not in GENERATORS:
        raise ValueError(f"unknown generator '{cfg.name}'; choose one of {', '.join(GENERATORS)}")
    return GENERATORS[cfg.name](cfg, class_names, image_size, channels, device)


__all__ = ["Candidate", "Generator", "GENERATORS", "build_generator", "stack_images"]
