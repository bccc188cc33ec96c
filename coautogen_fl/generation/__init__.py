"""Generators behind one protocol (``random``, ``vary``), chosen by name (``-sgen``)."""

from __future__ import annotations

from typing import Callable, Sequence

from ..config import GENERATOR_ALIASES, GeneratorConfig
from .base import Candidate, Generator, stack_images


def _glyph(cfg: GeneratorConfig, class_names: Sequence[str], image_size: int, channels: int, device: str) -> Generator:
    from .glyph import GlyphGenerator

    if channels != 1:
        raise ValueError("the Glyph generator renders grayscale images; set data.channels=1")
    return GlyphGenerator(class_names, image_size=image_size, seed=cfg.seed)


def _diffusers(cfg: GeneratorConfig, class_names: Sequence[str], image_size: int, channels: int, device: str, task_mode: str = "I2I") -> Generator:
    from .diffusion import DiffusersGenerator

    return DiffusersGenerator(
        GENERATOR_ALIASES.get(cfg.name, cfg.name), class_names, image_size=image_size, channels=channels, device=device,
        seed=cfg.seed, task_mode=task_mode, prompt_template=cfg.prompt_template, num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size, safety_checker=cfg.safety_checker,
    )


GENERATORS: dict[str, Callable[..., Generator]] = {"Glyph": _glyph}


def build_generator(
    cfg: GeneratorConfig, class_names: Sequence[str], image_size: int, channels: int = 1, device: str = "cpu", task_mode: str = "I2I"
) -> Generator:
    """The generator named by ``generator.name``: Glyph, or a diffusers pipeline given by a seed
    name (``StableDiffusion``, ...), a hub id or a local folder."""
    if cfg.name in GENERATORS:
        return GENERATORS[cfg.name](cfg, class_names, image_size, channels, device)
    return _diffusers(cfg, class_names, image_size, channels, device, task_mode)


__all__ = ["Candidate", "Generator", "GENERATORS", "build_generator", "stack_images"]
