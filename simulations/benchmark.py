"""Benchmark harness: every way to get a model out of the sites' private data, side by side.

    python -m simulations.benchmark --out /tmp/bench [--seeds 0 1 2] [--epsilons 1 4]
                                    [--rows gen feedback-local ...] [--doc docs/benchmarks.md] [key=value ...]

Each row is run for every (epsilon, seed): the `coautogen run` rows go through the real command
(a full Flower simulation, the embedded default plus the row's overrides), ``dpsgd-pooled`` is
the pooled DP-SGD reference (best of a small stated grid, :mod:`simulations.dpsgd_baseline`).
Every finished run is appended to ``<out>/results.jsonl`` at once, and a rerun skips what is
there, so an interrupted benchmark loses nothing. At the end the harness writes the table (mean
and sd over seeds, wall time per run), the accuracy-vs-epsilon plot and the targets of issue 10
met or missed in numbers; with ``--doc`` it replaces the block between the benchmark markers of
that Markdown file (and copies the plot beside it).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Markers of the generated block in the --doc file.
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


@dataclass(frozen=True)
class Row:
    """One way to get a model: a `coautogen run` with overrides, or the pooled reference."""

    name: str
    description: str
    overrides: tuple[str, ...] = ()
    pooled: bool = False


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("gen", "Gen: the generator's prior, no votes", ("-f", "Gen")),
        Row("feedback-local", "Feedback, local DP (the main job)"),
        Row("feedback-central", "Feedback, central DP", ("privacy.mode=central",)),
        Row(
            "feedback-secagg",
            "Feedback, secagg: votes summed by SecAgg+ (no server sees a site's votes)",
            ("privacy.mode=secagg",),
        ),
        Row(
            "candidates",
            "Feedback, central, feedback.evolve=candidates (Private Evolution proper)",
            ("privacy.mode=central", "feedback.evolve=candidates"),
        ),
        Row(
            "filter-rf",
            "Filter framework with the RF rater (the seed's -f Filter -r RF, made DP)",
            ("-f", "Filter", "-r", "RF"),
        ),
        Row("pcevolve", "Feedback with the PCEvolve rater (prototype-contrastive votes)", ("-r", "PCEvolve")),
        Row(
            "active",
            "Active framework: votes plus DP per-class errors of the round's model steer the pool",
            ("-f", "Active"),
        ),
        Row("dpsgd-pooled", "DP-SGD on the pooled private data (opacus, best of a stated grid)", pooled=True),
        Row("real", "-tt real: federated DP-SGD at the sites", ("-tt", "real")),
        Row("mix", "-tt mix: votes, synthetic data and federated DP-SGD", ("-tt", "mix")),
        # Central DP-SGD: 32 x 5 = 160 pooled steps at rate 0.25 = the pooled reference grid's 40 epochs.
        Row(
            "real-central",
            "-tt real, central: pooled DP-SGD steps on the sites' clipped gradient sums",
            ("-tt", "real", "privacy.mode=central", "downstream.dp_rounds=32"),
        ),
        Row(
            "mix-central",
            "-tt mix, central: votes, synthetic pretraining, pooled DP-SGD steps",
            ("-tt", "mix", "privacy.mode=central", "downstream.dp_rounds=32"),
        ),
        # Secure DP-SGD: 20 x 5 = 100 pooled full-batch steps through SecAgg+ (full batches: see docs/privacy.md).
        Row(
            "real-secagg",
            "-tt real, secagg: pooled full-batch DP-SGD steps on a SecAgg+ sum (no server sees a gradient)",
            ("-tt", "real", "privacy.mode=secagg", "downstream.dp_rounds=20"),
        ),
        Row(
            "mix-secagg",
            "-tt mix, secagg: secure votes, synthetic pretraining, pooled DP-SGD steps on SecAgg+ sums",
            ("-tt", "mix", "privacy.mode=secagg", "downstream.dp_rounds=20"),
        ),
        # The same with every sampled site in each sum (threshold 1: any dropout aborts the round), so
        # each share is sized for all 10 sites and a sum carries exactly the central noise.
        Row(
            "mix-secagg-all",
            "-tt mix, secagg with privacy.secagg_threshold=1 (every site in each sum: the central noise)",
            ("-tt", "mix", "privacy.mode=secagg", "downstream.dp_rounds=20", "privacy.secagg_threshold=1.0"),
        ),
    )
}


def run_key(row: str, epsilon: float, seed: int) -> str:
    return f"{row}|{epsilon:g}|{seed}"


def set_aside(run_dir: Path) -> Path | None:
    """Move the directory of an interrupted earlier attempt (a run not in results.jsonl) aside to
    ``<name>.interrupted-N`` instead of deleting it or letting `coautogen run` refuse the name."""
    if not run_dir.exists():
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.interrupted-{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.interrupted-{n}")
    run_dir.rename(target)
    print(f"benchmark: {run_dir.name} held an interrupted attempt; moved to {target.name}", file=sys.stderr)
    return target


def coautogen_run(out: Path, row: Row, epsilon: float, seed: int, overrides: list[str]) -> dict:
    """One `coautogen run` of a row; its summary plus the command's wall-clock seconds."""
    from .cli import main as coautogen_main

    name = f"{row.name}-eps{epsilon:g}-seed{seed}"
    set_aside(out / name)
    argv = [
        "run",
        "--out",
        str(out),
        "--name",
        name,
        *row.overrides,
        f"privacy.epsilon={epsilon}",
        f"generator.seed={seed}",
        f"downstream.seed={seed}",
        *overrides,
    ]
    started = time.time()
    code = coautogen_main(argv)
    seconds = time.time() - started
    summary_file = out / name / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if code != 0:
        return {
            "status": "failed",
            "reason": summary.get("reason") or f"exit code {code}; see {out / name / 'flower.log'}",
            "seconds": seconds,
            "run_dir": str(out / name),
        }
    return {
        "status": summary.get("status", "completed"),
        "accuracy_real_test": summary.get("accuracy_real_test"),
        "accuracy_federated": summary.get("accuracy_federated"),
        "epsilon_spent_max": summary.get("epsilon_spent_max"),
        "seconds": seconds,
        "run_dir": str(out / name),
    }


def pooled_run(out: Path, row: Row, epsilon: float, seed: int, overrides: list[str]) -> dict:
    """The pooled DP-SGD reference at ``epsilon``: best of its grid (see simulations.dpsgd_baseline)."""
    from .dpsgd_baseline import run_pooled

    result = run_pooled(epsilon, seed, overrides=overrides)
    return {
        "status": "completed",
        "accuracy_real_test": result["accuracy_real_test"],
        "epsilon_spent_max": epsilon,
        "seconds": result["seconds"],
        "settings": result.get("settings"),
        "grid": result.get("grid"),
    }


def load_results(path: Path) -> dict[str, dict]:
    """The finished runs of an earlier (possibly interrupted) invocation, by run key."""
    if not path.is_file():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            results[record["key"]] = record
    return results


def run_all(
    out: Path,
    rows: list[str],
    epsilons: list[float],
    seeds: list[int],
    overrides: list[str],
    runner: Callable[[Path, Row, float, int, list[str]], dict] | None = None,
) -> list[dict]:
    """Run every (row, epsilon, seed) not yet in ``<out>/results.jsonl``; return all records."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = load_results(path)
    for epsilon in epsilons:
        for seed in seeds:
            for name in rows:
                key = run_key(name, epsilon, seed)
                if key in done:
                    continue
                row = ROWS[name]
                run = runner or (pooled_run if row.pooled else coautogen_run)
                print(f"benchmark: {key} ...", file=sys.stderr, flush=True)
                record = {
                    "key": key,
                    "row": name,
                    "epsilon": epsilon,
                    "seed": seed,
                    **run(out, row, epsilon, seed, overrides),
                }
                with path.open("a") as handle:  # at once: an interrupted benchmark keeps every finished run
                    handle.write(json.dumps(record) + "\n")
                done[key] = record
    return [r for r in done.values() if r["row"] in rows and r["epsilon"] in epsilons and r["seed"] in seeds]


def aggregate(records: list[dict]) -> dict[tuple[str, float], dict]:
    """Mean, sd, count and mean seconds of accuracy_real_test per (row, epsilon)."""
    cells: dict[tuple[str, float], dict] = {}
    for key in sorted({(r["row"], r["epsilon"]) for r in records}, key=lambda k: (list(ROWS).index(k[0]), k[1])):
        runs = [r for r in records if (r["row"], r["epsilon"]) == key]
        accs = [
            r["accuracy_real_test"]
            for r in runs
            if r.get("status") == "completed" and r.get("accuracy_real_test") is not None
        ]
        cells[key] = {
            "mean": statistics.mean(accs) if accs else None,
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "runs": accs,
            "failed": len(runs) - len(accs),
            "seconds": statistics.mean(r["seconds"] for r in runs),
        }
    return cells


def table(cells: dict[tuple[str, float], dict]) -> str:
    """The Markdown table: one line per (row, epsilon)."""
    buf = io.StringIO()
    buf.write(
        "| row | epsilon | accuracy_real_test mean (sd) | per seed | failed | wall time per run (s) |\n"
        "|---|---|---|---|---|---|\n"
    )
    for (name, epsilon), c in cells.items():
        mean = "n/a" if c["mean"] is None else f"**{c['mean']:.4f}** ({c['sd']:.4f})"
        seeds = ", ".join(f"{a:.4f}" for a in c["runs"])
        buf.write(
            f"| {ROWS[name].description} | {epsilon:g} | {mean} | {seeds} | {c['failed']} | {c['seconds']:.0f} |\n"
        )
    return buf.getvalue()


def targets(cells: dict[tuple[str, float], dict]) -> str:
    """Issue 10's targets at epsilon 1, each met or missed in numbers (n/a when a row did not run)."""

    def mean(row: str, eps: float = 1.0) -> float | None:
        return cells.get((row, eps), {}).get("mean")

    def line(what: str, value: float | None, target: float) -> str:
        if value is None:
            return f"- {what}: not measured in this invocation (target >= {target:.2f})"
        return (
            f"- {what}: {value:.4f}, target >= {target:.2f}: "
            f"**{'met' if value >= target else f'missed by {target - value:.4f}'}**"
        )

    gen, local = mean("gen"), mean("feedback-local")
    lines = [
        line("Synthetic only (Feedback, local, epsilon 1)", local, 0.70),
        line(
            "Synthetic only with secure votes (Feedback, secagg: no server sees a site's votes)",
            mean("feedback-secagg"),
            0.70,
        ),
        line("Noise-free ceiling (Feedback, central, epsilon 1000)", mean("feedback-central", 1000.0), 0.85),
        line(
            "Feedback - Gen at epsilon 1 (same generator, same volume)",
            None if gen is None or local is None else local - gen,
            0.15,
        ),
        line("Mix at epsilon 1", mean("mix"), 0.85),
        # The target asks for local trust; central DP-SGD trusts the server with the sites' gradient sums.
        line(
            "Mix at epsilon 1 with central DP-SGD (a trusted server, not the target's local trust)",
            mean("mix-central"),
            0.85,
        ),
        # Secure aggregation: no trusted server; each site trusts t' sites of the sum to add their noise share.
        line(
            "Mix at epsilon 1 with secure DP-SGD (SecAgg+: no server sees a site's votes or gradients)",
            mean("mix-secagg"),
            0.85,
        ),
        line(
            "Mix at epsilon 1 with secure DP-SGD, every site in each sum (privacy.secagg_threshold=1)",
            mean("mix-secagg-all"),
            0.85,
        ),
        line(
            "Mix beats real at epsilon 1 (mix - real)",
            None if mean("mix") is None or mean("real") is None else mean("mix") - mean("real"),
            0.0,
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(cells: dict[tuple[str, float], dict], target: Path) -> Path:
    """Accuracy vs epsilon, one line per row with sd error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ROWS:
        points = sorted((eps, c) for (row, eps), c in cells.items() if row == name and c["mean"] is not None)
        if points:
            ax.errorbar(
                [p[0] for p in points],
                [p[1]["mean"] for p in points],
                yerr=[p[1]["sd"] for p in points],
                marker="o",
                capsize=3,
                label=name,
            )
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (per site, delta 1e-5)")
    ax.set_ylabel("accuracy on the central real test split")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def report(cells: dict[tuple[str, float], dict], command: str, plot_name: str) -> str:
    """The generated Markdown block: command, table, targets, plot."""
    return (
        f"Commands (results.jsonl keeps every run; a rerun skips finished runs):\n\n```bash\n{command}\n```\n\n"
        f"{table(cells)}\n{targets(cells)}\n![accuracy vs epsilon]({plot_name})\n"
    )


def write_doc(
    doc: Path, block: str, start: str = START, end: str = END, heading: str = "## Benchmark harness (issue 10)"
) -> None:
    """Replace the block between ``start`` and ``end`` in ``doc`` (appended under ``heading`` when absent)."""
    text = doc.read_text() if doc.is_file() else ""
    generated = f"{start}\n{block}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + generated + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{generated}\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the run directories and results.jsonl")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="generator, downstream and DP-SGD seeds"
    )
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--doc", type=Path, help="Markdown file whose benchmark block is replaced (e.g. docs/benchmarks.md)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: tabulate every run in <out>/results.jsonl (e.g. after invocations of different rows)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every coautogen run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.report_only:
        records = list(load_results(out / "results.jsonl").values())
        args.rows = [r for r in ROWS if any(rec["row"] == r for rec in records)]
        args.epsilons = sorted({rec["epsilon"] for rec in records})
        args.seeds = sorted({rec["seed"] for rec in records})
    else:
        records = run_all(out, args.rows, args.epsilons, args.seeds, args.overrides)
    cells = aggregate(records)
    chart = plot(cells, out / "accuracy_vs_epsilon.png")
    commands = out / "commands.txt"  # every invocation that ran something, for the report-only table
    if args.report_only:
        command = commands.read_text().strip() if commands.is_file() else "(commands not recorded)"
    else:
        command = (
            "python -m simulations.benchmark --out <dir> --seeds "
            + " ".join(map(str, args.seeds))
            + " --epsilons "
            + " ".join(f"{e:g}" for e in args.epsilons)
            + " --rows "
            + " ".join(args.rows)
            + "".join(f" {o}" for o in args.overrides)
        )
        with commands.open("a") as handle:
            handle.write(command + "\n")
    plot_name = "benchmark_accuracy_vs_epsilon.png"
    block = report(cells, command, plot_name)
    (out / "benchmark.md").write_text(block)
    if args.doc:
        shutil.copyfile(chart, args.doc.parent / plot_name)
        write_doc(args.doc, block)
    sys.stdout.write("\n" + block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
