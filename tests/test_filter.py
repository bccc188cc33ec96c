"""The Filter framework (-f Filter) and the Real Filter rater made DP (-r RF)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord

from clients import client_app
from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.rater import build_rater, filter_scores
from simulations.cli import main as cli_main
from strategies.server_app import build_strategy

from strategy_helpers import (
    InProcessGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)


@pytest.mark.parametrize("k", [1, 3])
def test_one_image_changes_the_rf_scores_by_norm_exactly_one(k):
    """Add/remove adjacency: for random data, removing any one private image moves the score
    vector by L2 norm 1 (k entries of 1/sqrt(k), each +-)."""
    rng = np.random.default_rng(k)
    for _ in range(20):
        private, labels = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
        candidates, candidate_labels = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
        full = filter_scores(private, labels, candidates, candidate_labels, k)
        for drop in range(12):
            keep = np.arange(12) != drop
            fewer = filter_scores(private[keep], labels[keep], candidates, candidate_labels, k)
            assert np.linalg.norm(full - fewer) == pytest.approx(1.0)


def test_rf_keeps_agreeing_and_rejects_disagreeing_neighbours():
    candidates = np.array([[0.0, 0.0], [10.0, 0.0]])
    candidate_labels = np.array([0, 1])
    private = np.array([[0.1, 0.0], [0.2, 0.0], [9.0, 0.0]])
    scores = build_rater("RF", 1).score(private, np.array([0, 1, 0]), candidates, candidate_labels)
    # candidate 0 (label 0): kept by image 0, rejected by image 1 (label 1); candidate 1: rejected by image 2
    np.testing.assert_array_equal(scores, [0.0, -1.0])


def test_secagg_refuses_rf_scores():
    with pytest.raises(ConfigError, match="-r RF"):
        load_config(overrides=["privacy.mode=secagg", "feedback.rater=RF"])


#: Three Filter rounds, central mode at a huge epsilon (nearly clean sums): most candidates are kept.
FILTER_RUN = [
    "feedback.framework=Filter",
    "feedback.rater=RF",
    "privacy.mode=central",
    "privacy.epsilon=1000",
    "feedback.rounds=3",
    "feedback.candidates_per_label=6",
    "feedback.volume_per_label=4",
    "feedback.k=1",
]


def test_filter_accumulates_kept_candidates_through_the_client_handlers(tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(*FILTER_RUN)
    strategy = build_strategy(cfg, tmp_path / "run")
    assert strategy.evolution.evolve == "filter"
    strategy.start(
        grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=strategy.rounds, timeout=10
    )
    final = strategy.evolution.pool
    assert len(final) == 4 * 10 and all(sum(c.label == label for c in final) == 4 for label in range(10))
    kept = [c for c in final if c.votes is not None and c.votes > 0]
    assert len(kept) >= 20  # nearly noise-free: most of the final set was kept by votes, not filled in
    ledgers = [json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())["entries"] for i in range(3)]
    assert all([e["round"] for e in entries] == [1, 2, 3, 4] for entries in ledgers)  # 3 filter rounds + evaluation


def test_a_filter_run_resumes_with_what_it_had_accumulated(tmp_path):
    """Replaying the checkpointed votes rebuilds the Filter's accepted candidates exactly (the
    same ids per class), so the resumed run accumulates on from where the crashed one was."""
    from strategies.resume import rounds_left

    from strategy_helpers import crashed_run, resumed_run

    cfg, crashed = crashed_run(tmp_path, FILTER_RUN, 3)
    accepted = {label: [c.candidate_id for c in bucket] for label, bucket in crashed.evolution.accepted.items()}
    assert sum(map(len, accepted.values())) >= 10  # nearly noise-free: two rounds kept plenty

    resumed = resumed_run(tmp_path, FILTER_RUN)
    assert {label: [c.candidate_id for c in b] for label, b in resumed.evolution.accepted.items()} == accepted
    assert rounds_left(resumed) == 1
    resumed.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=1, timeout=10)
    final = resumed.evolution.pool
    ids = {c.candidate_id for c in final}
    assert len(final) == 4 * 10 and all(set(kept) <= ids for kept in accepted.values())
    ledgers = [json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())["entries"] for i in range(3)]
    assert all([e["round"] for e in entries] == [1, 2, 3, 4] for entries in ledgers)  # round 3 replayed, not re-charged


@pytest.mark.flower
def test_filter_with_rf_through_flower(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli_main(
        [
            "run",
            "--out",
            str(out),
            "--name",
            "filter",
            "--num-hospitals",
            "3",
            "-f",
            "Filter",
            "-r",
            "RF",
            "feedback.rounds=2",
            "feedback.candidates_per_label=5",
            "-vpl",
            "6",
            "downstream.epochs=1",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-2000:]
    summary = json.loads((out / "filter" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["framework"] == "Filter" and summary["rater"] == "RF"
    assert summary["num_synthetic"] == 60 and all(s["rounds_answered"] == 2 for s in summary["sites"].values())


def test_rf_replacement_sensitivity_is_two(tmp_path):
    """RF scores can be negative: with -rvpl or the site unit (replacement neighbours) two unit
    vectors of opposite sign differ by 2, and the noise is calibrated to 2, not sqrt 2."""
    from coautogen_fl.rater import normalise_site_vector, vote_sensitivity

    candidates, candidate_labels = np.array([[0.0, 0.0]]), np.array([0])
    keep = normalise_site_vector(filter_scores(np.array([[0.1, 0.0]]), np.array([0]), candidates, candidate_labels))
    reject = normalise_site_vector(filter_scores(np.array([[0.1, 0.0]]), np.array([1]), candidates, candidate_labels))
    assert np.linalg.norm(keep - reject) == pytest.approx(2.0)  # a site of one image, replaced
    assert vote_sensitivity("site", signed=True) == 2.0 and vote_sensitivity("image", capped=True, signed=True) == 2.0
    assert vote_sensitivity("site") == pytest.approx(np.sqrt(2.0)) and vote_sensitivity("image", signed=True) == 1.0
    assert (
        build_strategy(small_config("feedback.rater=RF", "data.real_per_label=5"), tmp_path / "run").sensitivity == 2.0
    )
    assert build_strategy(small_config("data.real_per_label=5"), tmp_path / "run2").sensitivity == pytest.approx(
        np.sqrt(2.0)
    )
