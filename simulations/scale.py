"""Scale benchmark: sites x privacy mode on one machine, with time and whole-process-tree memory.

    python -m simulations.scale --out /tmp/scale [--sites 10 100 1000] [--modes local central secagg]
                                [--doc docs/benchmarks.md] [key=value ...]

Each (sites, mode) is one real `coautogen run` (a full Flower simulation) on the scale workload,
``data.name=digits-shifted``: the 1,257 private digits of the default split, each 40 times with a
random shift of up to 2 pixels (50,280 images; the central test split stays the 540 original
digits), ``feedback.rounds=2``, everything else the embedded default. While it runs, the resident
memory of the command's whole process tree (launcher, SuperLink, simulation engine, Ray and its
actors) is sampled every 0.5 s. Each finished run goes to ``<out>/results.jsonl`` at once (a
rerun skips it); the table, a plot, and (with ``--doc``) the block between the scale markers of
that Markdown file come from every run in it.

Columns: accuracy_real_test; the ServerApp's wall time (``summary.json``); the peak RSS of the tree;
the time per site-round (the vote rounds' own wall time over sites x rounds, from
``metrics.jsonl``: what one more site costs a round, set-up excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from .benchmark import load_results, set_aside

START, END = "<!-- scale:start -->", "<!-- scale:end -->"
WORKLOAD = ("data.name=digits-shifted", "feedback.rounds=2")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(out: Path, sites: int, mode: str, overrides: list[str]) -> dict:
    """One `coautogen run` with ``sites`` sites in ``mode``; its numbers and the tree's peak RSS."""
    name = f"scale-{mode}-{sites}"
    set_aside(out / name)
    command = [
        sys.executable,
        "-m",
        "simulations.cli",
        "run",
        "--out",
        str(out),
        "--name",
        name,
        "--num-hospitals",
        str(sites),
        f"privacy.mode={mode}",
        *WORKLOAD,
        *overrides,
    ]
    started = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    seconds = time.time() - started
    summary_file = out / name / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    rounds = (
        [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        if (out / name / "metrics.jsonl").is_file()
        else []
    )
    round_time = sum(r.get("round_time_s", 0.0) for r in rounds)
    return {
        "status": summary.get("status", "failed") if code == 0 else "failed",
        "exit_code": code,
        "accuracy_real_test": summary.get("accuracy_real_test"),
        "serverapp_s": summary.get("wall_time_s"),
        "command_s": seconds,
        "peak_rss_mb": peak[0] / 2**20,
        "round_s": round_time,
        "site_round_s": round_time / (sites * len(rounds)) if rounds else None,
        "run_dir": str(out / name),
    }


def run_all(out: Path, sites: list[int], modes: list[str], overrides: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = load_results(path)
    for n in sites:
        for mode in modes:
            key = f"{mode}|{n}"
            if key in done:
                continue
            print(f"scale: {n} sites, {mode} ...", file=sys.stderr, flush=True)
            record = {"key": key, "sites": n, "mode": mode, **run_one(out, n, mode, overrides)}
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            done[key] = record
    return list(done.values())


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(records: list[dict]) -> str:
    lines = [
        "| sites | mode | accuracy_real_test | ServerApp wall (s) | peak RSS, process tree (MB) "
        "| time per site-round (s) | status |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"local": 0, "central": 1, "secagg": 2}
    for r in sorted(records, key=lambda r: (r["sites"], order.get(r["mode"], 9))):
        lines.append(
            f"| {r['sites']} | {r['mode']} | {_cell(r['accuracy_real_test'], '.3f')} "
            f"| {_cell(r['serverapp_s'], '.0f')} | "
            f"{_cell(r['peak_rss_mb'], '.0f')} | {_cell(r['site_round_s'], '.3f')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def fits(records: list[dict]) -> str:
    """Least-squares lines against sites, in words: peak RSS (base + per site, all runs) and, per
    mode, the vote rounds' time (fixed + per site-round: the marginal cost of one more site)."""
    import numpy as np

    done = [r for r in records if r["status"] == "completed"]
    lines = []
    if len({r["sites"] for r in done}) >= 2:
        slope, base = np.polyfit([r["sites"] for r in done], [r["peak_rss_mb"] for r in done], 1)
        lines.append(f"- Peak RSS of the process tree, fit over all runs: {base:.0f} MB + {slope:.3f} MB per site.")
    for mode in ("local", "central", "secagg"):
        rows = [r for r in done if r["mode"] == mode]
        if len({r["sites"] for r in rows}) >= 2:
            rounds = 2  # WORKLOAD's feedback.rounds
            slope, fixed = np.polyfit([r["sites"] for r in rows], [r["round_s"] / rounds for r in rows], 1)
            lines.append(
                f"- {mode}: a vote round takes {fixed:.1f} s + {slope:.3f} s per site (marginal time per site-round)."
            )
    return "\n".join(lines) + "\n" if lines else ""


def plot(records: list[dict], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, per) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("local", "central", "secagg"):
        rows = sorted(
            (r for r in records if r["mode"] == mode and r["status"] == "completed"), key=lambda r: r["sites"]
        )
        if rows:
            acc.plot([r["sites"] for r in rows], [r["accuracy_real_test"] for r in rows], marker="o", label=mode)
            per.plot([r["sites"] for r in rows], [r["site_round_s"] for r in rows], marker="o", label=mode)
    for ax, label in ((acc, "accuracy_real_test"), (per, "time per site-round (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("sites (same private data, split finer)")
        ax.set_ylabel(label)
        ax.legend()
    acc.set_title("utility vs sites, epsilon 1")
    per.set_title("server-side time per site and round")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    from .benchmark import write_doc

    parser = argparse.ArgumentParser(prog="python -m simulations.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--modes", nargs="+", default=["local", "central", "secagg"], choices=["local", "central", "secagg"]
    )
    parser.add_argument("--doc", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    records = run_all(out, args.sites, args.modes, args.overrides)
    chart = plot(records, out / "scale.png")
    command = (
        "python -m simulations.scale --out <dir> --sites "
        + " ".join(map(str, args.sites))
        + " --modes "
        + " ".join(args.modes)
        + "".join(f" {o}" for o in args.overrides)
    )
    block = (
        f"Command (results.jsonl keeps every run; a rerun skips finished runs):\n\n```bash\n{command}\n```\n\n"
        f"Workload: {' '.join(WORKLOAD)} (see the module docstring), epsilon 1, one run per cell.\n\n"
        f"{table(records)}\n{fits(records)}\n![scale](benchmark_scale.png)\n"
    )
    (out / "scale.md").write_text(block)
    if args.doc:
        import shutil

        shutil.copyfile(chart, args.doc.parent / "benchmark_scale.png")
        write_doc(args.doc, block, START, END, "## Scale (issue 11)")
    sys.stdout.write("\n" + block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
