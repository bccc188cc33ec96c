"""The benchmark harness: results survive interruption, the table and targets are computed from
the runs, the plot and the docs block are written (runs replaced by a fake runner)."""

from __future__ import annotations

import json

import pytest

from simulations import benchmark as B

ACCURACY = {"gen": 0.30, "feedback-local": 0.50, "mix": 0.80, "real": 0.70}


def fake_runner(calls):
    def run(out, row, epsilon, seed, overrides):
        calls.append((row.name, epsilon, seed))
        if row.name == "real" and seed == 1:
            return {"status": "failed", "reason": "too few sites", "seconds": 1.0}
        return {
            "status": "completed",
            "accuracy_real_test": ACCURACY[row.name] + 0.01 * seed + 0.05 * (epsilon > 1),
            "seconds": 2.0 + seed,
        }

    return run


def test_every_run_is_kept_and_a_rerun_skips_finished_runs(tmp_path):
    calls: list = []
    rows = ["gen", "feedback-local"]
    B.run_all(tmp_path, rows, [1.0], [0, 1], [], runner=fake_runner(calls))
    assert len(calls) == 4 and len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    # an interrupted benchmark: one line lost; the rerun does only that run
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + "\n")
    calls.clear()
    records = B.run_all(tmp_path, rows, [1.0], [0, 1], [], runner=fake_runner(calls))
    assert calls == [("feedback-local", 1.0, 1)] and len(records) == 4


def test_table_targets_and_doc_block_come_from_the_runs(tmp_path):
    records = B.run_all(tmp_path, list(ACCURACY), [1.0, 4.0], [0, 1, 2], [], runner=fake_runner([]))
    cells = B.aggregate(records)
    assert cells[("gen", 1.0)]["mean"] == pytest.approx(0.31)
    assert cells[("real", 1.0)]["failed"] == 1 and cells[("real", 1.0)]["runs"] == pytest.approx([0.70, 0.72])
    text = B.targets(cells)
    assert "Synthetic only (Feedback, local, epsilon 1): 0.5100, target >= 0.70: **missed by 0.1900**" in text
    assert "Feedback - Gen at epsilon 1 (same generator, same volume): 0.2000, target >= 0.15: **met**" in text
    assert "Mix at epsilon 1: 0.8100" in text and "missed by 0.0400" in text
    assert "Noise-free ceiling (Feedback, central, epsilon 1000): not measured" in text
    chart = B.plot(cells, tmp_path / "plot.png")
    assert chart.stat().st_size > 5000 and chart.read_bytes()[:4] == b"\x89PNG"
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{B.START}\nstale block\n{B.END}\n\nafter\n")
    B.write_doc(doc, B.report(cells, "python -m simulations.benchmark --out <dir>", "plot.png"))
    written = doc.read_text()
    assert (
        "stale block" not in written
        and written.startswith("# Benchmarks\n\nbefore")
        and written.rstrip().endswith("after")
    )
    assert (
        "| Gen: the generator's prior, no votes | 1 | **0.3100** (0.0100) | 0.3000, 0.3100, 0.3200 | 0 | 3 |" in written
    )


def test_results_file_is_json_lines_with_the_run_key(tmp_path):
    B.run_all(tmp_path, ["gen"], [1.0], [0], [], runner=fake_runner([]))
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["key"] == "gen|1|0" and record["accuracy_real_test"] == pytest.approx(0.30)


def test_report_only_tabulates_every_recorded_run_without_running(tmp_path, monkeypatch):
    B.run_all(tmp_path, ["gen"], [1.0], [0, 1], [], runner=fake_runner([]))
    B.run_all(tmp_path, ["feedback-local"], [1000.0], [0], [], runner=fake_runner([]))
    monkeypatch.setattr(B, "coautogen_run", lambda *a: pytest.fail("--report-only must not run anything"))
    assert B.main(["--out", str(tmp_path), "--report-only"]) == 0
    block = (tmp_path / "benchmark.md").read_text()
    assert (
        "| Gen: the generator's prior, no votes | 1 |" in block
        and "| Feedback, local DP (the main job) | 1000 |" in block
    )
    assert (tmp_path / "accuracy_vs_epsilon.png").is_file()


def test_an_interrupted_attempt_is_set_aside_not_deleted(tmp_path):
    run_dir = tmp_path / "gen-eps1-seed0"
    run_dir.mkdir()
    (run_dir / "flower.log").write_text("killed")
    assert B.set_aside(run_dir) == tmp_path / "gen-eps1-seed0.interrupted-1"
    run_dir.mkdir()
    assert B.set_aside(run_dir) == tmp_path / "gen-eps1-seed0.interrupted-2"
    assert (tmp_path / "gen-eps1-seed0.interrupted-1" / "flower.log").read_text() == "killed"
    assert not run_dir.exists() and B.set_aside(run_dir) is None
