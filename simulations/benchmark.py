"""Benchmark: Feedback against Gen on the embedded default, through the real `coautogen run`.

    python -m simulations.benchmark --out /tmp/bench --seeds 0 1 2 [key=value ...]

Runs both frameworks (same generator, same volume, same downstream training) for each
generator seed, each as a full Flower simulation, and prints a Markdown table of
accuracy_real_test, accuracy_federated, epsilon_spent_max and wall-clock time (the end-to-end
time of the command, SuperLink start-up included) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from .cli import main as coautogen_main


def run_once(out: Path, name: str, framework: str, seed: int, overrides: list[str]) -> dict:
    """One `coautogen run`; returns its summary plus the command's wall-clock seconds."""
    argv = ["run", "--out", str(out), "--name", name, "-f", framework, f"generator.seed={seed}", *overrides]
    started = time.time()
    code = coautogen_main(argv)
    elapsed = time.time() - started
    if code != 0:
        raise SystemExit(f"benchmark run {name} failed with exit code {code}; see {out / name / 'flower.log'}")
    summary = json.loads((out / name / "summary.json").read_text())
    return {**summary, "command_s": elapsed}


def table(rows: list[dict]) -> str:
    buf = io.StringIO()
    buf.write("| framework | seed | accuracy_real_test | accuracy_federated | epsilon_spent_max | command time (s) |\n")
    buf.write("|---|---|---|---|---|---|\n")
    for r in rows:
        buf.write(f"| {r['framework']} | {r['seed']} | {r['accuracy_real_test']:.4f} | {r['accuracy_federated']:.4f} "
                  f"| {r['epsilon_spent_max']:.4f} | {r['command_s']:.1f} |\n")
    for framework in ("Gen", "Feedback"):
        accs = [r["accuracy_real_test"] for r in rows if r["framework"] == framework]
        if accs:
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            buf.write(f"| **{framework} mean** | | **{statistics.mean(accs):.4f}** (sd {spread:.4f}) | | | |\n")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="parent folder of the benchmark's run directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generator seeds")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    rows = []
    for seed in args.seeds:
        for framework in ("Gen", "Feedback"):
            summary = run_once(out, f"{framework.lower()}-seed{seed}", framework, seed, args.overrides)
            rows.append({**summary, "seed": seed})
    report = table(rows)
    (out / "benchmark.md").write_text(report)
    sys.stdout.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
