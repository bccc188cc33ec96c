"""Whole runs (real ClientApp handlers, in process) with the tiny random-weight models built in
code and loaded through the real loading paths, one per model-driven feature of the generator:
GenLLM, LLM prompt evolution, captioned reference prompts, inpainting and final upscaling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord
from PIL import Image

from strategies.server_app import build_strategy

from strategy_helpers import (
    InProcessGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)
from tiny_diffusers import build_tiny_inpaint_pipeline, build_tiny_pipeline, build_tiny_upscaler
from tiny_text_models import build_tiny_blip, build_tiny_gpt2

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "sd": str(build_tiny_pipeline(root / "sd")),
        "inpaint": str(build_tiny_inpaint_pipeline(root / "inpaint")),
        "upscaler": str(build_tiny_upscaler(root / "x4")),
        "gpt2": str(build_tiny_gpt2(root / "gpt2")),
        "blip": str(build_tiny_blip(root / "blip")),
    }


def run(tmp_path, monkeypatch, *overrides: str) -> tuple[object, list[dict]]:
    from clients import client_app

    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config("generator.steps=2", "generator.batch_size=16", "data.image_size=32", *overrides)
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    assert s.dropped == []
    lines = (tmp_path / "run" / "synthetic" / "index.jsonl").read_text().splitlines()
    return s, [json.loads(line) for line in lines]


def test_genllm_draws_llm_written_prompts_for_every_class(tmp_path, monkeypatch, models) -> None:
    s, entries = run(
        tmp_path,
        monkeypatch,
        "feedback.framework=GenLLM",
        f"generator.name={models['sd']}",
        f"prompts.llm={models['gpt2']}",
        "prompts.per_class=4",
        "feedback.task_mode=T2I",
    )
    assert s.rounds == 1 and all(site.rounds_answered == 0 for site in s.sites.values())  # Gen: no votes
    assert len(entries) == 50
    for e in entries:
        g = e["genotype"]
        assert g["prompt_source"]["source"] == "llm" and g["prompt_source"]["model"] == models["gpt2"]
        assert CLASSES[e["label"]] in g["prompt"].split() or CLASSES[e["label"]] in g["prompt"]
    prompts = {e["genotype"]["prompt"] for e in entries}
    templates = {f"a photo of {c}" for c in CLASSES}
    assert prompts - templates, "the LLM wrote no prompt beyond the templates"
    from coautogen_fl.generation.pipeline import save_prompt_pool

    pool = json.loads(open(save_prompt_pool(s.evolution.generator, str(tmp_path))).read())
    assert pool["settings"]["source"] == "llm" and sorted(pool["per_class"], key=int) == CLASSES
    assert prompts <= {
        p for descriptions in pool["per_class"].values() for p in descriptions
    }  # every prompt used is recorded


def test_t2i_feedback_evolves_the_voted_prompts_with_the_llm(tmp_path, monkeypatch, models) -> None:
    s, entries = run(
        tmp_path,
        monkeypatch,
        f"generator.name={models['sd']}",
        f"prompts.llm={models['gpt2']}",
        "prompts.per_class=3",
        "feedback.task_mode=T2I",
    )
    assert all(site.rounds_answered == 2 for site in s.sites.values())
    assert all(e["genotype"]["mode"] == "t2i" and "parent_prompt" in e["genotype"] for e in entries)
    assert any(e["genotype"]["prompt"] != e["genotype"]["parent_prompt"] for e in entries)  # rewritten by the LLM


def test_captioned_reference_images_become_prompts(tmp_path, monkeypatch, models) -> None:
    reference = tmp_path / "reference"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (reference / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(reference / name / f"{i}.png")
    s, entries = run(
        tmp_path,
        monkeypatch,
        "feedback.framework=Gen",
        f"generator.name={models['sd']}",
        f"prompts.captioner={models['blip']}",
        f"prompts.reference={reference}",
    )
    captioned = [e for e in entries if e["genotype"]["prompt"].startswith(f"{CLASSES[e['label']]}, ")]
    assert captioned, "no candidate used a caption of a reference image"


def test_upscaler_on_every_round(tmp_path, monkeypatch, models) -> None:
    s, entries = run(
        tmp_path,
        monkeypatch,
        f"generator.name={models['sd']}",
        f"postprocess.upscaler={models['upscaler']}",
        "postprocess.upscale_on=rounds",
        "postprocess.upscale_steps=2",
    )
    assert s.final.upscaler is None  # the stage already ran on every candidate
    assert all(e["genotype"]["upscale"]["size"] == 32 and e["genotype"]["mode"] == "i2i" for e in entries)


def test_inpainting_variations_with_a_dedicated_pipeline(tmp_path, monkeypatch, models) -> None:
    s, entries = run(
        tmp_path,
        monkeypatch,
        f"generator.name={models['sd']}",
        "generator.inpaint=1.0",
        f"generator.inpaint_model={models['inpaint']}",
    )
    assert s.evolution.evolve == "candidates"  # diffusers has no fit(): auto -> Private Evolution
    assert all(e["genotype"]["mode"] == "inpaint" and len(e["genotype"]["mask"]) == 4 for e in entries)


def test_final_dataset_upscaled(tmp_path, monkeypatch, models) -> None:
    s, entries = run(
        tmp_path,
        monkeypatch,
        "feedback.framework=Gen",
        f"generator.name={models['sd']}",
        f"postprocess.upscaler={models['upscaler']}",
        "postprocess.upscale_steps=2",
    )
    assert all(e["genotype"]["upscale"]["model"] == models["upscaler"] for e in entries)
    image = Image.open(next((tmp_path / "run" / "synthetic").rglob("*.png")))
    assert image.size == (32, 32)
    assert 0.0 <= s.final.accuracy_real_test <= 1.0
