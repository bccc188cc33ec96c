"""The run configuration, loaded and validated at start-up (the schema itself, one dataclass per
section, is in :mod:`coautogen_fl.schema` and re-exported here).

Both front doors end here: `coautogen run` (a YAML from configs/ plus dotlist overrides) and
`flwr run .` (Flower's flattened run-config, see :func:`config_from_run_config`). Every value is
a plain scalar so that the same keys can live in `[tool.flwr.app.config]` of pyproject.toml.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from .frameworks import FRAMEWORKS
from .registry import check_names  # the registry knows built-in, aliased and plugged-in names
from .schema import (  # noqa: F401  (the schema is part of this module's interface)
    CAPTIONER_ALIASES,
    GENERATOR_ALIASES,
    LLM_ALIASES,
    ConfigError,
    DataConfig,
    DownstreamConfig,
    EmbedderConfig,
    FederationConfig,
    FeedbackConfig,
    GeneratorConfig,
    PostprocessConfig,
    PrivacyConfig,
    PromptsConfig,
    RunConfig,
    TrackingConfig,
)

CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("cpu", "cuda", "auto"),
    "data.channels": (1, 3),
    "data.partitioner": ("iid", "dirichlet"),
    "data.on_bad_image": ("skip", "error"),
    "feedback.framework": tuple(FRAMEWORKS),
    "feedback.rater": ("PE", "RF", "PCEvolve"),
    "feedback.selection": ("sample", "rank"),
    "feedback.evolve": ("auto", "distribution", "candidates"),
    "feedback.refit": ("per_class", "shared"),
    "generator.glyph_style": ("auto", "pen", "fonts", "both"),
    "postprocess.upscale_on": ("final", "rounds"),
    "feedback.task_type": ("syn", "real", "mix"),
    "feedback.task_mode": ("I2I", "T2I"),
    "privacy.mode": ("local", "central", "secagg"),
    "privacy.unit": ("image", "site"),
    "privacy.evaluation": ("clear", "noised"),
    "downstream.model": ("cnn", "resnet18"),
    "downstream.dp_optimizer": ("adam", "sgd"),
    "tracking.wandb_mode": ("online", "offline", "disabled"),
}
#: Choices spelt in any case (the seed's names: -r pcevolve = -r PCEvolve); stored as in CHOICES.
CASE_INSENSITIVE_CHOICES: tuple[str, ...] = ("feedback.rater",)

# (key, lower bound, inclusive?) for numbers; upper bounds follow below.
_LOWER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("data.image_size", 8, True),
    ("data.dirichlet_alpha", 0, False),
    ("data.test_fraction", 0, False),
    ("data.site_test_fraction", 0, False),
    ("generator.degree_end", 0, True),
    ("generator.degree_step", 0, True),
    ("data.real_per_label", 0, True),
    ("generator.steps", 1, True),
    ("generator.batch_size", 1, True),
    ("embedder.pixel_size", 2, True),
    ("embedder.appearance", 0, True),
    ("embedder.batch_size", 1, True),
    ("feedback.rounds", 1, True),
    ("feedback.candidates_per_label", 1, True),
    ("feedback.volume_per_label", 1, True),
    ("feedback.k", 1, True),
    ("feedback.threshold", 0, True),
    ("feedback.distribution_mix", 0, False),
    ("feedback.min_spread", 0, True),
    ("feedback.active_oversample", 1, True),
    ("feedback.active_epochs", 1, True),
    ("privacy.epsilon", 0, False),
    ("privacy.delta", 0, False),
    ("privacy.secagg_threshold", 0, False),
    ("privacy.secagg_vote_cap", 1, True),
    ("privacy.secagg_gradient_cap", 0, False),
    ("federation.num_hospitals", 1, True),
    ("federation.fraction_train", 0, False),
    ("federation.timeout_s", 0, False),
    ("federation.client_num_cpus", 1, True),
    ("federation.client_num_gpus", 0, True),
    ("federation.max_site_images", 0, True),
    ("federation.min_sites", 0, True),
    ("downstream.epochs", 0, True),
    ("generator.inpaint", 0, True),
    ("generator.latent_dim", 0, True),
    ("generator.perturb_scale", 0, True),
    ("generator.api_timeout_s", 0, False),
    ("generator.api_retries", 0, True),
    ("generator.api_backoff_s", 0, True),
    ("generator.api_requests_per_minute", 0, True),
    ("prompts.per_class", 1, True),
    ("prompts.max_new_tokens", 1, True),
    ("prompts.temperature", 0, False),
    ("prompts.top_p", 0, False),
    ("prompts.captions_per_class", 1, True),
    ("postprocess.lighting", 0, True),
    ("postprocess.texture", 0, True),
    ("postprocess.camera", 0, True),
    ("postprocess.background_probability", 0, True),
    ("postprocess.upscale_steps", 1, True),
    ("postprocess.upscale_strength", 0, True),
    ("postprocess.max_draws", 1, True),
    ("downstream.lr", 0, False),
    ("downstream.batch_size", 1, True),
    ("downstream.dp_rounds", 1, True),
    ("downstream.dp_local_steps", 1, True),
    ("downstream.dp_sample_rate", 0, False),
    ("downstream.dp_max_grad_norm", 0, False),
    ("downstream.dp_lr", 0, False),
    ("downstream.mix_synthetic_steps", 0, True),
    ("privacy.training_share", 0, True),
    ("downstream.augment", 0, True),
    ("downstream.label_smoothing", 0, True),
)
_UPPER_BOUNDS: tuple[tuple[str, float], ...] = (
    ("data.test_fraction", 1.0),
    ("data.site_test_fraction", 1.0),
    ("privacy.delta", 1.0),
    ("privacy.secagg_threshold", 1.0 + 1e-12),
    ("federation.fraction_train", 1.0 + 1e-12),
    ("feedback.distribution_mix", 1.0 + 1e-12),
    ("feedback.min_spread", 0.5),
    ("generator.degree_start", 1.0 + 1e-12),
    ("generator.inpaint", 1.0 + 1e-12),
    ("prompts.top_p", 1.0 + 1e-12),
    ("postprocess.lighting", 1.0 + 1e-12),
    ("postprocess.texture", 1.0 + 1e-12),
    ("postprocess.camera", 1.0 + 1e-12),
    ("postprocess.background_probability", 1.0 + 1e-12),
    ("postprocess.upscale_strength", 1.0 + 1e-12),
    ("downstream.dp_sample_rate", 1.0 + 1e-12),
    ("privacy.training_share", 1.0),  # all of epsilon to training would leave the evaluation nothing
    ("downstream.label_smoothing", 1.0),
)


def config_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """All dotted keys of the schema, e.g. ``privacy.epsilon``."""
    keys: list[str] = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        if is_dataclass(f.type) or (isinstance(f.default_factory, type) and is_dataclass(f.default_factory)):
            keys.extend(config_keys(f.default_factory, f"{name}."))  # type: ignore[arg-type]
        else:
            keys.append(name)
    return keys


def flat_defaults() -> dict[str, Any]:
    """The schema's defaults as a flat ``{dotted key: value}`` mapping."""
    container = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    return flatten(container)  # type: ignore[arg-type]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (what Flower does to run-config tables)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`: ``{"privacy.epsilon": 2}`` -> ``{"privacy": {"epsilon": 2}}``."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _unknown_key_error(key: str) -> ConfigError:
    valid = ", ".join(config_keys())
    return ConfigError(f"unknown config key '{key}'. Valid keys: {valid}")


def _merge(base: DictConfig, update: Mapping[str, Any] | DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise _unknown_key_error(str(exc.full_key)) from None
    except ValidationError as exc:
        key = exc.full_key or ", ".join(str(k) for k in (update.keys() if hasattr(update, "keys") else []))
        detail = (exc.msg or str(exc) or "type mismatch").splitlines()[0]
        raise ConfigError(f"{source}: wrong type for '{key}': {detail}") from None


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    flat_overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build a validated :class:`RunConfig`.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file (e.g. ``configs/default.yaml``); keys are merged onto the defaults.
    overrides : sequence of str (default: ())
        Dotlist overrides such as ``privacy.epsilon=2``, applied after the file.
    flat_overrides : mapping, optional
        ``{dotted key: value}`` overrides applied last (used by the Flower front door).

    Raises
    ------
    ConfigError
        On an unknown key, a wrong type or an invalid value; the message names the key.
    """
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}. Pass an existing YAML (see configs/)")
        cfg = _merge(cfg, OmegaConf.load(file), str(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. privacy.epsilon=2)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    for key, value in (flat_overrides or {}).items():
        cfg = _merge(cfg, unflatten({key: value}), f"run-config '{key}'")
    run_config: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    _canonical_case(run_config)
    validate(run_config)
    return run_config


def get_value(cfg: RunConfig, key: str) -> Any:
    """Read a dotted key from a config object."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _canonical_case(cfg: RunConfig) -> None:
    """Spell the :data:`CASE_INSENSITIVE_CHOICES` as in :data:`CHOICES` (``pcevolve`` -> ``PCEvolve``);
    an unknown name is left for :func:`validate` to refuse."""
    for key in CASE_INSENSITIVE_CHOICES:
        value = get_value(cfg, key)
        names = {str(choice).lower(): choice for choice in CHOICES[key]}
        canonical = names.get(str(value).strip().lower())
        if canonical is not None and canonical != value:
            section, name = key.rsplit(".", 1)
            setattr(get_value(cfg, section), name, canonical)


def validate(cfg: RunConfig) -> None:
    """Check choices and numeric ranges; raise :class:`ConfigError` naming the key."""
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
    for key, low, inclusive in _LOWER_BOUNDS:
        value = get_value(cfg, key)
        bad = not math.isfinite(value) or (value < low if inclusive else value <= low)
        if bad:
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{key} must be {relation} {low} (got {value})")
    for key, high in _UPPER_BOUNDS:
        value = get_value(cfg, key)
        if value >= high:
            raise ConfigError(f"{key} must be < {high} (got {value})")
    if cfg.feedback.task_type != "syn" and cfg.downstream.model != "cnn":  # resnet18's BatchNorm mixes examples
        raise ConfigError(
            f"feedback.task_type={cfg.feedback.task_type} trains with per-example DP-SGD, which needs "
            f"downstream.model=cnn (got {cfg.downstream.model!r}: BatchNorm breaks per-example privacy)"
        )
    if cfg.feedback.task_type != "syn" and cfg.privacy.unit != "image":  # DP-SGD clips one example, not one site
        raise ConfigError(
            f"feedback.task_type={cfg.feedback.task_type} protects one image (per-example DP-SGD); "
            "privacy.unit=site is not supported with it: use privacy.unit=image"
        )
    if cfg.privacy.mode == "secagg" and cfg.feedback.rater == "RF":
        raise ConfigError(
            "privacy.mode=secagg carries non-negative integer votes; -r RF's keep-minus-reject scores can be "
            "negative: use privacy.mode=local or central with -r RF"
        )
    g = cfg.generator
    check_names(cfg)
    if not g.output_low < g.output_high:
        raise ConfigError(f"generator.output_low ({g.output_low}) must be < generator.output_high ({g.output_high})")
    chosen = FRAMEWORKS[cfg.feedback.framework]
    if chosen.needs_llm and not cfg.prompts.llm:
        raise ConfigError(
            f"feedback.framework={chosen.name} needs an LLM: set prompts.llm (-sllm Llama3, a hub id or a local folder)"
        )
    if cfg.privacy.mode == "secagg" and not chosen.secagg:
        raise ConfigError(
            f"-f {chosen.name}'s releases do not go through SecAgg+ yet: use privacy.mode=local or central"
        )
    if not 0.0 <= cfg.feedback.mix_ratio < 1.0 or not 0.0 <= cfg.feedback.active_steer <= 1.0:
        raise ConfigError(
            f"feedback.mix_ratio must be in [0, 1) and feedback.active_steer in [0, 1] (got "
            f"{cfg.feedback.mix_ratio}, {cfg.feedback.active_steer})"
        )
    if "{name}" not in g.prompt_template:
        raise ConfigError(f"generator.prompt_template must contain {{name}} (got {g.prompt_template!r})")
    if not g.degree_end <= g.degree_start:
        raise ConfigError(f"generator.degree_end ({g.degree_end}) must be <= generator.degree_start ({g.degree_start})")


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build the config from Flower's flattened run-config (``context.run_config``).

    ``config-file`` may name a YAML. Flower hands every key of ``[tool.flwr.app.config]`` to
    the app, overridden or not, so only values that differ from the schema's defaults are
    applied on top of the file (a file value can therefore be overridden by any other value).
    """
    defaults = flat_defaults()
    file = str(run_config.get("config-file", "") or "")
    changed: dict[str, Any] = {}
    for key, value in run_config.items():
        if key == "config-file":
            continue
        if key not in defaults:
            raise _unknown_key_error(key)
        if value != defaults[key]:
            changed[key] = value
    return load_config(file or None, flat_overrides=changed)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested plain dict (for summary.json and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (what `coautogen run` hands to the ServerApp)."""
    target = Path(path)
    target.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return target
