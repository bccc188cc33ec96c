"""Tests for coautogen_fl.tracking: JSONL metrics, atomic summary, grids, wandb modes."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coautogen_fl import tracking
from coautogen_fl.tracking import RunTracker, image_grid, read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_log_round_appends_one_json_line_per_round(tmp_path):
    tracker = RunTracker(tmp_path / "run")
    tracker.log_round(0, {"accuracy": 0.25, "phase": "init"})
    tracker.log_round(1, {"accuracy": np.float32(0.5), "votes": [1, 2], "n": np.int64(7)})
    tracker.log_round(2, {"accuracy": 0.75, "hist": np.array([0.5, 1.5])})
    tracker.finish()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"round": 0, "accuracy": 0.25, "phase": "init"}
    assert list(json.loads(lines[1])) == ["round", "accuracy", "votes", "n"]  # round first
    assert read_metrics(tmp_path / "run") == [
        {"round": 0, "accuracy": 0.25, "phase": "init"},
        {"round": 1, "accuracy": 0.5, "votes": [1, 2], "n": 7},
        {"round": 2, "accuracy": 0.75, "hist": [0.5, 1.5]},
    ]


def test_log_round_appends_across_trackers(tmp_path):
    # A resumed run reopens the same directory: earlier rounds must survive.
    RunTracker(tmp_path).log_round(1, {"a": 1})
    RunTracker(tmp_path).log_round(2, {"a": 2})
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]


def test_log_round_fsyncs_each_line(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(tracking.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    tracker = RunTracker(tmp_path)
    tracker.log_round(1, {"a": 1})
    tracker.log_round(2, {"a": 2})
    assert len(synced) == 2


def test_log_round_rejects_round_key(tmp_path):
    with pytest.raises(ValueError, match="round"):
        RunTracker(tmp_path).log_round(1, {"round": 3})


def test_read_metrics_missing_file_and_truncated_tail(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "a": 1}\n{"round": 2, "a"')
    assert read_metrics(tmp_path) == [{"round": 1, "a": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"round": 1\n{"round": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(tmp_path)  # corruption before the last line is not a crash artefact


def test_write_summary_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    tracker = RunTracker(tmp_path)
    path = tracker.write_summary({"final_accuracy": 0.9, "rounds": np.int64(5)})
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text()) == {"final_accuracy": 0.9, "rounds": 5}
    tracker.write_summary({"final_accuracy": 0.95})
    assert json.loads(path.read_text()) == {"final_accuracy": 0.95}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(tracking.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        tracker.write_summary({"final_accuracy": 0.0})
    # The old summary is intact and the half-done temp file was removed.
    assert json.loads(path.read_text()) == {"final_accuracy": 0.95}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_image_grid_places_images_by_class_and_order():
    h, w = 3, 4
    images = np.stack([np.full((h, w), (i + 1) / 10, np.float32) for i in range(7)])
    labels = np.array([2, 0, 2, 1, 2, 2, 0])
    grid = image_grid(images, labels, num_classes=3, per_class=3)
    assert grid.shape == (3 * h, 3 * w)

    def cell(r, c):
        return grid[r * h : (r + 1) * h, c * w : (c + 1) * w]

    assert np.all(cell(0, 0) == images[1]) and np.all(cell(0, 1) == images[6])
    assert np.all(cell(1, 0) == images[3])
    assert [cell(2, c)[0, 0] for c in range(3)] == [images[0, 0, 0], images[2, 0, 0], images[4, 0, 0]]
    # Missing cells are black; the 4th image of class 2 (index 5) was dropped.
    assert np.all(cell(0, 2) == 0) and np.all(cell(1, 1) == 0) and np.all(cell(1, 2) == 0)
    assert not np.any(np.isclose(grid, images[5, 0, 0]))


def test_image_grid_colour_and_label_errors():
    images = np.zeros((2, 5, 5, 3), np.float32)
    images[1, :, :, 2] = 1.0
    grid = image_grid(images, np.array([1, 1]), num_classes=2, per_class=2)
    assert grid.shape == (10, 10, 3)
    assert np.all(grid[5:, 5:, 2] == 1.0) and np.all(grid[5:, 5:, :2] == 0)
    with pytest.raises(ValueError, match="outside"):
        image_grid(images, np.array([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="mismatch"):
        image_grid(images, np.array([0]), num_classes=2)


@pytest.mark.parametrize("colour", [False, True])
def test_log_image_grid_writes_png_of_expected_size(tmp_path, colour):
    rng = np.random.default_rng(0)
    shape = (12, 10, 14, 3) if colour else (12, 10, 14)
    images = rng.random(shape, dtype=np.float32)
    labels = np.arange(12) % 3
    path = RunTracker(tmp_path).log_image_grid("synthetic", images, labels, ["a", "b", "c"], 7, per_class=5)
    assert path == tmp_path / "grids" / "synthetic_round007.png"
    with Image.open(path) as png:
        assert png.size == (5 * 14, 3 * 10)  # (width, height)
        assert png.mode == ("RGB" if colour else "L")
        pixels = np.asarray(png)
    # First image of class 1 is images[1]; its pixels survive the 8-bit round trip.
    np.testing.assert_allclose(pixels[10:20, 0:14] / 255.0, images[1], atol=1 / 255)
    assert np.all(pixels[:, 4 * 14 :] == 0)  # only 4 images per class -> last column black


def test_invalid_wandb_mode_raises_and_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="online.*offline.*disabled"):
        RunTracker(tmp_path / "run", wandb_mode="cloud")
    assert not (tmp_path / "run").exists()


def test_disabled_mode_never_imports_wandb(tmp_path):
    code = (
        "import sys; from coautogen_fl.tracking import RunTracker\n"
        f"t = RunTracker({str(tmp_path)!r}); t.log_round(1, {{'a': 1}}); t.write_summary({{}}); t.finish()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    assert read_metrics(tmp_path) == [{"round": 1, "a": 1}]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolving it could itself use the network
        return host == "localhost"


@pytest.fixture
def no_network(monkeypatch):
    """Make any non-local connection fail, in this process and in wandb's service process."""
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, connections fail at once
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, dead)
    for var in ("NO_PROXY", "no_proxy", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", dead)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DIR", "/nonexistent-restored-by-monkeypatch")
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise OSError(f"test blocked a network connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_wandb_offline_writes_run_under_run_dir(tmp_path, no_network):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    tracker = RunTracker(run_dir, wandb_mode="offline", run_name="t", config={"lr": 0.1})
    init_seconds = time.perf_counter() - start
    tracker.log_round(1, {"accuracy": 0.5})
    tracker.log_image_grid("syn", np.zeros((2, 4, 4), np.float32), np.array([0, 1]), ["a", "b"], 1)
    tracker.write_summary({"final_accuracy": 0.5})
    tracker.finish()
    tracker.finish()  # idempotent
    assert os.environ["WANDB_DIR"] == str(run_dir.resolve())
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert read_metrics(run_dir) == [{"round": 1, "accuracy": 0.5}]
    assert init_seconds < 20, f"wandb offline init took {init_seconds:.1f} s"
