"""simulations/scale.py's report: the table, the fitted per-site costs and the process-tree memory."""

from __future__ import annotations

import os
import subprocess
import sys

from simulations import scale


def record(sites, mode, round_s, rss, status="completed"):
    return {
        "sites": sites,
        "mode": mode,
        "status": status,
        "accuracy_real_test": 0.5,
        "serverapp_s": 10.0,
        "peak_rss_mb": rss,
        "round_s": round_s,
        "site_round_s": round_s / (2 * sites),
    }


def test_fits_recover_the_fixed_and_per_site_costs():
    # a round: 4 s + 0.02 s per site; memory: 5000 MB + 0.5 MB per site
    records = [record(n, "local", 2 * (4 + 0.02 * n), 5000 + 0.5 * n) for n in (10, 100, 1000)]
    text = scale.fits(records + [record(50, "secagg", 1.0, 9e9, status="failed")])
    assert "5000 MB + 0.500 MB per site" in text
    assert "local: a vote round takes 4.0 s + 0.020 s per site" in text
    assert "secagg" not in text  # a failed run is not fitted


def test_table_orders_by_sites_then_mode_and_marks_failures():
    rows = scale.table(
        [
            record(100, "secagg", 8.0, 1.0),
            record(10, "central", 2.0, 1.0),
            record(100, "local", 4.0, 1.0),
            {
                **record(1000, "local", 0, 0, "failed"),
                "accuracy_real_test": None,
                "serverapp_s": None,
                "site_round_s": None,
            },
        ]
    )
    lines = rows.strip().splitlines()[2:]
    assert [line.split("|")[1:3] for line in lines] == [
        [" 10 ", " central "],
        [" 100 ", " local "],
        [" 100 ", " secagg "],
        [" 1000 ", " local "],
    ]
    assert lines[-1].endswith("| - | - | 0 | - | failed |")


def test_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        import time

        own = scale.tree_rss(os.getpid())
        deadline = time.time() + 20
        while scale.tree_rss(os.getpid()) < own + 150 * 2**20 and time.time() < deadline:
            time.sleep(0.2)
        assert scale.tree_rss(os.getpid()) >= own + 150 * 2**20  # the child's 200 MB are in the tree
    finally:
        child.kill()
        child.wait()
    assert scale.tree_rss(child.pid) == 0  # gone
