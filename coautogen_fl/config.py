"""The one configuration schema (omegaconf structured config), loaded and validated at start-up.

Both front doors end here: `coautogen run` (a YAML from configs/ plus dotlist overrides) and
`flwr run .` (Flower's flattened run-config, see :func:`config_from_run_config`). Every value is
a plain scalar so that the same keys can live in `[tool.flwr.app.config]` of pyproject.toml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""


@dataclass
class DataConfig:
    name: str = "digits"  # "digits" (sklearn's bundled digits) or an ImageFolder path
    image_size: int = 28
    channels: int = 1
    partitioner: str = "iid"  # iid | dirichlet
    dirichlet_alpha: float = 0.5
    real_per_label: int = 0  # cap of real images per label per site (-rvpl); 0 = no cap
    test_fraction: float = 0.3  # held-out central real test split
    site_test_fraction: float = 0.2  # each site's private test split
    seed: int = 0


#: The seed project's generator names and the hub ids they stand for (-sgen).
GENERATOR_ALIASES: dict[str, str] = {
    "StableDiffusion": "runwayml/stable-diffusion-v1-5",
    "StableDiffusion2": "stabilityai/stable-diffusion-2-1-base",
    "StableDiffusionXL": "stabilityai/stable-diffusion-xl-base-1.0",
    "OpenJourney": "prompthero/openjourney",
    "FLUX": "black-forest-labs/FLUX.1-schnell",
}

#: -sllm: the seed project's LLM names and their hub ids.
LLM_ALIASES: dict[str, str] = {
    "Llama2": "meta-llama/Llama-2-7b-chat-hf",
    "Llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
}

#: -scap: the seed project's captioner names and their hub ids.
CAPTIONER_ALIASES: dict[str, str] = {
    "BlipBase": "Salesforce/blip-image-captioning-base",
    "BlipLarge": "Salesforce/blip-image-captioning-large",
    "LLaVA": "llava-hf/llava-1.5-7b-hf",
}


@dataclass
class GeneratorConfig:
    # -sgen: Glyph | Latent | HTTP | a GENERATOR_ALIASES name | a diffusers hub id (owner/name) or local
    # folder (./models/sd15) | a name registered under the "coautogen_fl.generators" entry point | "pkg.module:Class"
    name: str = "Glyph"
    seed: int = 0
    prompt_template: str = "a photo of {name}"  # diffusers/HTTP: the class prompt
    steps: int = 25  # diffusers: inference steps
    guidance_scale: float = 7.5
    batch_size: int = 8
    safety_checker: bool = False
    degree_start: float = 0.8
    degree_end: float = 0.2
    degree_step: float = 0.06
    inpaint: float = 0.0  # diffusers I2I: probability that a variation inpaints a random region instead
    inpaint_model: str = ""  # diffusers: a dedicated inpainting pipeline; "" = the generator's own weights
    model: str = ""  # Latent: TorchScript file, state dict (with factory) or trusted pickle
    factory: str = ""  # Latent: "pkg.module:callable" building the module a state dict loads into
    trust_pickle: bool = False  # Latent: allow a pickled module (pickles run code: only files you trust)
    latent_dim: int = 0  # Latent: size of z; 0 = the module's latent_dim / z_dim / nz attribute
    output_low: float = -1.0  # Latent: the range G's output lives in (mapped to [0, 1])
    output_high: float = 1.0
    perturb_scale: float = 1.0  # Latent: z step at degree 1, in units of the prior std
    api_url: str = ""  # HTTP: the image endpoint to POST to
    api_key_env: str = "COAUTOGEN_API_KEY"  # HTTP: environment variable holding the API key; "" = no key
    api_timeout_s: float = 60.0
    api_retries: int = 3
    api_backoff_s: float = 1.0
    api_requests_per_minute: float = 60.0  # 0 = no limit


@dataclass
class EmbedderConfig:
    name: str = "pixels"  # -cue: pixels | resnet18 | clip | an entry-point name | "pkg.module:Class"
    model: str = "openai/clip-vit-base-patch32"  # clip: hub id (in the local cache) or local folder
    weights: str = ""  # resnet18: a local .pth file; "" = torchvision's cache
    random_weights: bool = False  # resnet18 without pretrained weights (tests only)
    pixel_size: int = 14  # pixels: images are resized to this before flattening
    standardize: bool = True  # pixels: zero mean, unit norm per image (votes by shape, not ink)
    batch_size: int = 256


@dataclass
class FeedbackConfig:
    framework: str = "Feedback"  # -f: Gen | Feedback
    rater: str = "PE"  # -r
    rounds: int = 2  # -iter: voting rounds
    evolve: str = "auto"  # auto: distribution when the generator can fit(), else candidates.
    # distribution: votes refit the generator's sampling distribution;
    # candidates: Private Evolution, voted candidates are varied into the next pool
    candidates_per_label: int = 50  # pool size voted on per class and round
    volume_per_label: int = 100  # -vpl: final synthetic images per class
    k: int = 1  # nearest candidates each private sample votes for
    selection: str = "rank"  # sample | rank
    threshold: float = 1.0  # candidates mode: votes below threshold x aggregate noise std count as zero
    distribution_mix: float = 0.8  # distribution mode: weight of this round's moments vs the previous
    min_spread: float = 0.08  # distribution mode: smallest std (fraction of each range)
    task_type: str = "syn"  # -tt
    task_mode: str = "I2I"  # -tm: I2I | T2I


@dataclass
class PromptsConfig:
    llm: str = ""  # -sllm: Llama2 | Llama3 | hub id | local folder; "" = templates only
    per_class: int = 10  # LLM descriptions per class (GenLLM and the initial pool)
    evolve: bool = True  # T2I Feedback: the LLM rewrites voted parents' prompts
    max_new_tokens: int = 40
    temperature: float = 0.9
    top_p: float = 0.95
    captioner: str = ""  # -scap: BlipBase | BlipLarge | LLaVA | hub id | local folder | "pkg.module:Class"
    reference: str = ""  # captioner: ImageFolder of public reference images to caption into prompts
    captions_per_class: int = 20


@dataclass
class PostprocessConfig:
    domain: bool = False  # domain randomisation of every candidate (any generator)
    lighting: float = 0.3  # domain: strengths in [0, 1]; 0 disables the effect
    texture: float = 0.2
    camera: float = 0.2
    backgrounds: str = ""  # domain: folder of background images; "" = no background swap
    background_probability: float = 0.5
    upscaler: str = ""  # diffusers super-resolution or image-to-image pipeline; "" = no upscaling
    upscale_on: str = "final"  # final: the final dataset only | rounds: every round's candidates too
    upscale_steps: int = 20
    upscale_strength: float = 0.3  # image-to-image upscalers: how much the refinement may change
    clip_filter: bool = False  # drop candidates CLIP does not place in their class (p > 1/#classes)
    clip_model: str = ""  # "" = embedder.model
    max_draws: int = 4  # filter: redraws before the best-scoring rejected candidates fill the gap


@dataclass
class PrivacyConfig:
    epsilon: float = 1.0  # -eps: total for the run, per site
    delta: float = 1e-5
    mode: str = "local"  # local | central
    unit: str = "image"  # image | site
    evaluation: str = "clear"  # clear: test accuracy released without noise; noised: Gaussian, accounted


@dataclass
class FederationConfig:
    num_hospitals: int = 10
    fraction_train: float = 1.0
    timeout_s: float = 600.0
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0


@dataclass
class DownstreamConfig:
    model: str = "cnn"  # -cmodel: cnn | resnet18
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0


@dataclass
class TrackingConfig:
    out_dir: str = "runs"  # run directories are created under it
    run_name: str = ""  # "" = derived from the time and framework
    run_dir: str = ""  # exact run directory; "" = <out_dir>/<run_name>
    wandb_mode: str = "disabled"  # online | offline | disabled
    wandb_project: str = "coautogen-fl"
    wandb_entity: str = ""


@dataclass
class RunConfig:
    device: str = "cpu"  # -dev: cpu | cuda | auto
    device_id: int = 0  # -did
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("cpu", "cuda", "auto"),
    "data.channels": (1, 3),
    "data.partitioner": ("iid", "dirichlet"),
    "feedback.framework": ("Gen", "GenLLM", "Feedback"),
    "feedback.rater": ("PE",),
    "feedback.selection": ("sample", "rank"),
    "feedback.evolve": ("auto", "distribution", "candidates"),
    "postprocess.upscale_on": ("final", "rounds"),
    "feedback.task_type": ("syn",),
    "feedback.task_mode": ("I2I", "T2I"),
    "privacy.mode": ("local", "central"),
    "privacy.unit": ("image", "site"),
    "privacy.evaluation": ("clear", "noised"),
    "downstream.model": ("cnn", "resnet18"),
    "tracking.wandb_mode": ("online", "offline", "disabled"),
}

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
    ("embedder.batch_size", 1, True),
    ("feedback.rounds", 1, True),
    ("feedback.candidates_per_label", 1, True),
    ("feedback.volume_per_label", 1, True),
    ("feedback.k", 1, True),
    ("feedback.threshold", 0, True),
    ("feedback.distribution_mix", 0, False),
    ("feedback.min_spread", 0, True),
    ("privacy.epsilon", 0, False),
    ("privacy.delta", 0, False),
    ("federation.num_hospitals", 1, True),
    ("federation.fraction_train", 0, False),
    ("federation.timeout_s", 0, False),
    ("federation.client_num_cpus", 1, True),
    ("federation.client_num_gpus", 0, True),
    ("downstream.epochs", 1, True),
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
)
_UPPER_BOUNDS: tuple[tuple[str, float], ...] = (
    ("data.test_fraction", 1.0),
    ("data.site_test_fraction", 1.0),
    ("privacy.delta", 1.0),
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
    validate(run_config)
    return run_config


def get_value(cfg: RunConfig, key: str) -> Any:
    """Read a dotted key from a config object."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


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
    g = cfg.generator
    from .registry import check_names  # the registry knows built-in, aliased and plugged-in names

    check_names(cfg)
    if not g.output_low < g.output_high:
        raise ConfigError(f"generator.output_low ({g.output_low}) must be < generator.output_high ({g.output_high})")
    if cfg.feedback.framework == "GenLLM" and not cfg.prompts.llm:
        raise ConfigError("feedback.framework=GenLLM needs an LLM: set prompts.llm (-sllm Llama3, a hub id or a local folder)")
    if "{name}" not in g.prompt_template:
        raise ConfigError(f"generator.prompt_template must contain {{name}} (got {g.prompt_template!r})")
    if not g.degree_end <= g.degree_start:
        raise ConfigError(f"generator.degree_end ({g.degree_end}) must be <= generator.degree_start ({g.degree_start})")
    if cfg.feedback.volume_per_label < cfg.feedback.candidates_per_label:
        raise ConfigError(
            "feedback.volume_per_label must be >= feedback.candidates_per_label "
            f"(got {cfg.feedback.volume_per_label} < {cfg.feedback.candidates_per_label})"
        )


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
