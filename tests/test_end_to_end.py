"""End-to-end runs through Flower: the `coautogen run` command and a 10-site `flwr run`.

Each test starts a private SuperLink (simulations.launcher) and must leave no process behind.
A watcher thread records, while the test runs, every process it started: descendants of the
root it launched (the SuperLink, `coautogen`, and through them SuperExec, the simulation
runtime and Ray's processes) and processes whose command line names the test's tmp folder.
Afterwards the SuperLink PID must be gone and the recorded processes must exit; any that
did not are killed by PID (matched with their start time, so a recycled PID is never hit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coautogen_fl.config import load_config, save_config
from simulations.launcher import FlowerSimulation, app_dir

from flower_processes import ProcessWatch, processes_naming

pytestmark = pytest.mark.flower

SUMMARY_KEYS = (
    "framework",
    "rater",
    "epsilon",
    "delta",
    "epsilon_spent_max",
    "rounds",
    "num_hospitals",
    "num_synthetic",
    "accuracy_real_test",
    "accuracy_federated",
    "wall_time_s",
)
TINY = ["feedback.rounds=2", "feedback.candidates_per_label=4", "feedback.volume_per_label=10", "downstream.epochs=2"]
EXIT_GRACE_S = 20.0  # Ray and the simulation runtime shut down asynchronously


def assert_pid_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def assert_nothing_left(watch: ProcessWatch, superlink_pid: int, marker: str) -> None:
    """The SuperLink is gone now; everything else the test started exits within the grace."""
    commands = " ".join(watch.seen.values())
    assert "flower-superexec" in commands and "flwr-simulation" in commands  # the watch saw the tree
    assert_pid_gone(superlink_pid)
    leftovers = watch.wait_all_gone(EXIT_GRACE_S)
    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after the run: {leftovers}"
    assert processes_naming([marker]) == []


def superlink_pid_of(watch: ProcessWatch, flwr_home: Path) -> int:
    pids = [
        key[0] for key, command in watch.seen.items() if "flower-superlink" in command and str(flwr_home) in command
    ]
    assert len(pids) == 1, f"expected one SuperLink under {flwr_home}: {watch.seen}"
    return pids[0]


# ---------------------------------------------------------------------------------- (a) the CLI
def test_coautogen_run_command(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "e2e"
    command = [
        str(Path(sys.executable).parent / "coautogen"),
        "run",
        "--out",
        str(out),
        "--name",
        "e2e",
        "--num-hospitals",
        "3",
        *TINY,
    ]
    started = time.monotonic()
    with ProcessWatch([str(tmp_path)]) as watch:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            watch.add_root(proc.pid)
            stdout, stderr = proc.communicate(timeout=240)
            watch.scan()
            superlink = superlink_pid_of(watch, run_dir / "flower")
            assert_nothing_left(watch, superlink, str(tmp_path))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            watch.kill_leftovers()
    elapsed = time.monotonic() - started

    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}\nflower.log:\n{_tail(run_dir / 'flower.log')}"
    assert f"run directory: {run_dir}" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    for key in SUMMARY_KEYS:
        assert f"  {key}" in stdout  # the printed summary
    assert summary["framework"] == "Feedback" and summary["rater"] == "PE"
    assert summary["epsilon"] == 1.0 and summary["delta"] == 1e-5
    assert summary["rounds"] == 2 and summary["num_hospitals"] == 3
    assert abs(summary["epsilon_spent_max"] - summary["epsilon"]) < 1e-3
    assert summary["epsilon_spent_max"] <= summary["epsilon"] + 1e-9
    assert summary["num_synthetic"] == 100
    assert 0.0 <= summary["accuracy_real_test"] <= 1.0 and 0.0 <= summary["accuracy_federated"] <= 1.0
    assert 0 < summary["wall_time_s"] < elapsed
    assert sorted(summary["sites"]) == ["0", "1", "2"]
    assert all(site["rounds_answered"] == 2 and not site["refusals"] for site in summary["sites"].values())
    assert summary["dropped_replies"] == []
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert summary["quality"]["available"] and 0.0 <= summary["quality"]["overall"]["recall"] <= 1.0
    report = (run_dir / "report.html").read_text()  # written by the ServerApp at the end of the run
    assert 'id="quality-table"' in report and 'id="votes-round-002"' in report
    classes = sorted(p for p in (run_dir / "synthetic").iterdir() if p.is_dir())
    assert len(classes) == 10
    assert all(len(list(c.glob("*.png"))) == 10 for c in classes)
    # Every site kept its own ledger under the run directory.
    for pid in range(3):
        ledger = json.loads((run_dir / "sites" / f"site-{pid}" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2, 3]  # two vote rounds, the noised evaluation


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(missing)"


def flwr_run_watched(tmp_path: Path, cfg, num_supernodes: int):
    """`flwr run` of ``cfg`` on a private SuperLink (FLWR_HOME under ``tmp_path``); afterwards
    nothing the run started may be left. Returns (run status, the run's log file)."""
    config_file = save_config(cfg, tmp_path / "config.yaml")
    log = tmp_path / "flwr-run.log"
    with ProcessWatch([str(tmp_path)]) as watch:
        try:
            with FlowerSimulation(tmp_path / "flwr-home") as simulation, open(log, "w") as output:
                superlink = simulation.process.pid
                watch.add_root(superlink)
                status = simulation.run(
                    app_dir(), {"config-file": str(config_file)}, num_supernodes=num_supernodes, output=output
                )
            assert_nothing_left(watch, superlink, str(tmp_path))
        finally:
            watch.kill_leftovers()
    return status, log


# ---------------------------------------------------------------------------------- (b) flwr run, 10 sites
def test_flwr_run_with_ten_supernodes(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[*TINY, "federation.num_hospitals=10", f"tracking.run_dir={run_dir}"])
    status, log = flwr_run_watched(tmp_path, cfg, num_supernodes=10)
    assert status.completed, f"run {status.run_id} ended as {status.status}:\n{_tail(log)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_hospitals"] == 10
    assert sorted(summary["sites"], key=int) == [str(i) for i in range(10)]
    assert all(site["rounds_answered"] == 2 for site in summary["sites"].values())
    assert abs(summary["epsilon_spent_max"] - 1.0) < 1e-3 and summary["epsilon_spent_max"] <= 1.0 + 1e-9
    assert summary["num_synthetic"] == 100 and summary["dropped_replies"] == []
    assert (flwr_home / "config.toml").is_file()


# ---------------------------------------------------------------------------------- (c) flwr run, diffusers
@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory) -> str:
    from tiny_diffusers import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.mark.parametrize("task_mode", ["T2I"])
def test_flwr_run_feedback_with_tiny_diffusers(tmp_path, tiny_pipeline_folder, task_mode):
    """A Feedback run through `flwr run` whose ServerApp loads a (tiny, random-weight) Stable
    Diffusion pipeline from a local folder, the way a user's -sgen ./models/sd15 would. I2I goes
    through the same loading code and the same messages; it runs with the real ClientApp handlers
    in tests/test_strategy_final.py (35 s of Flower start-up less in CI)."""
    run_dir = tmp_path / "run"
    cfg = load_config(
        overrides=[
            *TINY,
            "federation.num_hospitals=3",
            f"tracking.run_dir={run_dir}",
            f"generator.name={tiny_pipeline_folder}",
            "generator.steps=2",
            "generator.batch_size=20",
            f"feedback.task_mode={task_mode}",
            "data.image_size=32",
        ]
    )
    status, log = flwr_run_watched(tmp_path, cfg, num_supernodes=3)
    assert status.completed, f"run {status.run_id} ended as {status.status}:\n{_tail(log)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["generator"] == tiny_pipeline_folder and summary["rounds"] == 2
    assert all(site["rounds_answered"] == 2 for site in summary["sites"].values()) and summary["dropped_replies"] == []
    assert summary["num_synthetic"] == 100 and abs(summary["epsilon_spent_max"] - 1.0) < 1e-3
    entries = [json.loads(line) for line in (run_dir / "synthetic" / "index.jsonl").read_text().splitlines()]
    assert len(entries) == 100 and all(e["parent"] is not None and e["round"] == 2 for e in entries)
    # Without fit() the diffusers generator evolves by Private Evolution (feedback.evolve=auto).
    assert {e["genotype"]["mode"] for e in entries} == {"i2i" if task_mode == "I2I" else "t2i"}
    assert all(e["genotype"]["model"] == tiny_pipeline_folder for e in entries)
