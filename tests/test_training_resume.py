"""Crash safety of -tt real and -tt mix (in process, the real ClientApp handlers).

The server dies at a chosen point of its DP-SGD rounds after the sites paid; the resumed run
continues from ``checkpoint.json`` and ``training/`` with the very weights the crashed run held,
so every site replays what it already released: each ledger holds exactly one entry per release.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from clients import client_app
from coautogen_fl import protocol as P
from coautogen_fl.checkpoint import Checkpoint, CheckpointError
from coautogen_fl.config import save_config
from coautogen_fl.privacy import PrivacyLedger
from strategies.resume import rounds_left
from strategies.server_app import build_strategy, resume_strategy

from strategy_helpers import (
    TINY_DPSGD,
    Crash,
    InProcessGrid,
    crashed_run,
    resumed_run,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

TINY = TINY_DPSGD


def ledger_entries(cfg, tmp_path) -> list[list[tuple[int, float]]]:
    """(round, sample rate) of every entry in each site's ledger."""
    return [
        [
            (e.round, e.sample_rate)
            for e in PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", 1.0, 1e-5).entries
        ]
        for i in range(cfg.federation.num_hospitals)
    ]


def crash(tmp_path, overrides, crash_call: int, message_type: str):
    """A run killed at the ``crash_call``-th batch of ``message_type`` after the sites paid; (config, strategy)."""
    return crashed_run(tmp_path, [*TINY, *overrides], crash_call, message_type)


def resume(cfg, tmp_path, overrides):
    """The sites restart, the server resumes from the run directory and finishes the run."""
    resumed = resumed_run(tmp_path, [*TINY, *overrides])
    left = rounds_left(resumed)
    resumed.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=left, timeout=10)
    return resumed, left


def test_a_mix_run_killed_in_a_dpsgd_round_resumes_without_charging_anyone_twice(tmp_path):
    overrides = ["feedback.task_type=mix"]
    cfg, crashed = crash(tmp_path, overrides, crash_call=2, message_type=P.TRAIN_DPSGD)
    record = Checkpoint.load(tmp_path / "run").training
    assert record is not None and record.done == 1 and record.accuracy_synthetic is not None
    # Two vote rounds, DP-SGD round 3 aggregated, round 4 paid for but never aggregated.
    assert ledger_entries(cfg, tmp_path) == [[(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]] * 3

    resumed, left = resume(cfg, tmp_path, overrides)
    assert left == 1 and resumed.voting_done and resumed.round_offset == 3
    # Round 4 was answered from the sites' stored releases, then the noised evaluation (round 5).
    assert ledger_entries(cfg, tmp_path) == [[(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5), (5, 1.0)]] * 3
    assert resumed.dropped == [] and resumed.federated_accuracy is not None
    assert [h["updates_received"] for h in resumed.training.history] == [3, 3]
    # The mix's public steps ran on the same final dataset; the pretrained accuracy is the crashed run's.
    assert np.array_equal(resumed.final.synthetic[0], crashed.final.synthetic[0])
    assert resumed.training.accuracy_synthetic == crashed.training.accuracy_synthetic
    names = sorted(p.name for p in (tmp_path / "run" / "training").iterdir())
    assert names == ["round-0002.npz", "round-0003.npz", "round-0004.npz"]  # the start, then each round
    assert Checkpoint.load(tmp_path / "run").training.done == 2


def test_a_central_real_run_resumes_with_its_optimiser_state(tmp_path):
    overrides = ["feedback.task_type=real", "privacy.mode=central"]
    cfg, _ = crash(tmp_path, overrides, crash_call=3, message_type=P.TRAIN_DPSGD)
    assert (tmp_path / "run" / "training" / "optimizer-0002.pt").is_file()

    optimizer = tmp_path / "run" / "training" / "optimizer-0002.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="optimizer-0002.pt is unreadable"):
        resume(cfg, tmp_path, overrides)
    optimizer.write_bytes(saved)

    resumed, left = resume(cfg, tmp_path, overrides)
    assert left == 2 and resumed.total_rounds == 4  # 2 rounds x 2 local steps: 4 pooled steps
    # Adam went on counting from the saved state: 4 steps in all, not the 2 of this process.
    steps = {int(s["step"]) for s in resumed.training._optimizer.state_dict()["state"].values()}
    assert steps == {4}
    for entries in ledger_entries(cfg, tmp_path):
        assert [r for r, _ in entries] == [1, 2, 3, 4, 5]  # each pooled step once, then the evaluation
    # Every step's weights stay; of the optimiser only the newest state (all a resume reads).
    names = sorted(p.name for p in (tmp_path / "run" / "training").iterdir())
    assert names == ["optimizer-0004.pt"] + [f"round-{r:04d}.npz" for r in range(5)]  # round 0: the start


@pytest.mark.parametrize(
    ("message_type", "done", "left"),
    [(P.TRAIN_DPSGD, 0, 2), (MessageType.EVALUATE, 2, 1)],
    ids=["killed-in-round-1", "killed-in-the-evaluation"],
)
def test_a_real_run_resumes_from_its_start_and_after_its_last_round(tmp_path, message_type, done, left):
    overrides = ["feedback.task_type=real"]
    cfg, crashed = crash(tmp_path, overrides, crash_call=1, message_type=message_type)
    assert Checkpoint.load(tmp_path / "run").training.done == done

    resumed, rounds = resume(cfg, tmp_path, overrides)
    assert rounds == left
    assert ledger_entries(cfg, tmp_path) == [[(1, 0.5), (2, 0.5), (3, 1.0)]] * 3
    assert resumed.dropped == [] and resumed.federated_accuracy is not None
    assert len(resumed.training.history) == 2
    if done == 2:  # only the hand-over was left: the very model the crashed run had evaluated
        assert resumed.final.accuracy_real_test == crashed.final.accuracy_real_test


def test_resume_refuses_a_completed_run_and_a_run_that_asked_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = small_config("feedback.task_type=real", *TINY, f"tracking.run_dir={run_dir}")
    save_config(cfg, run_dir / "config.yaml")
    resumed = small_config("feedback.task_type=real", *TINY, f"tracking.run_dir={run_dir}", "tracking.resume=true")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resume_strategy(resumed, run_dir)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(CheckpointError, match="is a completed run"):
        resume_strategy(resumed, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "summary.json"]  # nothing else written


def test_a_site_killed_in_its_local_training_releases_once_under_the_charge(tmp_path, monkeypatch):
    """The whole federation dies while site 0 trains round 2 (charged, nothing stored or sent): the
    resumed run's round 2 is trained and released under that charge, not charged again."""
    from clients import site_training

    calls = {"n": 0}
    real_dp_train = site_training.dp_train

    def dies_in_round_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # round 1: three sites; round 2: site 0, after its charge
            raise Crash()
        return real_dp_train(*args, **kwargs)

    monkeypatch.setattr(site_training, "dp_train", dies_in_round_2)
    overrides = ["feedback.task_type=real"]
    cfg, _ = crash(tmp_path, overrides, crash_call=99, message_type=P.TRAIN_DPSGD)
    assert ledger_entries(cfg, tmp_path) == [[(1, 0.5), (2, 0.5)], [(1, 0.5)], [(1, 0.5)]]
    monkeypatch.setattr(site_training, "dp_train", real_dp_train)

    resumed, left = resume(cfg, tmp_path, overrides)
    assert left == 1 and resumed.dropped == []
    assert ledger_entries(cfg, tmp_path) == [[(1, 0.5), (2, 0.5), (3, 1.0)]] * 3  # one entry per release
    assert [h["updates_received"] for h in resumed.training.history] == [3, 3]


def test_a_charge_is_reused_only_for_its_own_request_and_terms(tmp_path):
    from coautogen_fl.privacy.release_store import ReleaseMismatchError, ReleaseStore

    store = ReleaseStore(tmp_path / "releases")
    terms = {"noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 2, "kind": "gaussian"}
    assert store.lookup("run", "dpsgd", 3, "abc") is None
    with pytest.raises(ReleaseMismatchError, match="not recorded as one for this request"):
        store.paid("run", "dpsgd", 3, "abc", terms, charged=True)  # charged before any record (or by another run)
    store.intend("run", "dpsgd", 3, "abc", terms)
    assert not store.paid("run", "dpsgd", 3, "abc", terms, charged=False)  # recorded, never charged: charge now
    assert store.lookup("run", "dpsgd", 3, "abc") is None  # charged, not released: release it
    assert store.paid("run", "dpsgd", 3, "abc", terms, charged=True)
    with pytest.raises(ReleaseMismatchError, match="charged under"):
        store.paid("run", "dpsgd", 3, "abc", {**terms, "noise_multiplier": 1.0}, charged=True)
    with pytest.raises(ReleaseMismatchError, match="not recorded as one for this request"):
        store.paid("run", "dpsgd", 3, "another request", terms, charged=True)
    store.save("run", "dpsgd", 3, "abc", {"w": [1.0]})
    assert store.lookup("run", "dpsgd", 3, "abc") == {"w": [1.0]}
    assert not list(store.folder.rglob("*.intent.json"))  # the release superseded the record
    with pytest.raises(ReleaseMismatchError, match="already released for a different request"):
        store.lookup("run", "dpsgd", 3, "another request")


def test_a_secure_real_run_killed_after_the_sites_paid_resumes_on_their_stored_integers(tmp_path):
    """privacy.mode=secagg: SecAgg+ masks afresh in the resumed run, but each site's noised
    integers of the round in flight are the ones it stored; the optimiser state carries on."""
    from strategy_helpers import SecureGrid

    class DiesInRound2(SecureGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.batches = 0

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            self.batches += 1
            stages = {stage for _, stage, _ in self.replies[-len(replies) :]} if replies else set()
            if self.batches > 4 and "collect_masked_vectors" in stages:  # round 2's release stage
                raise Crash()
            return replies

    client_app._SITES.clear()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = ["feedback.task_type=real", "privacy.mode=secagg", "downstream.dp_local_steps=1"]
    cfg = small_config(*TINY, *overrides, f"tracking.run_dir={run_dir}")
    save_config(cfg, run_dir / "config.yaml")
    crashed = build_strategy(cfg, run_dir)
    trust = {"secagg-trust-sites": 100}
    with pytest.raises(Crash):
        crashed.start(grid=DiesInRound2(cfg, tmp_path, **trust), initial_arrays=ArrayRecord(), num_rounds=2, timeout=10)
    assert Checkpoint.load(run_dir).training.done == 1
    assert ledger_entries(cfg, tmp_path) == [[(1, 1.0), (2, 1.0)]] * 3  # round 2 paid, never revealed

    client_app._SITES.clear()
    resumed = resume_strategy(
        small_config(*TINY, *overrides, f"tracking.run_dir={run_dir}", "tracking.resume=true"), run_dir
    )
    resumed.start(grid=SecureGrid(cfg, tmp_path, **trust), initial_arrays=ArrayRecord(), num_rounds=1, timeout=10)
    assert ledger_entries(cfg, tmp_path) == [[(1, 1.0), (2, 1.0), (3, 1.0)]] * 3
    ledger = PrivacyLedger(tmp_path / "site0" / "privacy_ledger.json", 1.0, 1e-5)
    assert [e.kind for e in ledger.entries] == ["ddg", "ddg", "gaussian"]
    assert [h["updates_received"] for h in resumed.training.history] == [3, 3]
    steps = {int(s["step"]) for s in resumed.training._optimizer.state_dict()["state"].values()}
    assert steps == {2}


def test_a_gen_mix_run_resumes_on_the_same_synthetic_dataset(tmp_path):
    """-f Gen draws its dataset once from the prior (no vote round is checkpointed): the resumed
    run draws the very same dataset again for its public steps."""
    overrides = ["feedback.task_type=mix", "feedback.framework=Gen"]
    cfg, crashed = crash(tmp_path, overrides, crash_call=2, message_type=P.TRAIN_DPSGD)
    assert Checkpoint.load(tmp_path / "run").training.done == 1
    resumed, left = resume(cfg, tmp_path, overrides)
    assert left == 1 and resumed.dropped == []
    assert np.array_equal(resumed.final.synthetic[0], crashed.final.synthetic[0])
    assert ledger_entries(cfg, tmp_path) == [[(2, 0.5), (3, 0.5), (4, 1.0)]] * 3  # no vote round: DP-SGD from round 2
