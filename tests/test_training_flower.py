"""`coautogen run -tt real` end to end through Flower (a private SuperLink, 3 simulated sites):
the DP-SGD rounds travel as ``train.dpsgd`` messages, every site's ledger holds them and the
noised evaluation within its budget, and ``--resume`` of the completed run is refused."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main as cli_main

pytestmark = pytest.mark.flower

TINY = ["downstream.dp_rounds=2", "downstream.dp_local_steps=2", "downstream.dp_sample_rate=0.5"]


def test_coautogen_run_real_through_flower(tmp_path, capsys):
    out = tmp_path / "runs"
    run_dir = out / "real"
    code = cli_main(["run", "--out", str(out), "--name", "real", "--num-hospitals", "3", "-tt", "real", *TINY])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task_type"] == "real"
    assert 0.0 <= summary["accuracy_real_test"] <= 1.0 and summary["accuracy_federated"] is not None
    training = summary["training"]
    assert (training["rounds"], training["local_steps"], training["sample_rate"]) == (2, 2, 0.5)
    assert len(training["history"]) == 2 and all(h["updates_received"] == 3 for h in training["history"])
    assert sorted(p.name for p in (run_dir / "training").iterdir()) == [
        "round-0000.npz",
        "round-0001.npz",
        "round-0002.npz",
    ]
    for pid in range(3):
        ledger = json.loads((run_dir / "sites" / f"site-{pid}" / "privacy_ledger.json").read_text())
        steps = [(e["round"], e.get("sample_rate", 1.0), e.get("steps", 1)) for e in ledger["entries"]]
        assert steps == [(1, 0.5, 2), (2, 0.5, 2), (3, 1.0, 1)]  # two DP-SGD rounds, the noised evaluation
        assert summary["sites"][str(pid)]["epsilon_spent"] <= 1.0 + 1e-6
    assert 0.99 <= summary["epsilon_spent_max"] <= 1.0 + 1e-6

    assert cli_main(["run", "--resume", str(run_dir)]) == 2
    assert "is a completed run" in capsys.readouterr().err
