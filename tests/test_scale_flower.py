"""The scaling path under CI: 200 simulated sites complete a tiny `coautogen run` through Flower
(the full benchmark, up to 1,000 sites, is `python -m simulations.scale`; docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main as cli_main

pytestmark = pytest.mark.flower

SITES = 200
TINY = ["feedback.rounds=1", "feedback.candidates_per_label=3", "feedback.volume_per_label=5", "downstream.epochs=1"]


def test_two_hundred_simulated_sites_complete_a_run(tmp_path, capsys):
    out = tmp_path / "runs"
    code = cli_main(["run", "--out", str(out), "--name", "sites200", "--num-hospitals", str(SITES), *TINY])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    summary = json.loads((out / "sites200" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_hospitals"] == SITES
    assert summary["dropped_replies"] == []
    assert all(site["rounds_answered"] == 1 for site in summary["sites"].values())
    assert len(summary["sites"]) == SITES
    metrics = [json.loads(line) for line in (out / "sites200" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["votes_received"] == SITES
