"""The Active framework (-f Active): DP per-class errors released with the votes, steered
volume and variation, uncertainty sampling, the mixing ratio."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from clients import client_app
from clients.wire import from_content
from coautogen_fl import protocol as P
from coautogen_fl.active import ActiveLoop, class_degrees, most_uncertain, volume_shares
from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.downstream import build_classifier, class_errors, state_dict_to_numpy
from coautogen_fl.generation.glyph import GlyphGenerator
from coautogen_fl.rater import vote_histogram
from simulations.cli import main as cli_main
from strategies.server_app import build_strategy

from strategy_helpers import (
    InProcessGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
    train_messages,
    vote_reply,
)


def constant_model(predicted: int, num_classes: int = 10) -> torch.nn.Module:
    """The downstream cnn made to predict ``predicted`` for every image (zero weights, one bias)."""
    model = build_classifier("cnn", num_classes, 1, 28, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias[predicted] = 5.0
    return model


def test_volume_shares_move_toward_the_classes_with_errors():
    np.testing.assert_allclose(volume_shares(np.array([0.0, -3.0, 0.0, 0.0]), 0.5), [0.25] * 4)  # noise only: uniform
    np.testing.assert_allclose(volume_shares(np.array([6.0, 2.0, -1.0, 0.0]), 1.0), [0.75, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(volume_shares(np.array([6.0, 2.0, -1.0, 0.0]), 0.5), [0.5, 0.25, 0.125, 0.125])
    np.testing.assert_allclose(class_degrees(0.4, np.array([0.5, 0.25, 0.125, 0.125])), [0.8, 0.4, 0.2, 0.2])
    np.testing.assert_allclose(class_degrees(0.8, np.array([0.5, 0.5])), [0.8, 0.8])
    assert class_degrees(0.9, np.array([0.9, 0.1]))[0] == 1.0  # clipped


def test_uncertainty_sampling_picks_the_highest_entropy():
    probs = np.array([[0.98, 0.02], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    assert most_uncertain(probs, 2).tolist() == [1, 3]


def test_class_errors_count_misclassified_images_per_class():
    images = np.zeros((7, 28, 28), dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2, 3])
    np.testing.assert_array_equal(class_errors(constant_model(1, 4), images, labels, 4), [2, 0, 1, 1])


@pytest.mark.parametrize("k", [1, 3])
def test_one_image_moves_votes_and_class_errors_by_at_most_sqrt_two(k):
    """The joint release's sensitivity: removing any one voter moves the votes by norm 1 and the
    class errors by at most 1 (what the site's noise is calibrated to: sqrt 2 x the votes')."""
    rng = np.random.default_rng(k)
    model = constant_model(2, 3)
    for _ in range(5):
        private, labels = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
        images = rng.random((10, 28, 28)).astype(np.float32)
        candidates, candidate_labels = rng.normal(size=(9, 4)), np.arange(9) % 3
        full = np.concatenate(
            [vote_histogram(private, labels, candidates, candidate_labels, k), class_errors(model, images, labels, 3)]
        )
        for drop in range(10):
            keep = np.arange(10) != drop
            fewer = np.concatenate(
                [
                    vote_histogram(private[keep], labels[keep], candidates, candidate_labels, k),
                    class_errors(model, images[keep], labels[keep], 3),
                ]
            )
            assert np.linalg.norm(full - fewer) <= math.sqrt(2.0) + 1e-9


class FixedUncertainty:
    """A predictor whose uncertainty is the candidate's index in the batch (highest last)."""

    def __call__(self, model, images):
        n = len(images)
        p = np.linspace(0.99, 0.5, n)
        return np.stack([p, 1 - p], axis=1)


def test_final_dataset_follows_the_steered_shares_and_the_mixing_ratio():
    generator = GlyphGenerator(["a", "b"], image_size=28, seed=0)
    loop = ActiveLoop(
        generator, 2, train=lambda x, y: "model", predict=FixedUncertainty(), steer=1.0, oversample=3, mix_ratio=0.25
    )
    accepted = {0: generator.random(0, 20), 1: generator.random(1, 2)}
    for i, c in enumerate(accepted[0]):
        c.votes = float(i)
    loop.observe_errors(np.array([1.0, 3.0]))  # class 1 gets 3/4 of the volume
    loop.model = "model"
    final = loop.final(accepted, volume_per_label=8)
    counts = np.bincount([c.label for c in final], minlength=2)
    assert counts.tolist() == [4, 12]
    ids0 = {c.candidate_id for c in final if c.label == 0}
    best = {c.candidate_id for c in sorted(accepted[0], key=lambda c: -c.votes)[:3]}  # round(4 x 0.75) = 3 accumulated
    assert best <= ids0 and len(ids0 - {c.candidate_id for c in accepted[0]}) == 1  # one fresh synthetic image
    ids1 = {c.candidate_id for c in final if c.label == 1}
    assert {c.candidate_id for c in accepted[1]} <= ids1  # all (2 < 9) accumulated; 10 fresh draws fill the rest
    fresh1 = [c for c in final if c.label == 1 and c.candidate_id not in {a.candidate_id for a in accepted[1]}]
    assert len(fresh1) == 10 and all(c.parent_id is None for c in fresh1)  # fresh draws, not variations


def test_secagg_and_a_bad_mixing_ratio_are_refused_for_active():
    with pytest.raises(ConfigError, match="Active"):
        load_config(overrides=["privacy.mode=secagg", "feedback.framework=Active"])
    with pytest.raises(ConfigError, match="mix_ratio"):
        load_config(overrides=["feedback.framework=Active", "feedback.mix_ratio=1.0"])


def test_active_rounds_through_the_client_handlers(tmp_path, monkeypatch):
    """Central mode at a huge epsilon (clean sums): round 1 is votes only; rounds 2-3 carry the
    model, every site releases its class errors with its votes in one charge per round, and the
    errors steer the volume."""
    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(
        "feedback.framework=Active",
        "privacy.mode=central",
        "privacy.epsilon=1000",
        "feedback.rounds=3",
        "feedback.candidates_per_label=4",
        "feedback.volume_per_label=5",
        "feedback.k=1",
        "feedback.active_epochs=1",
        "feedback.active_steer=1.0",
        "feedback.active_oversample=2",
    )
    strategy = build_strategy(cfg, tmp_path / "run")
    assert strategy.evolution.evolve == "active"
    strategy.start(
        grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=strategy.rounds, timeout=10
    )
    assert len(strategy.evolution.pool) == 5 * 10  # the final dataset: volume x classes, split by the shares
    ledgers = [json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())["entries"] for i in range(3)]
    assert all(
        [e["round"] for e in entries] == [1, 2, 3, 4] for entries in ledgers
    )  # one charge per round + evaluation
    releases = sorted((tmp_path / "site0" / "releases").rglob("*.json"))
    stored = {
        json.loads(p.read_text())["round"]: json.loads(p.read_text())["values"]
        for p in releases
        if json.loads(p.read_text()).get("kind") == "train"
    }
    assert (
        "class_errors" not in stored[1]
        and len(stored[2]["class_errors"]) == 10
        and len(stored[3]["class_errors"]) == 10
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in metrics if m.get("active")]
    shares = rounds[-1]["active"]["volume_shares"]
    errors = np.maximum(rounds[-1]["active"]["class_errors"], 0)
    assert errors.sum() > 0 and np.allclose(shares, errors / errors.sum(), atol=1e-3)  # steer 1: proportional


def test_an_active_run_resumes_on_the_same_model_and_steering(tmp_path):
    """The replay feeds each round's checkpointed class errors back and trains each round's model
    again: the pools match the voted ids, and the round in flight carries the very model the
    crashed run sent (the sites replay their release: a different model would be refused)."""
    from coautogen_fl.checkpoint import Checkpoint
    from strategies.resume import rounds_left

    from strategy_helpers import crashed_run, resumed_run

    active_run = [
        "feedback.framework=Active",
        "feedback.rounds=3",
        "feedback.candidates_per_label=4",
        "feedback.volume_per_label=5",
        "feedback.active_epochs=1",
    ]
    cfg, crashed = crashed_run(tmp_path, active_run, 3)
    assert Checkpoint.load(tmp_path / "run").completed[1].class_errors is not None  # round 2 carried the model

    resumed = resumed_run(tmp_path, active_run)
    assert np.array_equal(resumed.evolution.active.shares, crashed.evolution.active.shares)
    assert rounds_left(resumed) == 1
    resumed.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=1, timeout=10)
    assert resumed.dropped == [] and len(resumed.evolution.pool) == 5 * 10
    ledgers = [json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())["entries"] for i in range(3)]
    assert all([e["round"] for e in entries] == [1, 2, 3, 4] for entries in ledgers)  # round 3 replayed


def test_a_reply_without_the_asked_class_errors_is_dropped(tmp_path):
    """Round 2 carries the model: a vote reply without class errors is malformed, and so is one
    with errors in a round that did not ask for them."""
    cfg = small_config("feedback.framework=Active", "feedback.candidates_per_label=2", "feedback.active_epochs=1")
    strategy = build_strategy(cfg, tmp_path / "run")
    request = train_messages(strategy, 1)[0]
    assert P.VoteRequest.from_parts(from_content(request.content)).probe is None  # round 1: no model yet
    pool = len(strategy.evolution.pool)
    with pytest.raises(P.ReplyError, match="sent unasked"):
        strategy._parse_vote_reply(vote_reply(request, np.zeros(pool), class_errors=np.zeros(10)), 1.0)
    strategy.evolution.active.model = constant_model(0)
    request = train_messages(strategy, 2)[0]
    probe = P.VoteRequest.from_parts(from_content(request.content)).probe
    assert (
        probe is not None
        and probe.num_classes == 10
        and set(probe.weights) == set(state_dict_to_numpy(constant_model(0)))
    )
    with pytest.raises(P.ReplyError, match="class errors missing"):
        strategy._parse_vote_reply(vote_reply(request, np.zeros(pool)), 1.0)
    with pytest.raises(P.ReplyError, match="class errors have shape"):
        strategy._parse_vote_reply(vote_reply(request, np.zeros(pool), class_errors=np.zeros(3)), 1.0)


@pytest.mark.flower
def test_active_through_flower(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli_main(
        [
            "run",
            "--out",
            str(out),
            "--name",
            "active",
            "--num-hospitals",
            "3",
            "-f",
            "Active",
            "feedback.rounds=2",
            "feedback.candidates_per_label=5",
            "-vpl",
            "6",
            "downstream.epochs=1",
            "feedback.active_epochs=1",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-2000:]
    summary = json.loads((out / "active" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["framework"] == "Active"
    assert summary["num_synthetic"] == 60 and all(s["rounds_answered"] == 2 for s in summary["sites"].values())
    metrics = [json.loads(line) for line in (out / "active" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("active", {}).get("class_errors") for m in metrics)  # round 2 released class errors
