"""The run configuration's schema: one dataclass per section (omegaconf structured config), with
the defaults of every key, the seed project's model names and :class:`ConfigError`. Loading and
validation live in :mod:`coautogen_fl.config`, which re-exports everything here.

This module imports nothing of the project, so that the registry (which validates component
names) and the config (which calls it) both build on it without importing each other both ways.

Every value is a plain scalar so that the same keys can live in `[tool.flwr.app.config]` of
pyproject.toml (regenerate it with `python scripts/sync_flwr_config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""


@dataclass
class DataConfig:
    # "digits" (sklearn's bundled digits), "digits-shifted" (scale workload: 50,280 shifted) or an ImageFolder path
    name: str = "digits"
    image_size: int = 28
    channels: int = 1
    partitioner: str = "iid"  # iid | dirichlet
    dirichlet_alpha: float = 0.5
    real_per_label: int = 0  # cap of real images per label per site (-rvpl); 0 = no cap
    test_fraction: float = 0.3  # held-out central real test split
    site_test_fraction: float = 0.2  # each site's private test split
    seed: int = 0
    on_bad_image: str = "skip"  # skip | error: an unreadable image file is skipped (and logged) or stops the load


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
    glyph_style: str = "auto"  # Glyph: pen (handwritten pen forms) | fonts (TrueType) | both | auto (pen for digits)
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
    appearance: float = 0.0  # pixels: weight of 4 appended ink statistics (intensity, contrast, noise); 0 = shape only
    batch_size: int = 256


@dataclass
class FeedbackConfig:
    framework: str = "Feedback"  # -f: Gen | GenLLM | Feedback | Filter | Active (coautogen_fl/frameworks.py)
    rater: str = "PE"  # -r: PE (own-class nearest votes) | RF (keep minus reject over all classes) |
    # PCEvolve (own-class votes by contrastive utility against public class prototypes); any case
    rounds: int = 2  # -iter: voting rounds
    evolve: str = "auto"  # auto: distribution when the generator can fit(), else candidates.
    # distribution: votes refit the generator's sampling distribution;
    # candidates: Private Evolution, voted candidates are varied into the next pool
    candidates_per_label: int = 50  # pool size voted on per class and round
    volume_per_label: int = 500  # -vpl: final synthetic images per class, drawn after the last vote (free in privacy)
    k: int = 5  # nearest candidates each private sample votes for (weight 1/sqrt(k): sensitivity 1 for any k)
    selection: str = "rank"  # sample | rank
    threshold: float = 1.0  # candidates mode: votes below threshold x aggregate noise std count as zero
    distribution_mix: float = 0.8  # distribution mode: weight of this round's moments vs the previous
    min_spread: float = 0.08  # distribution mode: smallest std (fraction of each range)
    refit: str = "per_class"  # distribution mode (Glyph): per_class | shared, what the votes refit
    task_type: str = "syn"  # -tt
    task_mode: str = "I2I"  # -tm: I2I | T2I
    # -f Active (coautogen_fl/active.py): the model trained each round steers the next pool
    active_steer: float = 0.5  # how far the sites' noised per-class errors move volume and variation (0 = uniform)
    active_oversample: int = 4  # candidates drawn per one sent: the model's most uncertain are sent to the vote
    active_epochs: int = 5  # epochs of the per-round model (the final one trains with downstream.epochs)
    mix_ratio: float = 0.25  # share of fresh synthetic images beside the accumulated (vote-kept) ones, per class


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
    mode: str = "local"  # local | central | secagg (Flower's SecAgg+: each site adds a discrete-Gaussian share)
    # (-tt real/mix with central: each round one pooled DP-SGD step on the sites' clipped gradient sums)
    unit: str = "image"  # image | site
    evaluation: str = "noised"  # noised: Gaussian, charged; clear: only sites whose node config allows it answer
    secagg_threshold: float = (
        0.6  # secagg: sites of each SecAgg+ neighbourhood (all sampled, at most 25) that must stay alive
    )
    secagg_vote_cap: int = 1024  # secagg: clean votes per candidate clipped to this (public), so sums never wrap
    # secagg, -tt real/mix: each coordinate of a site's clipped gradient sum is clipped to +-this x
    # downstream.dp_max_grad_norm (public), so secure sums never wrap
    secagg_gradient_cap: float = 64.0
    training_share: float = 0.0  # -tt real/mix: share of epsilon for DP-SGD; 0 = real 0.9 (rest: evaluation), mix 0.5


@dataclass
class FederationConfig:
    num_hospitals: int = 10
    fraction_train: float = 1.0
    timeout_s: float = 600.0
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    min_sites: int = (
        0  # valid vote replies a round needs, else the run stops (non-zero); 0 = more than half the sampled
    )
    max_site_images: int = 100_000  # public bound on one site's private images (rejects implausible votes); 0 = none


@dataclass
class DownstreamConfig:
    model: str = "cnn"  # -cmodel: cnn | resnet18
    pretrained: bool = False  # -cmp: resnet18 starts from ImageNet weights (downstream.weights or torchvision's cache)
    weights: str = ""  # -cmp: a local ImageNet ResNet-18 .pth; "" = torchvision's cache (nothing is downloaded)
    encoder_fixed: bool = False  # -cef: train only the classifier's last layer
    epochs: int = 0  # 0 = derived from the final volume: 30,000 / images, within [3, 30] (downstream.derived_epochs)
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    # -tt real/mix: federated DP-SGD at the sites (docs/privacy.md; defaults from the grid in docs/benchmarks.md)
    dp_rounds: int = 10  # federated rounds (one global average each)
    dp_local_steps: int = 5  # DP-SGD steps per site and round
    dp_sample_rate: float = 0.25  # public Poisson rate: each private image joins a step with this probability
    dp_max_grad_norm: float = 1.0  # per-example clipping bound
    dp_lr: float = 1e-2
    dp_optimizer: str = "adam"  # adam | sgd (steps on the noised gradient sum)
    mix_synthetic_steps: int = (
        0  # -tt mix: server Adam steps on the synthetic data after each average (0: pretrain only; measured best)
    )
    augment: float = 0.5  # strength of random affine moves of each training batch (shift, turn, scale); 0 = none
    label_smoothing: float = 0.1  # cross-entropy label smoothing against the synthetic-to-real gap


@dataclass
class TrackingConfig:
    out_dir: str = "runs"  # run directories are created under it
    run_name: str = ""  # "" = derived from the time and framework
    run_dir: str = ""  # exact run directory; "" = <out_dir>/<run_name>
    resume: bool = False  # continue the run in run_dir from its checkpoint.json (coautogen run --resume RUN_DIR)
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
