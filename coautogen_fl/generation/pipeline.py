"""Around the named generator: where its prompts come from and what happens to its images.

- Prompts (``prompts.*``): class-name templates by default; captions of public reference images
  (``prompts.captioner`` + ``prompts.reference``, the seed's Img2Cap); an LLM that writes many
  descriptions per class (GenLLM) and rewrites voted parents' prompts (T2I Feedback).
- Post-processing (``postprocess.*``): domain randomisation and upscaling as stages applied to
  every candidate, the CLIP filter that drops off-class candidates before sites see them; the
  upscaler can instead run on the final dataset only (``postprocess.upscale_on=final``).
"""

from __future__ import annotations

from logging import getLogger
from typing import Any, Sequence

from coautogen_fl.config import LLM_ALIASES, ConfigError, RunConfig
from coautogen_fl.prompts.base import KeepsDescriptions
from coautogen_fl.registry import RegistryError, call_plugin, resolve

from .base import Generator, Prompted, TokenLimited

logger = getLogger("coautogen_fl")


def build_captioner(cfg: RunConfig, device: str = "cpu") -> Any:
    """The captioner ``prompts.captioner`` names (an alias, hub id, folder or plug-in)."""
    from coautogen_fl.prompts.captioner import Captioner

    resolved = resolve("captioner", cfg.prompts.captioner)
    if resolved.kind == "model":
        return Captioner(resolved.value, device=device, progress=True)
    return call_plugin(resolved.value, cfg, {"device": device})


def reference_captions(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu") -> dict[int, list[str]]:
    """Captions of the public reference images, per class (empty without a captioner)."""
    p = cfg.prompts
    if not p.captioner:
        return {}
    captioner = build_captioner(cfg, device)
    captions = captioner.caption_folder(p.reference, class_names, p.captions_per_class)
    logger.info("captioned %d reference images into prompts", sum(len(v) for v in captions.values()))
    return captions


def build_prompt_source(cfg: RunConfig, class_names: Sequence[str], device: str = "cpu", generator: Any = None) -> Any:
    """The prompt source of a run: templates (+ captions), or an LLM (+ captions)."""
    from coautogen_fl.prompts import TemplatePrompts

    p = cfg.prompts
    captions = reference_captions(cfg, class_names, device)
    template = cfg.generator.prompt_template
    if not p.llm:
        return TemplatePrompts(class_names, template, captions)
    from coautogen_fl.prompts.llm import LLMPrompts

    return LLMPrompts(
        LLM_ALIASES.get(p.llm, p.llm),
        class_names,
        template=template,
        device=device,
        per_class=p.per_class,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        seed=cfg.generator.seed,
        token_limit=int(generator.token_limit or 77) if isinstance(generator, TokenLimited) else 77,
        count_tokens=generator.count_tokens if isinstance(generator, TokenLimited) else None,
        evolve_prompts=p.evolve,
        extra_descriptions=captions,
        progress=True,
    )


def attach_prompts(generator: Generator, cfg: RunConfig, class_names: Sequence[str], device: str = "cpu") -> None:
    """Give ``generator`` the configured prompt source (only when an LLM or captioner is set)."""
    p = cfg.prompts
    if not p.llm and not p.captioner:
        return
    if not isinstance(generator, Prompted):
        raise ConfigError(
            f"prompts.llm / prompts.captioner need a prompt-driven generator (diffusers, HTTP); "
            f"generator.name={cfg.generator.name!r} takes no prompts"
        )
    generator.prompts = build_prompt_source(cfg, class_names, device, generator)  # type: ignore[attr-defined]


def build_upscaler(cfg: RunConfig, device: str = "cpu") -> Any:
    """The ``postprocess.upscaler`` stage, producing ``data.image_size`` images."""
    from .upscale import Upscaler

    pp = cfg.postprocess
    return Upscaler(
        pp.upscaler,
        cfg.data.image_size,
        device=device,
        steps=pp.upscale_steps,
        strength=pp.upscale_strength,
        batch_size=cfg.generator.batch_size,
        seed=cfg.generator.seed,
        progress=True,
    )


def wrap_postprocessing(
    generator: Generator, cfg: RunConfig, class_names: Sequence[str], device: str = "cpu", embedder: Any = None
) -> Generator:
    """``generator`` with the configured per-candidate stages and filters (unchanged if none).
    A CLIP ``embedder`` of the same model lends its loaded weights to the CLIP filter."""
    pp = cfg.postprocess
    stages: list[Any] = []
    filters: list[Any] = []
    if pp.domain:
        from .postprocess import DomainRandomizer

        stages.append(
            DomainRandomizer(
                pp.lighting, pp.texture, pp.camera, pp.backgrounds, pp.background_probability, seed=cfg.generator.seed
            )
        )
    if pp.upscaler and pp.upscale_on == "rounds":
        stages.append(build_upscaler(cfg, device))
    if pp.clip_filter:
        from coautogen_fl.embedding.clip import CLIPEmbedder, CLIPFilter, load_clip

        model = pp.clip_model or cfg.embedder.model
        if isinstance(embedder, CLIPEmbedder) and embedder.model_name == model:
            clip = (embedder.model, embedder.processor)  # the voting embedder's weights: load once
        else:
            clip = load_clip(model, device, config_key="postprocess.clip_model" if pp.clip_model else "embedder.model")
        filters.append(CLIPFilter(clip, class_names, cfg.generator.prompt_template, device=device))
    if not stages and not filters:
        return generator
    from .postprocess import PostProcessedGenerator

    return PostProcessedGenerator(generator, stages, filters, max_draws=pp.max_draws)


def check_model_sources(cfg: RunConfig, device: str = "cpu") -> None:
    """Check, without loading any weights, that every model the run names is there: local
    folders exist, hub ids sit in the local cache, CUDA exists when asked for, the API key is set.

    Raises
    ------
    coautogen_fl.hub.ModelLoadError
        One line naming the model, the config key and the fix.
    """
    import os
    from pathlib import Path

    from coautogen_fl.hub import check_device, resolve_model_source

    from .base import GeneratorLoadError

    check_device(device)
    g, p, pp = cfg.generator, cfg.prompts, cfg.postprocess
    diffusers_models = [("generator.inpaint_model", g.inpaint_model), ("postprocess.upscaler", pp.upscaler)]
    try:  # plug-ins are imported here, on the server, not at config validation (sites run that too)
        generator = resolve("generator", g.name)
        captioner = resolve("captioner", p.captioner) if p.captioner else None
    except RegistryError as exc:
        raise GeneratorLoadError(str(exc)) from None
    if generator.kind == "model":
        diffusers_models.insert(0, ("generator.name", generator.value))
    for key, model in diffusers_models:
        if model:
            resolve_model_source(model, "diffusers pipeline", "model_index.json", key, GeneratorLoadError)
    transformers_models = [("prompts.llm", LLM_ALIASES.get(p.llm, p.llm))]
    if captioner is not None and captioner.kind == "model":
        transformers_models.append(("prompts.captioner", captioner.value))
    if cfg.embedder.name == "clip":
        transformers_models.append(("embedder.model", cfg.embedder.model))
    if pp.clip_filter:
        transformers_models.append(
            ("postprocess.clip_model" if pp.clip_model else "embedder.model", pp.clip_model or cfg.embedder.model)
        )
    for key, model in transformers_models:
        if model:
            resolve_model_source(model, "transformers model", "config.json", key, GeneratorLoadError)
    if g.name == "Latent" and not Path(g.model).expanduser().is_file():
        raise GeneratorLoadError(f"latent generator file {g.model} does not exist; fix generator.model")
    if g.name == "HTTP" and g.api_key_env and not os.environ.get(g.api_key_env):
        raise GeneratorLoadError(
            f"the API key variable {g.api_key_env} is not set; "
            f"export {g.api_key_env}=... or set generator.api_key_env=''"
        )
    if p.captioner and not Path(p.reference).expanduser().is_dir():
        raise GeneratorLoadError(f"reference image folder {p.reference!r} does not exist; fix prompts.reference")


def save_prompt_pool(generator: Generator, run_dir: str) -> str | None:
    """Write the prompt pool the generator drew from (LLM descriptions, captions) to
    ``<run_dir>/prompts.json``; returns the path, or None for a generator without a prompt pool."""
    import json
    from pathlib import Path

    from coautogen_fl.atomic import write_text_atomic

    if not isinstance(generator, Prompted):
        return None
    prompts = generator.prompts
    if not isinstance(prompts, KeepsDescriptions):
        return None
    per_class = prompts.kept_descriptions()
    if not per_class:  # templates only: the config says everything
        return None
    record = {"settings": prompts.settings(), "per_class": {str(k): list(v) for k, v in sorted(per_class.items())}}
    path = Path(run_dir) / "prompts.json"
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return str(path)
