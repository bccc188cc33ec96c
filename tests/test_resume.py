"""Crash safety and resume (issue 9), in process with the real ClientApp handlers.

A run is killed in round 3 after every site has paid for that round but before the server
aggregated it. The resumed run rebuilds the pool by replaying the checkpointed rounds, asks
round 3 again, and the sites answer with the releases they stored: every ledger holds exactly
one entry per release, the final dataset is there, and nothing was charged twice.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from clients import client_app
from coautogen_fl import protocol as P
from coautogen_fl.checkpoint import Checkpoint, CheckpointError
from coautogen_fl.privacy import PrivacyLedger
from coautogen_fl.tracking import read_metrics
from strategies.resume import rounds_left
from strategies.server_app import build_strategy, resume_strategy, run_summary

from strategy_helpers import (
    Crash,
    CrashingGrid,
    InProcessGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

ROUNDS = 3


def ledger_rounds(tmp_path, site: int) -> list[int]:
    return [e.round for e in PrivacyLedger(tmp_path / f"site{site}" / "privacy_ledger.json", 1.0, 1e-5).entries]


@pytest.fixture
def crashed_run(tmp_path, monkeypatch):
    """A run killed in round 3 after the sites paid for it; returns (config, run dir)."""
    monkeypatch.setattr(client_app, "_SITES", {})
    run_dir = tmp_path / "run"
    cfg = small_config(f"feedback.rounds={ROUNDS}", f"tracking.run_dir={run_dir}")
    run_dir.mkdir()
    from coautogen_fl.config import save_config

    save_config(cfg, run_dir / "config.yaml")
    s = build_strategy(cfg, run_dir)
    s.run_key = "run-under-test"
    with pytest.raises(Crash):
        s.start(
            grid=CrashingGrid(cfg, tmp_path, crash_call=3),
            initial_arrays=ArrayRecord(),
            num_rounds=s.rounds,
            timeout=10,
        )
    return cfg, run_dir


def test_a_run_killed_mid_round_resumes_without_charging_anyone_twice(tmp_path, crashed_run, monkeypatch):
    cfg, run_dir = crashed_run
    checkpoint = Checkpoint.load(run_dir)
    assert checkpoint.completed_rounds == 2 and checkpoint.run_key == "run-under-test"
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    for site in range(3):
        assert ledger_rounds(tmp_path, site) == [1, 2, 3]  # round 3 was paid for, never aggregated
    assert not (run_dir / "synthetic").exists()

    monkeypatch.setattr(client_app, "_SITES", {})  # the sites restart too
    resumed = resume_strategy(
        small_config(f"feedback.rounds={ROUNDS}", f"tracking.run_dir={run_dir}", "tracking.resume=true"), run_dir
    )
    assert rounds_left(resumed) == 1 and resumed.round_offset == 2
    resumed.start(
        grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=rounds_left(resumed), timeout=10
    )

    # Round 3 was answered from the sites' stored releases: one ledger entry per release.
    for site in range(3):
        assert ledger_rounds(tmp_path, site) == [1, 2, 3, 4]  # three vote rounds and the noised evaluation
    assert resumed.dropped == [] and all(s.rounds_answered == 3 for s in resumed.sites.values())
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["round_001", "round_002", "round_003"]
    assert len(list((run_dir / "synthetic").rglob("*.png"))) == 5 * 10
    summary = run_summary(resumed.cfg, resumed, run_dir, 1.0)
    assert summary["status"] == "completed" and summary["epsilon_spent_max"] == pytest.approx(1.0, abs=1e-6)
    assert summary["accuracy_federated"] is not None


def test_a_site_refuses_to_release_a_paid_round_for_other_candidates(tmp_path, crashed_run, monkeypatch):
    """If the resumed server asked round 3 about another pool, answering would be a second
    release of that round: the sites refuse, and the run stops instead of spending more."""
    cfg, run_dir = crashed_run
    monkeypatch.setattr(client_app, "_SITES", {})
    resumed = resume_strategy(
        small_config(f"feedback.rounds={ROUNDS}", f"tracking.run_dir={run_dir}", "tracking.resume=true"), run_dir
    )
    resumed.evolution.pool = list(reversed(resumed.evolution.pool))  # another order: another request
    resumed.evolution._payload = None
    from strategies.strategy import RoundFailed

    with pytest.raises(RoundFailed):
        resumed.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=1, timeout=10)
    assert {d["reason"] for d in resumed.dropped} == {
        f"{P.ERROR_REASONS[P.ERROR_NOT_ALLOWED]} (code {P.ERROR_NOT_ALLOWED})"
    }
    for site in range(3):
        assert ledger_rounds(tmp_path, site) == [1, 2, 3]


def test_resume_refuses_another_config_and_a_missing_checkpoint(tmp_path, crashed_run):
    cfg, run_dir = crashed_run
    other = small_config(
        f"feedback.rounds={ROUNDS}", f"tracking.run_dir={run_dir}", "tracking.resume=true", "privacy.epsilon=2"
    )
    with pytest.raises(CheckpointError, match="differs from .*config.yaml in privacy.epsilon"):
        resume_strategy(other, run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(str(run_dir), str(empty)))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resume_strategy(
            small_config(f"feedback.rounds={ROUNDS}", f"tracking.run_dir={empty}", "tracking.resume=true"), empty
        )


def test_checkpoint_is_plain_json_with_the_votes_of_each_round(crashed_run):
    _, run_dir = crashed_run
    data = json.loads((run_dir / "checkpoint.json").read_text())
    assert [r["round"] for r in data["completed"]] == [1, 2]
    assert all(len(r["votes"]) == len(r["candidate_ids"]) == 30 for r in data["completed"])
    assert np.isfinite([v for r in data["completed"] for v in r["votes"]]).all()


# ---------------------------------------------------------------------------------- through Flower
@pytest.mark.flower
def test_coautogen_run_killed_mid_round_resumes(tmp_path):
    """`coautogen run` and every process it started are SIGKILLed while round 2 is in flight (a
    crash of the machine); `coautogen run --resume RUN_DIR` finishes the run: the finished rounds
    on disk once each, the final dataset, every site's ledger one entry per release."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from flower_processes import ProcessWatch

    coautogen = str(Path(sys.executable).parent / "coautogen")
    run_dir = tmp_path / "runs" / "crash"
    command = [
        coautogen,
        "run",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "crash",
        "--num-hospitals",
        "3",
        "feedback.rounds=3",
        "feedback.candidates_per_label=4",
        "feedback.volume_per_label=10",
        "downstream.epochs=20",
    ]
    with ProcessWatch([str(tmp_path)]) as watch:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            watch.add_root(proc.pid)
            deadline = time.monotonic() + 240
            while not (run_dir / "checkpoint.json").is_file():  # round 1 decided: round 2 goes out now
                assert proc.poll() is None, f"the run ended before round 1 was decided: {proc.communicate()}"
                assert time.monotonic() < deadline, "round 1 was never decided"
                time.sleep(0.05)
            watch.scan()
            watch.kill_leftovers()  # SIGKILL to the launcher and everything it started, at once
            proc.communicate(timeout=30)
            assert proc.returncode == -9
            # Killed after round 1 and before the end (the 20-epoch final stage leaves a wide margin).
            assert Checkpoint.load(run_dir).completed_rounds >= 1 and not (run_dir / "summary.json").exists()

            resumed = subprocess.run(
                [coautogen, "run", "--resume", str(run_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            watch.scan()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            leftovers = watch.wait_all_gone(20.0)
            watch.kill_leftovers()
    assert not leftovers, leftovers
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    assert "coautogen: resuming Feedback" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_hospitals"] == 3
    assert sorted(summary["sites"]) == ["0", "1", "2"] and all(
        s["rounds_answered"] == 3 for s in summary["sites"].values()
    )
    assert abs(summary["epsilon_spent_max"] - 1.0) < 1e-6
    for site in range(3):
        ledger = json.loads((run_dir / "sites" / f"site-{site}" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2, 3, 4]  # once each: 3 rounds and the evaluation
        assert len({e["run_id"] for e in ledger["entries"]}) == 1  # the run key survived the resume
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == ["round_001", "round_002", "round_003"]
    assert len(list((run_dir / "synthetic").rglob("*.png"))) == 100


def test_relative_run_paths_land_in_a_stated_place(tmp_path, monkeypatch):
    """Issue 9: never "wherever the SuperLink runs": `coautogen run` resolves relative paths
    against its launching directory, the ServerApp under ~/coautogen-fl."""
    from coautogen_fl.rundir import resolve_run_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = small_config("tracking.out_dir=runs", "tracking.run_name=r")
    assert resolve_run_dir(cfg) == tmp_path / "home" / "coautogen-fl" / "runs" / "r"
    assert resolve_run_dir(cfg, base=tmp_path / "launch") == tmp_path / "launch" / "runs" / "r"
    assert resolve_run_dir(small_config(f"tracking.run_dir={tmp_path / 'abs'}")) == tmp_path / "abs"


def test_a_resumed_simulation_names_each_site_once(tmp_path):
    """Simulated sites come back with new node ids: the partition id names the site, and its
    earlier record is folded into the new one (spend, rounds, evaluations)."""
    from flwr.app import Message, RecordDict

    from clients.wire import to_content

    from strategy_helpers import FakeGrid, integer_votes, train_messages, vote_reply

    s = build_strategy(small_config("federation.min_sites=1"), tmp_path)
    old = train_messages(s, 1, FakeGrid([11]))[0]
    s.aggregate_train(1, [vote_reply(old, integer_votes(1), 0.5, 0)])
    m = Message(content=RecordDict(), dst_node_id=99, message_type=MessageType.EVALUATE)  # the same site, a new node id
    reply = Message(content=to_content(P.EvaluationReply(3.0, 9.0, 0.9, 1.0, 0).to_parts()), reply_to=m)
    s.aggregate_evaluate(2, [reply])
    assert list(s.sites) == [99]
    site = s.sites[99]
    assert (site.partition_id, site.rounds_answered, site.evaluations_answered, site.epsilon_spent) == (0, 1, 1, 0.9)
    assert run_summary(s.cfg, s, tmp_path, 1.0)["sites"]["0"]["status"] == "answered"
