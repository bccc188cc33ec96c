"""Generators behind one protocol (``random``, ``vary``), chosen by name (``-sgen``).

:data:`BUILTIN_GENERATORS` is the one table of built-in generator names: what each needs from the
config (checked by config validation at start-up, through :func:`coautogen_fl.registry.check_names`)
and how it is built (:func:`build_base_generator` dispatches through it). The registry derives its
list of built-in names from this table.

:func:`build_generator` turns a run config into the server's generator: the named generator
(built in, a diffusers model, or plugged in, see :mod:`coautogen_fl.registry`), its prompt source
(templates, an LLM, captions of reference images) and its post-processing stages (domain
randomisation, upscaling, the CLIP filter).

This module stays light (no torch / diffusers at import, no import of the registry or the config):
the registry imports it at start-up, on the server and on every site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from coautogen_fl.schema import ConfigError

from .base import Candidate, Generator, GeneratorContext, GeneratorLoadError, stack_images

if TYPE_CHECKING:
    from coautogen_fl.schema import RunConfig


def _glyph(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from .glyph import GlyphGenerator

    return GlyphGenerator(
        ctx.class_names,
        image_size=ctx.image_size,
        seed=cfg.generator.seed,
        refit=cfg.feedback.refit,
        style=cfg.generator.glyph_style,
    )


def _latent(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from .latent import LatentGenerator, load_latent_module

    g = cfg.generator
    module = load_latent_module(g.model, g.factory, g.trust_pickle, ctx.device)
    return LatentGenerator(
        module,
        ctx.class_names,
        image_size=ctx.image_size,
        channels=ctx.channels,
        device=ctx.device,
        seed=g.seed,
        latent_dim=g.latent_dim,
        output_range=(g.output_low, g.output_high),
        perturb_scale=g.perturb_scale,
        batch_size=g.batch_size,
        source=g.model,
        progress=True,
    )


def _http(cfg: RunConfig, ctx: GeneratorContext) -> Generator:
    from coautogen_fl.prompts import TemplatePrompts

    from .http_api import HTTPImageGenerator

    g = cfg.generator
    return HTTPImageGenerator(
        g.api_url,
        ctx.class_names,
        image_size=ctx.image_size,
        channels=ctx.channels,
        seed=g.seed,
        task_mode=ctx.task_mode,
        prompts=TemplatePrompts(ctx.class_names, g.prompt_template),
        api_key_env=g.api_key_env,
        timeout_s=g.api_timeout_s,
        retries=g.api_retries,
        backoff_s=g.api_backoff_s,
        requests_per_minute=g.api_requests_per_minute,
        progress=True,
    )


def _diffusers(cfg: RunConfig, ctx: GeneratorContext, model: str) -> Generator:
    from .diffusion import DiffusersGenerator

    g = cfg.generator
    return DiffusersGenerator(
        model,
        ctx.class_names,
        image_size=ctx.image_size,
        channels=ctx.channels,
        device=ctx.device,
        seed=g.seed,
        task_mode=ctx.task_mode,
        prompt_template=g.prompt_template,
        num_inference_steps=g.steps,
        guidance_scale=g.guidance_scale,
        batch_size=g.batch_size,
        safety_checker=g.safety_checker,
        inpaint=g.inpaint,
        inpaint_model=g.inpaint_model,
        progress=True,
    )


def _grayscale(cfg: RunConfig) -> str | None:
    if cfg.data.channels == 1:
        return None
    return (
        f"generator.name=Glyph renders grayscale images, but data.channels={cfg.data.channels}: set data.channels=1, "
        "or pick a generator of colour images (Latent, HTTP, a diffusers model)"
    )


def _model_file(cfg: RunConfig) -> str | None:
    if cfg.generator.model:
        return None
    return "generator.name=Latent needs generator.model (a TorchScript file, or a state dict with generator.factory)"


def _api_url(cfg: RunConfig) -> str | None:
    if cfg.generator.api_url:
        return None
    return "generator.name=HTTP needs generator.api_url (the endpoint images are POSTed to)"


def _anything(cfg: RunConfig) -> str | None:
    return None


@dataclass(frozen=True)
class BuiltinGenerator:
    """One built-in generator name.

    Attributes
    ----------
    build : callable
        ``build(cfg, context)`` -> the :class:`Generator` (``context`` a :class:`GeneratorContext`);
        it imports its heavy modules itself, so that this table stays light.
    requires : callable
        ``requires(cfg)`` -> None when the config suits the generator, else one line naming the
        config key and the fix. Config validation calls it at start-up; the build calls it again
        (a config made without :func:`coautogen_fl.config.load_config` is checked too).
    """

    build: Callable[[RunConfig, GeneratorContext], Generator]
    requires: Callable[[RunConfig], str | None] = _anything


#: The built-in generator names (``-sgen``): the only list of them (the registry's
#: ``BUILTIN["generator"]`` is a live view of its keys). Diffusers models come by alias, hub id or
#: folder, and plug-ins by entry point or ``"pkg.module:Class"`` (see :mod:`coautogen_fl.registry`).
BUILTIN_GENERATORS: dict[str, BuiltinGenerator] = {
    "Glyph": BuiltinGenerator(_glyph, _grayscale),
    "Latent": BuiltinGenerator(_latent, _model_file),
    "HTTP": BuiltinGenerator(_http, _api_url),
}


def builtin_requirement(cfg: RunConfig) -> str | None:
    """What the config lacks for its built-in ``generator.name`` (None when it has it, or when the
    name is not a built-in one)."""
    builtin = BUILTIN_GENERATORS.get(cfg.generator.name)
    return builtin.requires(cfg) if builtin else None


def build_base_generator(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu") -> Generator:
    """The generator ``generator.name`` names, without prompt source or post-processing."""
    # Function-level on purpose: the registry imports this module at its top (BUILTIN_GENERATORS
    # drives its names and its start-up checks), so this module cannot import the registry at its
    # top; resolving a name (aliases, entry points, "pkg.module:Class") is the registry's job.
    from coautogen_fl.registry import call_plugin, resolve

    ctx = GeneratorContext(
        tuple(class_names), cfg.data.image_size, cfg.data.channels, device, cfg.feedback.task_mode, cfg.generator.seed
    )
    resolved = resolve("generator", cfg.generator.name)
    if resolved.kind == "builtin":
        builtin = BUILTIN_GENERATORS[resolved.value]
        problem = builtin.requires(cfg)
        if problem:
            raise ConfigError(problem)
        return builtin.build(cfg, ctx)
    if resolved.kind == "model":
        return _diffusers(cfg, ctx, resolved.value)
    generator = call_plugin(resolved.value, cfg, ctx)
    if not isinstance(generator, Generator):
        raise TypeError(
            f"generator.name={cfg.generator.name!r} built {type(generator).__name__}, "
            "which lacks random(label, n) / vary(candidates, degree)"
        )
    return generator


def build_generator(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu", embedder: Any = None) -> Generator:
    """The server's generator for a run: the named generator, its prompt source and its
    post-processing stages (see :mod:`coautogen_fl.generation.pipeline`). ``embedder``, the run's
    voting embedder, is shared with the CLIP filter when both are the same CLIP model."""
    from .pipeline import attach_prompts, wrap_postprocessing

    generator = build_base_generator(cfg, class_names, device)
    attach_prompts(generator, cfg, class_names, device)
    return wrap_postprocessing(generator, cfg, class_names, device, embedder)


__all__ = [
    "BUILTIN_GENERATORS",
    "BuiltinGenerator",
    "Candidate",
    "Generator",
    "GeneratorContext",
    "GeneratorLoadError",
    "build_base_generator",
    "build_generator",
    "builtin_requirement",
    "stack_images",
]
