"""`coautogen review RUN_DIR`: the page, driven by keyboard in headless Chromium (Debian's chromium,
over the DevTools protocol), writes each decision to RUN_DIR/review.json, suggests the same
decision for near neighbours, and `coautogen export` honours what was decided."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from simulations.cli import main as cli_main
from simulations.review import ReviewState, serve

import cdp


@pytest.fixture
def run_dir(tmp_path):
    """A final dataset of 2 classes x 4 images: class 0 bright squares of growing size, class 1 bars."""
    run = tmp_path / "run"
    entries = []
    for label, name in enumerate(("square", "bar")):
        (run / "synthetic" / name).mkdir(parents=True)
        for i in range(4):
            image = np.zeros((16, 16), dtype=np.uint8)
            if label == 0:
                image[4 : 8 + i, 4 : 8 + i] = 255
            else:
                image[:, 2 + 3 * i : 4 + 3 * i] = 255
            image_id = f"{name}-{i}"
            Image.fromarray(image).save(run / "synthetic" / name / f"{image_id}.png")
            entries.append(
                {
                    "id": image_id,
                    "label": label,
                    "genotype": {},
                    "parent": None,
                    "round": 1,
                    "file": f"{name}/{image_id}.png",
                }
            )
    (run / "synthetic" / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return run


def decisions(run_dir) -> dict:
    path = run_dir / "review.json"
    return json.loads(path.read_text())["decisions"] if path.is_file() else {}


def wait_for_decision(run_dir, image_id, timeout=20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if image_id in decisions(run_dir):
            return decisions(run_dir)[image_id]
        time.sleep(0.1)
    raise TimeoutError(f"no decision for {image_id} in review.json")


def test_a_reject_suggests_its_neighbours_and_nothing_changes_until_confirmed(run_dir):
    state = ReviewState(run_dir)
    suggested = state.decide("square-0", "reject")
    assert suggested[0] == "square-1" and set(suggested) <= {
        "square-1",
        "square-2",
        "square-3",
    }  # its own class, nearest first
    assert set(decisions(run_dir)) == {"square-0"}  # a suggestion is not a decision
    assert state.decide("bar-0", "accept") == []  # accepting as is suggests nothing
    assert state.decide("bar-1", "accept", label=0)[0] == "bar-2"  # a relabel spreads to the nearest bars


@pytest.mark.skipif(not cdp.available(), reason="no chromium: scripts/setup.sh installs it (apt-get, as root)")
def test_the_page_records_keyboard_decisions_on_disk(run_dir):
    server = serve(run_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser = cdp.Browser()
    try:
        browser.navigate(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.wait_for("document.body.dataset.loaded === '1'")
        assert browser.evaluate("document.querySelectorAll('.card').length") == 8
        browser.press("r")  # the first card: square-0
        assert wait_for_decision(run_dir, "square-0") == {"status": "reject"}
        text = browser.wait_for("document.getElementById('suggestion').textContent")
        assert "square-1" in text and "y / n" in text
        browser.press("y")  # confirm: the suggested neighbours are rejected too
        suggested = [s for s in ("square-1", "square-2", "square-3") if s in text]
        for image_id in suggested:
            assert wait_for_decision(run_dir, image_id) == {"status": "reject"}
        for _ in range(4):
            browser.press("ArrowRight")  # to bar-0, the first card of class 1
        browser.press("0")  # relabel it as a square
        assert wait_for_decision(run_dir, "bar-0") == {"status": "accept", "label": 0}
        browser.wait_for("document.getElementById('card-bar-0').dataset.label === '0'")
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    assert cli_main(["export", str(run_dir)]) == 0
    exported = sorted(
        p.relative_to(run_dir / "export-imagefolder").as_posix()
        for p in (run_dir / "export-imagefolder").rglob("*.png")
    )
    kept_squares = [f"square/square-{i}.png" for i in range(4) if f"square-{i}" not in decisions(run_dir)]
    assert exported == sorted(["bar/bar-1.png", "bar/bar-2.png", "bar/bar-3.png", "square/bar-0.png", *kept_squares])
