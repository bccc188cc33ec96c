"""The run report (coautogen_fl/report.py): built from a run directory the real strategy wrote
in-process (Feedback, a failed run, Gen), checked section by section, then rendered in headless
Chromium (Debian's ``chromium``; scripts/setup.sh installs it)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from coautogen_fl import protocol as P
from coautogen_fl.report import REPORT_FILE, SECTIONS, write_report
from simulations.cli import main as cli_main
from strategies.server_app import build_strategy, run_summary, write_run_report
from strategies.strategy import RoundFailed

from strategy_helpers import (
    NUM_CLASSES,
    FakeGrid,
    eval_reply,
    integer_votes,
    small_config,
    train_messages,
    vote_reply,
)

NODES = [11, 12, 13, 14]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Page(HTMLParser):
    """What the tests read from a report: sections, headings, images and ledger rows."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.images: dict[str, str] = {}  # id -> src
        self.all_srcs: list[str] = []
        self.site_rows: list[str] = []
        self.class_rows: dict[str, int] = {}  # grid id -> rows
        self._grid = ""
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "div" and a.get("id", "").startswith(("pool-round-", "final-grid")):
            self._grid = a["id"]
            self.class_rows[self._grid] = 0
        if tag == "tr" and "data-class" in a and self._grid:
            self.class_rows[self._grid] += 1
        if tag == "tr" and a.get("class") == "site-row":
            self.site_rows.append(a["data-site"])
        if tag == "img":
            self.all_srcs.append(a.get("src", ""))
            if a.get("id"):
                self.images[a["id"]] = a.get("src", "")
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


@pytest.fixture(scope="module")
def identity():
    """Messages read the run/node/task identity of the process, as inside a ServerApp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_task_id", 1)
        mp.setattr(TaskIdentity, "_run_id", 4242)
        mp.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        yield


def vote_round(strategy, server_round: int, grid: FakeGrid, refuse: set[int] = frozenset()):
    """One round of replies as sites send them; the nodes in ``refuse`` refuse on their terms."""
    replies = []
    for i, m in enumerate(train_messages(strategy, server_round, grid)):
        node = m.metadata.dst_node_id
        if node in refuse:
            replies.append(Message(Error(code=P.ERROR_BUDGET_EXCEEDED, reason="over budget"), reply_to=m))
        else:
            replies.append(vote_reply(m, integer_votes(node + server_round), 0.4 * server_round, i))
    return strategy.aggregate_train(server_round, replies)


def finish_run(strategy, run_dir: Path, failure: str | None = None) -> dict:
    """What the ServerApp does at the end: summary.json, then the report (the hook under test)."""
    summary = run_summary(strategy.cfg, strategy, run_dir, 1.0, failure)
    strategy.final.tracker.write_summary(summary)
    write_run_report(run_dir)
    return summary


@pytest.fixture(scope="module")
def feedback_run(identity, tmp_path_factory):
    """A 2-round Feedback run of 4 sites (one refuses round 2), with clear federated evaluation."""
    run_dir = tmp_path_factory.mktemp("feedback")
    s = build_strategy(small_config("privacy.evaluation=clear", "federation.num_hospitals=4"), run_dir)
    grid = FakeGrid(NODES)
    vote_round(s, 1, grid)
    arrays, _ = vote_round(s, 2, grid, refuse={14})
    evaluations = list(s.configure_evaluate(2, arrays, ConfigRecord(), grid))
    s.aggregate_evaluate(2, [eval_reply(m, 0.5, 20, i) for i, m in enumerate(evaluations)])
    return run_dir, finish_run(s, run_dir)


def test_every_section_has_real_content(feedback_run):
    run_dir, summary = feedback_run
    text = (run_dir / REPORT_FILE).read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS) and page.headings == list(SECTIONS.values())
    # grids: one row per class in both voted pools and in the final dataset, each with its strip
    assert page.class_rows == {"pool-round-001": NUM_CLASSES, "pool-round-002": NUM_CLASSES, "final-grid": NUM_CLASSES}
    assert sum(src.startswith("data:image/png;base64,") for src in page.all_srcs) >= 3 * NUM_CLASSES
    # a vote histogram per round, the spend curve and the accuracy bars
    for key in ("votes-round-001", "votes-round-002", "spend-curve", "accuracy-bars"):
        assert page.images[key].startswith("data:image/png;base64,") and len(page.images[key]) > 2000
    # the ledger: one row per site of summary.json, the refusal shown
    assert page.site_rows == list(summary["sites"]) and len(page.site_rows) == len(NODES)
    assert "refused: round 2" in text
    # quality: finite numbers, overall and per class, in summary.json and in the page
    quality = summary["quality"]
    assert quality["available"] is True and set(quality["per_class"]) == {str(c) for c in range(NUM_CLASSES)}
    for key in ("frechet_distance", "precision", "recall"):
        assert math.isfinite(quality["overall"][key])
    assert 0.0 <= quality["overall"]["precision"] <= 1.0 and 0.0 <= quality["overall"]["recall"] <= 1.0
    assert f"{quality['overall']['frechet_distance']:.4g}" in text
    assert json.loads((run_dir / "summary.json").read_text())["quality"] == quality


def test_the_report_is_self_contained_and_small(feedback_run):
    run_dir, _ = feedback_run
    text = (run_dir / REPORT_FILE).read_text()
    assert not re.search(r"https?://", text, re.IGNORECASE)  # no external reference of any kind
    assert "<script" not in text.lower() and "@import" not in text
    assert all(src.startswith("data:") for src in Page(text).all_srcs)
    assert len(text.encode()) < 5_000_000


def test_a_failed_run_shows_its_reason_and_what_exists(identity, tmp_path):
    s = build_strategy(small_config(), tmp_path)
    grid = FakeGrid(NODES)
    vote_round(s, 1, grid)
    with pytest.raises(RoundFailed) as failed:
        vote_round(s, 2, grid, refuse=set(NODES))
    summary = finish_run(s, tmp_path, str(failed.value))
    text = (tmp_path / REPORT_FILE).read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert 'id="failure-reason"' in text and "fewer than the 3 the run needs" in text
    assert page.class_rows == {"pool-round-001": NUM_CLASSES}  # the decided round is shown; round 2 never was
    assert "votes-round-001" in page.images and "spend-curve" in page.images
    assert "the run stopped before the final dataset was drawn" in text
    assert page.site_rows == list(summary["sites"])


def test_a_gen_run_has_no_voted_pools(identity, tmp_path):
    s = build_strategy(small_config("feedback.framework=Gen", "privacy.evaluation=clear"), tmp_path)

    class EvaluatingGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [eval_reply(m, 0.25, 8, i) for i, m in enumerate(messages)]

    s.start(grid=EvaluatingGrid(NODES), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    summary = finish_run(s, tmp_path)
    text = (tmp_path / REPORT_FILE).read_text()
    page = Page(text)
    assert "draws the final dataset without voting rounds" in text
    assert page.class_rows == {"final-grid": NUM_CLASSES} and "spend-curve" in page.images
    assert summary["quality"]["available"] and len(page.site_rows) == len(NODES)


def test_missing_and_broken_files_never_stop_the_report(tmp_path):
    empty = write_report(tmp_path)  # nothing at all: every section says what is missing
    text = empty.read_text()
    assert Page(text).sections == list(SECTIONS) and "wrote no summary.json" in text
    (tmp_path / "summary.json").write_text("{ not json")
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "epsilon_spent": {"0": 0.5}}\nbroken\n')
    (tmp_path / "rounds" / "round_001").mkdir(parents=True)
    (tmp_path / "rounds" / "round_001" / "index.jsonl").write_text('{"label": 0, "file": "0/gone.png", "votes": 1.0}\n')
    text = write_report(tmp_path).read_text()
    assert "no readable image" in text and Page(text).sections == list(SECTIONS)
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nowhere")


def test_cli_report_rebuilds_the_file(feedback_run, tmp_path, capsys):
    run_dir, _ = feedback_run
    (run_dir / REPORT_FILE).unlink()
    assert cli_main(["report", str(run_dir)]) == 0
    assert (run_dir / REPORT_FILE).is_file() and str(run_dir / REPORT_FILE) in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert cli_main(["report", str(tmp_path)]) == 2  # a folder that is no run directory


# ---------------------------------------------------------------------------------- rendering
def chromium(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own process group with a fresh profile; on a timeout or any
    failure the group it started (and only that) is killed."""
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            try:  # the browser's helpers share its group; whatever of it is left goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="no chromium: scripts/setup.sh installs it (apt-get, as root)")
def test_the_report_renders_in_headless_chromium(feedback_run, tmp_path):
    run_dir, _ = feedback_run
    url = (run_dir / REPORT_FILE).resolve().as_uri()
    shot = tmp_path / "report.png"
    done = chromium([f"--screenshot={shot}", "--window-size=1200,3000", url])
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.02  # not blank: text, tables and images drawn
    dom = chromium(["--dump-dom", url]).stdout
    page = Page(dom)
    assert page.headings == list(SECTIONS.values()) and page.sections == list(SECTIONS)
    assert page.site_rows and "votes-round-002" in page.images


def test_log_final_mirrors_the_quality_numbers_to_the_trackers_run_summary(tmp_path):
    from coautogen_fl.tracking import RunTracker

    class FakeRun:  # the part of a wandb run log_final uses
        summary: dict = {}

    tracker = RunTracker(tmp_path)
    tracker.log_final("quality", {"available": True})  # no wandb run: nothing to do
    tracker._run = FakeRun()
    tracker.log_final(
        "quality",
        {
            "available": True,
            "k": 3,
            "overall": {"precision": 0.5, "recall": None},
            "per_class": {"a": {"frechet_distance": np.float64(1.5)}},
        },
    )
    assert FakeRun.summary == {
        "quality/k": 3.0,
        "quality/overall/precision": 0.5,
        "quality/per_class/a/frechet_distance": 1.5,
    }
    assert not (tmp_path / "metrics.jsonl").exists()  # end-of-run numbers are no round


def test_without_real_test_data_the_quality_section_says_so(identity, tmp_path):
    s = build_strategy(small_config(), tmp_path)
    s.final.real_test = None  # a deployment's server: no central real test split
    quality = s.final.measure_quality(np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64))
    assert quality == {"available": False, "reason": quality["reason"]} and "no real test data" in quality["reason"]
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "quality": quality}))
    text = write_report(tmp_path).read_text()
    assert "Not measured: the server holds no real test data" in text


def test_a_server_app_that_crashes_still_leaves_a_report(identity, tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from coautogen_fl.config import save_config
    from strategies import server_app
    from strategies.strategy import CoAutoGenStrategy

    def crash(self, **kwargs):
        raise RuntimeError("a generator ran out of memory")

    monkeypatch.setattr(CoAutoGenStrategy, "start", crash)
    cfg = small_config(f"tracking.run_dir={tmp_path / 'run'}")
    save_config(cfg, tmp_path / "run.yaml")
    context = Context(
        run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={"config-file": str(tmp_path / "run.yaml")}
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        server_app.main(FakeGrid(NODES), context)
    text = (tmp_path / "run" / REPORT_FILE).read_text()
    assert "wrote no summary.json" in text and Page(text).sections == list(SECTIONS)


def test_dpsgd_rounds_of_real_and_mix_runs_get_an_accuracy_curve(tmp_path):
    spend = {"0": 0.2}
    lines = [
        {"round": 1, "votes_received": 3, "aggregate_noise_std": 9.0, "epsilon_spent": spend},
        {
            "round": 2,
            "phase": "dpsgd",
            "updates_received": 3,
            "dp_noise_multiplier": 1.1,
            "accuracy_real_test": 0.4,
            "epsilon_spent": {"0": 0.6},
        },
        {
            "round": 3,
            "phase": "dpsgd",
            "updates_received": 3,
            "dp_noise_multiplier": 1.1,
            "accuracy_real_test": 0.5,
            "epsilon_spent": {"0": 0.9},
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    site = {
        "partition_id": 0,
        "node_id": 1,
        "status": "answered",
        "rounds_answered": 3,
        "epsilon_budget": 1.0,
        "epsilon_spent": 0.95,
        "refusals": [],
        "failures": [],
    }
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {"status": "completed", "task_type": "mix", "epsilon": 1.0, "accuracy_real_test": 0.5, "sites": {"0": site}}
        )
    )
    page = Page(text := write_report(tmp_path).read_text())
    assert {"spend-curve", "accuracy-curve", "accuracy-bars"} <= set(page.images)
    assert "<th>phase</th>" in text and "<th>valid replies</th>" in text and page.site_rows == ["0"]
    (tmp_path / "summary.json").write_text(
        json.dumps({"status": "completed", "task_type": "real", "sites": {"0": site}})
    )
    assert write_report(tmp_path).read_text().count("Task type real") == 3  # pools, final dataset, quality
