"""Generators behind one protocol (``random``, ``vary``), chosen by name (``-sgen``).

:func:`build_generator` turns a run config into the server's generator: the named generator
(built in, a diffusers model, or plugged in, see :mod:`coautogen_fl.registry`), its prompt source
(templates, an LLM, captions of reference images) and its post-processing stages (domain
randomisation, upscaling, the CLIP filter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .base import Candidate, Generator, GeneratorLoadError, stack_images

if TYPE_CHECKING:
    from coautogen_fl.config import RunConfig
    from coautogen_fl.registry import GeneratorContext


def _glyph(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from .glyph import GlyphGenerator

    if ctx.channels != 1:
        raise ValueError("the Glyph generator renders grayscale images; set data.channels=1")
    return GlyphGenerator(ctx.class_names, image_size=ctx.image_size, seed=cfg.generator.seed, refit=cfg.feedback.refit)


def _latent(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from .latent import LatentGenerator, load_latent_module

    g = cfg.generator
    module = load_latent_module(g.model, g.factory, g.trust_pickle, ctx.device)
    return LatentGenerator(
        module, ctx.class_names, image_size=ctx.image_size, channels=ctx.channels, device=ctx.device, seed=g.seed,
        latent_dim=g.latent_dim, output_range=(g.output_low, g.output_high), perturb_scale=g.perturb_scale,
        batch_size=g.batch_size, source=g.model, progress=True,
    )


def _http(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from coautogen_fl.prompts import TemplatePrompts

    from .http_api import HTTPImageGenerator

    g = cfg.generator
    return HTTPImageGenerator(
        g.api_url, ctx.class_names, image_size=ctx.image_size, channels=ctx.channels, seed=g.seed, task_mode=ctx.task_mode,
        prompts=TemplatePrompts(ctx.class_names, g.prompt_template), api_key_env=g.api_key_env, timeout_s=g.api_timeout_s,
        retries=g.api_retries, backoff_s=g.api_backoff_s, requests_per_minute=g.api_requests_per_minute, progress=True,
    )


def _diffusers(cfg: RunConfig, ctx: GeneratorContext, model: str) -> Generator:
    from .diffusion import DiffusersGenerator

    g = cfg.generator
    return DiffusersGenerator(
        model, ctx.class_names, image_size=ctx.image_size, channels=ctx.channels, device=ctx.device, seed=g.seed,
        task_mode=ctx.task_mode, prompt_template=g.prompt_template, num_inference_steps=g.steps,
        guidance_scale=g.guidance_scale, batch_size=g.batch_size, safety_checker=g.safety_checker,
        inpaint=g.inpaint, inpaint_model=g.inpaint_model, progress=True,
    )


_BUILTIN = {"Glyph": _glyph, "Latent": _latent, "HTTP": _http}


def build_base_generator(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu") -> Generator:
    """The generator ``generator.name`` names, without prompt source or post-processing."""
    from coautogen_fl.registry import GeneratorContext, call_plugin, resolve

    ctx = GeneratorContext(tuple(class_names), cfg.data.image_size, cfg.data.channels, device, cfg.feedback.task_mode, cfg.generator.seed)
    resolved = resolve("generator", cfg.generator.name)
    if resolved.kind == "builtin":
        return _BUILTIN[resolved.value](cfg, ctx)
    if resolved.kind == "model":
        return _diffusers(cfg, ctx, resolved.value)
    generator = call_plugin(resolved.value, cfg, ctx)
    if not isinstance(generator, Generator):
        raise TypeError(f"generator.name={cfg.generator.name!r} built {type(generator).__name__}, which lacks random(label, n) / vary(candidates, degree)")
    return generator


def build_generator(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu", embedder: Any = None) -> Generator:
    """The server's generator for a run: the named generator, its prompt source and its
    post-processing stages (see :mod:`coautogen_fl.generation.pipeline`). ``embedder``, the run's
    voting embedder, is shared with the CLIP filter when both are the same CLIP model."""
    from .pipeline import attach_prompts, wrap_postprocessing

    generator = build_base_generator(cfg, class_names, device)
    attach_prompts(generator, cfg, class_names, device)
    return wrap_postprocessing(generator, cfg, class_names, device, embedder)


__all__ = ["Candidate", "Generator", "GeneratorLoadError", "build_base_generator", "build_generator", "stack_images"]
