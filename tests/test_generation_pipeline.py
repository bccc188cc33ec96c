"""The server's generator as a config assembles it: post-processing stages and the CLIP filter
around any generator, and a Feedback run with them through the real ClientApp handlers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord

from coautogen_fl.config import load_config
from coautogen_fl.embedding.clip import CLIPFilter
from coautogen_fl.generation import build_generator
from coautogen_fl.generation.postprocess import PostProcessedGenerator
from strategies.server_app import build_strategy

from strategy_helpers import (
    InProcessGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)
from tiny_clip import build_tiny_clip

NAMES = [str(i) for i in range(10)]
SOLID = "generator.name=plugin_pkg.components:SolidGenerator"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny-clip")))


def test_domain_randomisation_wraps_glyph_and_keeps_distribution_evolution() -> None:
    cfg = load_config(overrides=["postprocess.domain=true", "postprocess.lighting=0.5", "postprocess.camera=0.0"])
    generator = build_generator(cfg, NAMES)
    assert isinstance(generator, PostProcessedGenerator)
    candidates = generator.random(3, 4)
    assert all("domain" in c.genotype and c.genotype["domain"] for c in candidates)
    assert callable(getattr(generator, "fit", None))  # forwarded: feedback.evolve=auto stays distribution
    plain = build_generator(load_config(), NAMES).random(3, 4)
    assert not np.allclose(np.stack([c.image for c in candidates]), np.stack([c.image for c in plain]))


def test_clip_filter_from_config_keeps_only_candidates_clip_places_in_their_class(clip_folder) -> None:
    cfg = load_config(
        overrides=[
            SOLID,
            "data.channels=3",
            "data.image_size=16",
            "postprocess.clip_filter=true",
            f"embedder.model={clip_folder}",
            "postprocess.max_draws=2",
        ]
    )
    generator = build_generator(cfg, NAMES)
    clip = next(f for f in generator.filters if isinstance(f, CLIPFilter))
    for label in range(10):
        out = generator.random(label, 3)
        assert len(out) == 3 and all(c.label == label for c in out)
        passed = clip.keep(out)
        stats = generator.filter_stats["calls"][-1]
        # Either everything returned passed, or the shortfall was filled (and counted) from the best rejected.
        assert passed.all() or stats["filled"] == int((~passed).sum())


def test_feedback_run_with_postprocessing_and_clip_embedder(tmp_path, monkeypatch, clip_folder) -> None:
    from clients import client_app

    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(
        "postprocess.domain=true", "embedder.name=clip", f"embedder.model={clip_folder}", "data.image_size=16"
    )
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    assert s.dropped == [] and all(site.rounds_answered == 2 for site in s.sites.values())
    entries = [json.loads(line) for line in (tmp_path / "run" / "synthetic" / "index.jsonl").read_text().splitlines()]
    assert len(entries) == 5 * 10 and all("domain" in e["genotype"] for e in entries)
    assert s.evolution.evolve == "distribution" and s.evolution.payload()[0].shape[1] == 16  # CLIP projection dim


def test_clip_filter_counts_reach_the_round_metrics(tmp_path, monkeypatch, clip_folder) -> None:
    from clients import client_app
    from coautogen_fl.tracking import read_metrics

    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(
        SOLID, "data.channels=3", "data.image_size=16", "postprocess.clip_filter=true", f"embedder.model={clip_folder}"
    )
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    rounds = read_metrics(tmp_path / "run")
    assert len(rounds) == 2 and all(r["filter"]["drawn"] >= r["filter"]["kept"] for r in rounds)
    assert rounds[-1]["filter"]["drawn"] >= 3 * 10 * 2  # at least the initial pool and one round of children


@pytest.mark.parametrize("evolve", ["auto", "candidates"])
def test_feedback_run_with_a_latent_generator_from_torchscript(tmp_path, monkeypatch, evolve) -> None:
    """-sgen Latent generator.model=g.pt: a TorchScript G(z) through the whole Feedback loop."""
    import torch

    from clients import client_app

    from tiny_latent_models import build_unconditional

    monkeypatch.setattr(client_app, "_SITES", {})
    model = tmp_path / "g.pt"
    torch.jit.save(torch.jit.script(build_unconditional()), str(model))
    cfg = small_config(
        "generator.name=Latent", f"generator.model={model}", f"feedback.evolve={evolve}", "data.image_size=16"
    )
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    assert s.dropped == [] and all(site.rounds_answered == 2 for site in s.sites.values())
    assert s.evolution.evolve == ("distribution" if evolve == "auto" else "candidates")
    entries = [json.loads(line) for line in (tmp_path / "run" / "synthetic" / "index.jsonl").read_text().splitlines()]
    assert len(entries) == 50 and all(len(e["genotype"]["z"]) == 6 for e in entries)
    ops = {e["genotype"]["op"] for e in entries}
    assert ops == {"sample"} if evolve == "auto" else ops <= {"perturb", "interpolate", "direction"}
    generator = s.evolution.generator
    if evolve == "auto":  # the votes moved each class's latent distribution away from the N(0, I) prior
        assert max(generator.describe()["mean_norm"]) > 0.0


def test_clip_filter_shares_the_clip_embedders_weights(tmp_path, clip_folder) -> None:
    """-cue clip with postprocess.clip_filter: the server loads CLIP once, for both."""
    cfg = small_config(
        SOLID,
        "data.channels=3",
        "data.image_size=16",
        "postprocess.clip_filter=true",
        "embedder.name=clip",
        f"embedder.model={clip_folder}",
    )
    s = build_strategy(cfg, tmp_path / "run")
    clip = next(f for f in s.evolution.generator.filters if isinstance(f, CLIPFilter))
    assert clip.embedder.model is s.evolution.embedder.model
