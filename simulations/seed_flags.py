"""The seed project's command-line flags: one table drives `coautogen run`'s parser, the value
conversions, the notes on flags that mean nothing here, and the table in docs/cli.md.

The seed parsed booleans with ``type=bool`` (so ``-cmp 0`` meant True); here ``1/true/yes`` mean
true and ``0/false/no`` false. Model names are case-insensitive (``ResNet18`` = ``resnet18``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from coautogen_fl.config import GENERATOR_ALIASES
from coautogen_fl.frameworks import FRAMEWORKS
from coautogen_fl.registry import BUILTIN


def boolean(value: str) -> str:
    """The seed's ``type=bool`` flags: 1/true/yes or 0/false/no (any case)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return "true"
    if text in ("0", "false", "no"):
        return "false"
    raise ValueError(f"{value!r} is not a boolean; use 1 or 0")


def lower(value: str) -> str:
    """Model names, case-insensitive: ResNet18 -> resnet18, CLIP -> clip, CNN -> cnn."""
    return str(value).strip().lower()


def generator_name(value: str) -> str:
    """-sgen, case-insensitive for the built-in and the seed's names (stablediffusion ->
    StableDiffusion, glyph -> Glyph); hub ids and folders are kept as given."""
    names = {n.lower(): n for n in (*BUILTIN["generator"], *GENERATOR_ALIASES)}
    return names.get(str(value).strip().lower(), str(value).strip())


@dataclass(frozen=True)
class SeedFlag:
    """One flag of the seed's parser.

    Attributes
    ----------
    short, long : str
        The seed's names (``-cmp``, ``--client_model_pretrained``).
    key : str or None
        The config key it sets; None for a flag that means nothing here (``note`` says why).
    meaning : str
        What it does here (docs/cli.md).
    convert : callable or None
        Turns the given text into the config value (booleans, lower-case names).
    note : str
        For an ignored flag: the one line printed when it is given.
    """

    short: str
    long: str
    key: Optional[str]
    meaning: str
    convert: Optional[Callable[[str], str]] = None
    note: str = ""


SEED_FLAGS: tuple[SeedFlag, ...] = (
    # general
    SeedFlag("-f", "--framework", "feedback.framework", " | ".join(FRAMEWORKS)),
    SeedFlag(
        "-r",
        "--rater",
        "feedback.rater",
        "the rater of the votes: PE | RF (the Real Filter made DP) | PCEvolve (public prototypes); any case",
    ),
    SeedFlag("-tt", "--task_type", "feedback.task_type", "syn | real | mix"),
    SeedFlag("-tm", "--task_mode", "feedback.task_mode", "I2I | T2I (diffusers generators)"),
    SeedFlag("-dev", "--device", "device", "cpu | cuda | auto", lower),
    SeedFlag("-did", "--device_id", "device_id", "the CUDA device index"),
    SeedFlag("-iter", "--iterations", "feedback.rounds", "voting rounds"),
    SeedFlag("-eps", "--epsilon", "privacy.epsilon", "the run's total epsilon per site (the seed's was per iteration)"),
    SeedFlag(
        "-rvpl",
        "--real_volume_per_label",
        "data.real_per_label",
        "private images per label each site votes with (0 = all)",
    ),
    SeedFlag("-vpl", "--volume_per_label", "feedback.volume_per_label", "final synthetic images per label"),
    SeedFlag("-T", "--times", "repeat", "repeat the run T times (seeds +0..T-1); report mean and sd of the accuracy"),
    SeedFlag("-tr", "--test_ratio", "data.test_fraction", "share of the data held out as the central test split"),
    SeedFlag("-ims", "--image_max_size", "data.image_size", "side images are resized to"),
    SeedFlag("-ddir", "--dataset_dir", "dataset_dir", "folder where -cdata NAME is looked up (default ./dataset)"),
    # server generator
    SeedFlag(
        "-sgen",
        "--server_generator",
        "generator.name",
        "StableDiffusion, OpenJourney, ... | Glyph | a hub id or folder",
        generator_name,
    ),
    SeedFlag(
        "-sllm", "--server_llm", "prompts.llm", "the LLM that writes prompts: Llama2 | Llama3 | a hub id or folder"
    ),
    SeedFlag("-scap", "--server_captioner", "prompts.captioner", "the captioner of public reference images"),
    SeedFlag("-nipp", "--num_images_per_prompt", "generator.batch_size", "images per generator call"),
    SeedFlag("-is", "--i2i_strength", "generator.degree_start", "image-to-image strength of the first round"),
    SeedFlag("-isa", "--i2i_strength_anneal", "generator.degree_step", "strength taken off per round"),
    SeedFlag("-isth", "--i2i_strength_threshold", "generator.degree_end", "the strength it anneals down to"),
    # client (the downstream model and the embedder)
    SeedFlag("-cdata", "--client_dataset", "data.name", "digits | an ImageFolder path | a folder name under -ddir"),
    SeedFlag("-cmodel", "--client_model", "downstream.model", "the downstream classifier: cnn | resnet18", lower),
    SeedFlag(
        "-cmp", "--client_model_pretrained", "downstream.pretrained", "start resnet18 from ImageNet weights", boolean
    ),
    SeedFlag(
        "-cef", "--client_encoder_fixed", "downstream.encoder_fixed", "train the classifier's last layer only", boolean
    ),
    SeedFlag(
        "-cue",
        "--client_use_embedding",
        "embedder.name",
        "the space private images vote in: pixels | resnet18 | clip",
        lower,
    ),
    SeedFlag("-cbs", "--client_batch_size", "downstream.batch_size", "downstream training batch size"),
    SeedFlag("-clr", "--client_learning_rate", "downstream.lr", "downstream training learning rate"),
    SeedFlag("-ce", "--client_epochs", "downstream.epochs", "downstream training epochs (0 = derived from the volume)"),
    # accepted, meaning nothing here
    SeedFlag(
        "-cret",
        "--client_retrain",
        None,
        "(ignored)",
        boolean,
        "the downstream model is trained once, on the final dataset, after the last round: there is nothing to retrain",
    ),
    SeedFlag(
        "-eg",
        "--eval_gap",
        None,
        "(ignored)",
        None,
        "the downstream model is evaluated once, after the last round: "
        "every evaluation at the sites is a charged release",
    ),
    SeedFlag("-tc", "--top_count", None, "(ignored)", None, "there is no auto-break: the run does its -iter rounds"),
    SeedFlag(
        "-ab", "--auto_break", None, "(ignored)", boolean, "there is no auto-break: the run does its -iter rounds"
    ),
    SeedFlag("-ts", "--timestamp", None, "(ignored)", None, "run directories are named by --name (or the time)"),
    SeedFlag(
        "-ug",
        "--use_generated",
        None,
        "(ignored)",
        boolean,
        "resume a stopped run with `coautogen run --resume RUN_DIR`",
    ),
    SeedFlag(
        "-oa",
        "--online_api",
        None,
        "(ignored)",
        boolean,
        "an online image API is the HTTP generator: -sgen HTTP generator.api_url=...",
    ),
    SeedFlag(
        "-pml",
        "--prompt_max_length",
        None,
        "(ignored)",
        None,
        "prompts are cut at the generator's own tokenizer limit (77 CLIP tokens for Stable Diffusion)",
    ),
    SeedFlag("-cml", "--caption_max_length", None, "(ignored)", None, "captions are cut at prompts.max_new_tokens"),
    SeedFlag("-uipa", "--use_IPAdapter", None, "(ignored)", boolean, "IP-Adapter conditioning is not built here"),
    SeedFlag("-ipas", "--IPAdapter_scale", None, "(ignored)", None, "IP-Adapter conditioning is not built here"),
    SeedFlag(
        "-tau",
        "--tau",
        None,
        "(ignored)",
        None,
        "-r PCEvolve here is calibrated by the public scale s2, no temperature",
    ),
    SeedFlag(
        "-dth",
        "--distance_threshold",
        None,
        "(ignored)",
        None,
        "votes are thresholded against the aggregate noise (feedback.threshold), not a distance",
    ),
    SeedFlag(
        "-hth",
        "--hit_threshold",
        None,
        "(ignored)",
        None,
        "votes are thresholded against the aggregate noise (feedback.threshold), not a hit count",
    ),
    SeedFlag("-s", "--selector", None, "(ignored)", None, "selection is feedback.selection (rank | sample)"),
    SeedFlag(
        "-cuf", "--client_use_filtered", None, "(ignored)", boolean, "-f Filter always trains on the filtered data"
    ),
    SeedFlag(
        "-caf",
        "--client_accumulate_filter",
        None,
        "(ignored)",
        boolean,
        "-f Filter always accumulates over its -iter rounds",
    ),
    SeedFlag(
        "-cst",
        "--client_send_topk",
        None,
        "(ignored)",
        boolean,
        "sites never send their top-k candidates: only charged, noised votes leave a site",
    ),
    SeedFlag(
        "-ctpl",
        "--client_topk_per_label",
        None,
        "(ignored)",
        None,
        "sites never send their top-k candidates: only charged, noised votes leave a site",
    ),
)

#: Flags handled by `coautogen run` itself rather than a config key.
CLI_KEYS = {"repeat", "dataset_dir"}


def by_dest() -> dict[str, SeedFlag]:
    """The table by argparse destination (the config key, or ``ignored:<long name>``)."""
    return {dest(flag): flag for flag in SEED_FLAGS}


def dest(flag: SeedFlag) -> str:
    return flag.key or f"ignored:{flag.long.lstrip('-')}"


def markdown_table() -> str:
    """docs/cli.md's table: seed flag, config key, meaning (tests check the file holds it)."""
    lines = ["| seed flag | config key | here |", "|---|---|---|"]
    for f in SEED_FLAGS:
        key = f"`{f.key}`" if f.key and f.key not in CLI_KEYS else ("`coautogen run` itself" if f.key else "ignored")
        meaning = (f.meaning if f.key else f"ignored: {f.note}").replace("|", "\\|")  # a pipe would split the cell
        lines.append(f"| `{f.short}`, `{f.long}` | {key} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m simulations.seed_flags: the table of docs/cli.md
    print(markdown_table(), end="")
