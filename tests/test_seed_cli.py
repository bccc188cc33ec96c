"""The seed project's command line: every flag maps to a config key or is accepted with a note,
names are case-insensitive, and the seed's own example command runs as written, with stand-ins:
a digits ImageFolder as ./dataset/COVIDx, a tiny random-weight Stable Diffusion in the Hugging Face
cache under the id StableDiffusion stands for, and random ResNet-18 weights in the torch cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coautogen_fl.config import GENERATOR_ALIASES, load_config
from simulations.cli import dataset_folder, overrides_from_args, parse_args, seed_notes
from simulations.cli import main as cli_main
from simulations.seed_flags import SEED_FLAGS, markdown_table

#: The seed README's example, verbatim.
SEED_EXAMPLE = (
    "-tt syn -tm I2I -f Feedback -did 1 -eps 5 -rvpl 10 -vpl 100 -sgen StableDiffusion -cret 1 "
    "-cue ResNet18 -cmodel ResNet18 -cmp 1 -cef 1 -cdata COVIDx -r PE"
)


def test_every_seed_flag_parses_and_lands_on_its_key_or_a_note():
    args = parse_args(
        [
            "run",
            "-cret",
            "1",
            "-cmp",
            "1",
            "-cef",
            "0",
            "-cbs",
            "8",
            "-clr",
            "0.01",
            "-ce",
            "3",
            "-is",
            "0.7",
            "-isa",
            "0.05",
            "-isth",
            "0.3",
            "-uipa",
            "1",
            "-ipas",
            "0.2",
            "-dth",
            "0.5",
            "-hth",
            "2",
            "-tau",
            "10",
            "-eg",
            "2",
            "-tc",
            "20",
            "-nipp",
            "4",
            "-ims",
            "32",
            "-tr",
            "0.25",
            "-pml",
            "77",
            "-cml",
            "40",
            "-cmodel",
            "ResNet18",
            "-cue",
            "CLIP",
            "-sgen",
            "stablediffusion",
        ]
    )
    cfg = load_config(overrides=overrides_from_args(args))
    d, g = cfg.downstream, cfg.generator
    assert (d.pretrained, d.encoder_fixed, d.batch_size, d.lr, d.epochs, d.model) == (
        True,
        False,
        8,
        0.01,
        3,
        "resnet18",
    )
    assert (g.degree_start, g.degree_step, g.degree_end, g.batch_size, g.name) == (0.7, 0.05, 0.3, 4, "StableDiffusion")
    assert (cfg.data.image_size, cfg.data.test_fraction, cfg.embedder.name) == (32, 0.25, "clip")
    notes = seed_notes(args)
    for flag in ("-cret", "-uipa", "-ipas", "-dth", "-hth", "-tau", "-eg", "-tc", "-pml", "-cml"):
        assert sum(line.startswith(f"coautogen: note: {flag} is ignored: ") for line in notes) == 1, (flag, notes)


def test_long_names_and_booleans_as_the_seed_wrote_them():
    args = parse_args(
        ["run", "--client_model_pretrained", "0", "--client_encoder_fixed", "True", "--volume_per_label", "8"]
    )
    cfg = load_config(overrides=overrides_from_args(args))
    assert (cfg.downstream.pretrained, cfg.downstream.encoder_fixed, cfg.feedback.volume_per_label) == (False, True, 8)
    with pytest.raises(Exception, match="-cmp 'maybe' is not a boolean"):
        overrides_from_args(parse_args(["run", "-cmp", "maybe"]))


def test_cdata_is_looked_up_under_the_dataset_dir(tmp_path, monkeypatch):
    (tmp_path / "dataset" / "COVIDx").mkdir(parents=True)
    (tmp_path / "elsewhere" / "Chest").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert dataset_folder("COVIDx", None) == str((tmp_path / "dataset" / "COVIDx").resolve())
    assert dataset_folder("Chest", str(tmp_path / "elsewhere")) == str((tmp_path / "elsewhere" / "Chest").resolve())
    assert dataset_folder("digits", None) == "digits" and dataset_folder("Missing", None) == "Missing"


def test_docs_cli_holds_the_table_of_every_flag():
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert markdown_table() in text, "regenerate docs/cli.md's table: python -m simulations.seed_flags"
    assert all(f"`{f.short}`, `{f.long}`" in text for f in SEED_FLAGS)


# ---------------------------------------------------------------------------------- the seed's example
def digits_image_folder(root: Path, classes=("covid", "normal", "pneumonia"), per_class=30) -> None:
    """Three digit classes as a COVIDx stand-in (ImageFolder layout)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:per_class]):
            Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((32, 32)).save(folder / f"{i}.png")


def hub_cache_with(cache: Path, repo_id: str, build) -> None:
    """A Hugging Face cache holding ``repo_id`` (what `huggingface-cli download` leaves behind)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    build(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.flower
def test_the_seed_example_command_runs_as_written(tmp_path, monkeypatch, capsys):
    from torchvision.models import resnet18

    from tiny_diffusers import build_tiny_pipeline

    monkeypatch.chdir(tmp_path)
    digits_image_folder(tmp_path / "dataset" / "COVIDx")
    hub_cache_with(tmp_path / "hf", GENERATOR_ALIASES["StableDiffusion"], build_tiny_pipeline)
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(torch_home / "hub"))  # this process read TORCH_HOME already
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # ... and HF_HUB_CACHE

    small = [
        "--num-hospitals",
        "3",
        "feedback.rounds=1",
        "feedback.candidates_per_label=4",
        "generator.steps=2",
        "generator.batch_size=20",
        "data.image_size=32",
        "downstream.epochs=1",
    ]  # a CPU-sized run; flags as written
    code = cli_main(["run", "--out", str(tmp_path / "runs"), "--name", "seed", *SEED_EXAMPLE.split(), *small])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-4000:] + printed.err[-2000:]
    assert "coautogen: note: -cret is ignored" in printed.out
    summary = json.loads((tmp_path / "runs" / "seed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["generator"] == "StableDiffusion"
    assert summary["embedder"] == "resnet18" and summary["epsilon"] == 5.0
    assert summary["num_synthetic"] == 3 * 100  # -vpl 100 per class, three classes
    cfg = load_config(tmp_path / "runs" / "seed" / "config.yaml")
    assert (cfg.downstream.model, cfg.downstream.pretrained, cfg.downstream.encoder_fixed) == ("resnet18", True, True)
    assert cfg.data.real_per_label == 10 and cfg.data.name == str((tmp_path / "dataset" / "COVIDx").resolve())


def test_T_repeats_with_shifted_seeds_and_reports_mean_and_sd(tmp_path, monkeypatch, capsys):
    import simulations.cli as cli

    seen = []

    def fake_run(args, out, started):  # what one run leaves: its summary, under its own name
        cfg = load_config(args.config, cli.overrides_from_args(args))
        seen.append((args.name, cfg.generator.seed, cfg.downstream.seed))
        run_dir = Path(cfg.tracking.out_dir) / args.name
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"accuracy_real_test": [0.5, 0.6, 0.7][len(seen) - 1]}))
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    code = cli_main(["run", "--out", str(tmp_path), "--name", "rep", "-T", "3", "generator.seed=10"])
    assert code == 0
    assert seen == [("rep-t0", 10, 0), ("rep-t1", 11, 1), ("rep-t2", 12, 2)]
    report = json.loads((tmp_path / "rep-repeats.json").read_text())
    assert report["mean"] == pytest.approx(0.6) and report["sd"] == pytest.approx(0.1)
    assert "accuracy_real_test over 3 runs: mean 0.6000, sd 0.1000" in capsys.readouterr().out
