"""The `coautogen` command.

    coautogen run [--config FILE] [--num-hospitals N] [--out DIR] [seed flags] [key=value ...]
    coautogen privacy (--epsilon E | --noise S) [--delta D] [--rounds T] [--mode M --sites K] [--json]
    coautogen cleanup [RUN_DIR ...] [--all-under OUT_DIR]
    coautogen report RUN_DIR [RUN_DIR ...]

runs one simulation through Flower's simulation engine and ends by printing the run
directory and its summary. The seed project's short flags map onto config keys.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Sequence

from coautogen_fl.checkpoint import CHECKPOINT_FILE, CheckpointError, check_resumable
from coautogen_fl.config import ConfigError, RunConfig, load_config, save_config
from coautogen_fl.report import REPORT_FILE, write_report
from coautogen_fl.rundir import resolve_run_dir
from coautogen_fl.tracking import site_lines

from . import processes
from .commands import command_cleanup, command_export, command_report, command_review
from .launcher import SimulationError, run_simulation
from .leftovers import cleanup, flwr_homes
from .preflight import PreflightError, preflight
from .privacy_cli import add_privacy_parser, command_privacy
from .seed_flags import CLI_KEYS, SEED_FLAGS, dest

#: Log lines worth showing live (the full stream goes to <run_dir>/flower.log).
PROGRESS_MARKERS = (
    "round ",
    "site ",
    "accuracy",
    "federated evaluation",
    "downstream",
    "summary written",
    "run directory",
    "ERROR",
    "Error",
    "Traceback",
    "refused reply",
    "dropped reply",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coautogen", description="Federated, differentially private synthetic data.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", allow_abbrev=False, help="run a simulation of N hospitals through Flower")
    run.add_argument("--config", help="a YAML config (see configs/); defaults are the embedded digits run")
    run.add_argument("--num-hospitals", type=int, help="simulated sites (federation.num_hospitals)")
    run.add_argument("--out", help="parent folder of run directories (tracking.out_dir)")
    run.add_argument("--name", help="run directory name (tracking.run_name)")
    run.add_argument("--verbose", action="store_true", help="print Flower's full log stream")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint.json (its own config)"
    )
    for flag in SEED_FLAGS:  # the seed project's flags (docs/cli.md)
        run.add_argument(
            flag.short,
            flag.long,
            dest=dest(flag),
            metavar=flag.long.lstrip("-").upper(),
            help=f"sets {flag.key}: {flag.meaning}" if flag.key else f"ignored: {flag.note}",
        )
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. privacy.epsilon=2")
    add_privacy_parser(commands)
    clean = commands.add_parser("cleanup", help="stop the Flower processes a killed `coautogen run` left running")
    clean.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories (or their flower/ folder)")
    clean.add_argument("--all-under", metavar="OUT_DIR", help="every run directory directly below OUT_DIR")
    export = commands.add_parser("export", help="export a run's final synthetic dataset (review decisions honoured)")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument(
        "--format",
        default="imagefolder",
        choices=["imagefolder", "hf"],
        help="imagefolder: <class>/<id>.png; hf: a Hugging Face datasets folder (save_to_disk)",
    )
    export.add_argument("--out", help="target folder (default RUN_DIR/export-FORMAT; replaced whole)")
    review = commands.add_parser("review", help="accept, reject or relabel a run's final images in a local page")
    review.add_argument("run_dir", metavar="RUN_DIR")
    review.add_argument("--port", type=int, default=8765, help="local port (0: any free one)")
    review.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    report = commands.add_parser("report", help="(re)build a run directory's report.html from its files")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    return parser


def seed_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` for every seed flag given that sets a config key (values converted: booleans,
    lower-case model names; ``-cdata NAME`` found under ``-ddir``, default ./dataset)."""
    overrides = []
    for flag in SEED_FLAGS:
        value = getattr(args, dest(flag), None)
        if value is None or flag.key is None or flag.key in CLI_KEYS:
            continue
        try:
            value = flag.convert(value) if flag.convert else value
        except ValueError as exc:
            raise ConfigError(f"{flag.short} {exc}") from None
        if flag.key == "data.name":
            value = dataset_folder(value, getattr(args, "dataset_dir", None))
        overrides.append(f"{flag.key}={value}")
    return overrides


def dataset_folder(name: str, dataset_dir: str | None) -> str:
    """``-cdata NAME`` as the seed read it: a folder NAME under ``-ddir`` (default ./dataset) when
    NAME itself is neither a bundled dataset nor an existing path."""
    if name in ("digits", "digits-shifted") or Path(name).expanduser().exists():
        return name
    candidate = Path(dataset_dir or "dataset").expanduser() / name
    return str(candidate.resolve()) if candidate.is_dir() else name


def seed_notes(args: argparse.Namespace) -> list[str]:
    """One line per seed flag given that means nothing here, saying why."""
    return [
        f"coautogen: note: {f.short} is ignored: {f.note}"
        for f in SEED_FLAGS
        if f.key is None and getattr(args, dest(f), None) is not None
    ]


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Seed flags and named options first, then key=value pairs (which win)."""
    overrides = seed_overrides(args)
    if args.num_hospitals is not None:
        overrides.append(f"federation.num_hospitals={args.num_hospitals}")
    if args.out is not None:
        overrides.append(f"tracking.out_dir={Path(args.out).resolve()}")
    if args.name is not None:
        overrides.append(f"tracking.run_name={args.name}")
    return overrides + list(args.overrides)


class ProgressFilter:
    """Writes every line to the log file and the progress lines (or all) to the terminal."""

    def __init__(self, log: IO[str], terminal: IO[str], verbose: bool) -> None:
        self.log, self.terminal, self.verbose = log, terminal, verbose

    def write(self, line: str) -> None:
        self.log.write(line)
        if self.verbose or any(marker in line for marker in PROGRESS_MARKERS):
            self.terminal.write(line)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


def prepare_run(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Fix the run directory and write the resolved config the ServerApp and sites will read."""
    run_dir = resolve_run_dir(cfg, base=Path.cwd())  # relative paths: where the command was launched
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not empty; choose another --name or --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.tracking.run_dir = str(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    return cfg, run_dir


def print_summary(summary: dict, out: IO[str]) -> None:
    keys = (
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
    for key in keys:
        value = summary.get(key)
        out.write(f"  {key:20s} {value:.4g}\n" if isinstance(value, float) else f"  {key:20s} {value}\n")
    for line in site_lines(summary):
        out.write(f"  {line}\n")


def command_run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run once. SIGTERM and SIGINT stop what the run started and return 128 + the signal's
    number, with one line on stderr; a run killed outright (SIGKILL) leaves its processes to
    the next run in the same out dir, or to `coautogen cleanup`."""
    out = out or sys.stdout  # resolved per call, so callers can redirect stdout
    for line in seed_notes(args):
        out.write(line + "\n")
    if int(getattr(args, "repeat", None) or 1) > 1:
        return repeat_runs(args, out)
    handler = processes.SignalHandler().install()
    started: list[Path] = []  # the run directory, once there is one
    try:
        return _run(args, out, started)
    except BaseException as exc:
        if handler.received is None:
            raise
        signum = handler.received
        name = signal.Signals(signum).name
        where = f"the run directory keeps what finished: {started[0]}" if started else "no run directory was made"
        left = getattr(exc, "leftovers", [])
        stopped = (
            f"{len(left)} process(es) it started could not be stopped (PIDs {' '.join(str(r.pid) for r in left)}); "
            f"try `coautogen cleanup {started[0] if started else ''}`".rstrip()
            if left
            else "the Flower processes it started are stopped"
        )
        out.flush()
        print(f"coautogen run: stopped by {name}; {stopped}; {where}", file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        handler.uninstall()


def repeat_runs(args: argparse.Namespace, out: IO[str]) -> int:
    """``-T N``: the run N times with generator and downstream seeds +0..N-1, each in its own run
    directory ``<name>-t<i>``; then the mean and sd of accuracy_real_test, also written to
    ``<out_dir>/<name>-repeats.json``. Stops at the first run that fails (its exit code)."""
    import copy
    import statistics
    import time

    if getattr(args, "resume", None):
        raise ConfigError("-T repeats a new run; --resume continues one run: give one or the other")
    times = int(args.repeat)
    cfg = load_config(args.config, overrides_from_args(args))
    base = args.name or cfg.tracking.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    accuracies, run_dirs = [], []
    for i in range(times):
        one = copy.copy(args)
        one.repeat, one.name = None, f"{base}-t{i}"
        one.overrides = [
            *args.overrides,
            f"generator.seed={cfg.generator.seed + i}",
            f"downstream.seed={cfg.downstream.seed + i}",
        ]
        out.write(f"coautogen: run {i + 1} of {times} ({one.name})\n")
        code = command_run(one, out)
        run_dir = Path(cfg.tracking.out_dir).expanduser().resolve() / one.name
        if code != 0:
            return code
        summary = json.loads((run_dir / "summary.json").read_text())
        accuracies.append(summary["accuracy_real_test"])
        run_dirs.append(str(run_dir))
    mean = statistics.fmean(accuracies)
    sd = statistics.stdev(accuracies)
    report = {"times": times, "accuracy_real_test": accuracies, "mean": mean, "sd": sd, "run_dirs": run_dirs}
    target = Path(cfg.tracking.out_dir).expanduser().resolve() / f"{base}-repeats.json"
    target.write_text(json.dumps(report, indent=1) + "\n")
    out.write(
        f"\naccuracy_real_test over {times} runs: mean {mean:.4f}, sd {sd:.4f} "
        f"({', '.join(f'{a:.4f}' for a in accuracies)}); {target}\n"
    )
    return 0


def _sweep_leftovers(out_dir: Path, out: IO[str]) -> None:
    """Stop what runs in ``out_dir`` whose launcher was killed (SIGKILL) left running."""
    for home in flwr_homes(out_dir, all_under=True):
        result = cleanup(home, only_running=True)
        if result.stopped:
            out.write(
                f"coautogen: stopped {len(result.stopped)} process(es) left running by the killed run "
                f"in {result.run_dir}\n"
            )


def resume_target(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run directory ``--resume`` names and its own config; nothing else may be set."""
    if args.overrides or args.config or any(getattr(args, dest(f), None) is not None for f in SEED_FLAGS):
        raise ConfigError("--resume continues a run with its own config.yaml: give no --config, flags or key=value")
    run_dir = Path(args.resume).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; name the run directory of a `coautogen run`")
    try:
        check_resumable(run_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ConfigError(
            f"--resume {run_dir}: no {CHECKPOINT_FILE} (the run finished no voting round and started no DP-SGD "
            "round); start a new run instead"
        )
    return load_config(run_dir / "config.yaml"), run_dir


def gpu_share(cfg: RunConfig, cpus: int | None = None) -> float:
    """The GPU fraction each simulated site's actor asks Ray for (``federation.client_num_gpus``).

    0 with ``-dev cuda`` (or ``auto`` finding a GPU) would hide the GPU from every actor, so it is
    derived: one GPU shared by all the actors the CPUs allow (``cpus // client_num_cpus``). The
    number of actors, not of sites, sets the GPU memory: each actor process holds one embedder
    copy, whatever the number of sites it serves (clients/site.py ``shared_embedder``)."""
    from coautogen_fl.device import resolve_device  # torch: only for a run

    share = cfg.federation.client_num_gpus
    if share > 0 or cfg.device == "cpu" or resolve_device(cfg.device, cfg.device_id) == "cpu":
        return share
    actors = max(1, (cpus or os.cpu_count() or 1) // cfg.federation.client_num_cpus)
    return 1.0 / actors


def _run(args: argparse.Namespace, out: IO[str], started: list[Path]) -> int:
    resuming = bool(getattr(args, "resume", None))
    if resuming:
        cfg, run_dir = resume_target(args)
    else:
        cfg = load_config(args.config, overrides_from_args(args))
        preflight(cfg)
        cfg, run_dir = prepare_run(cfg)
    started.append(run_dir)
    _sweep_leftovers(run_dir.parent, out)
    task = "" if cfg.feedback.task_type == "syn" else f" -tt {cfg.feedback.task_type}"  # real/mix: DP-SGD rounds too
    out.write(
        f"coautogen: {'resuming ' if resuming else ''}{cfg.feedback.framework}{task} "
        f"with {cfg.federation.num_hospitals} simulated hospitals, "
        f"epsilon {cfg.privacy.epsilon:g} ({cfg.privacy.mode} mode); run directory {run_dir}\n"
    )
    run_config: dict[str, object] = {"config-file": str(run_dir / "config.yaml")}
    if resuming:
        run_config["tracking.resume"] = True
    with open(run_dir / "flower.log", "a" if resuming else "w") as log:
        status = run_simulation(
            run_config,
            cfg.federation.num_hospitals,
            run_dir / "flower",
            cfg.federation.client_num_cpus,
            gpu_share(cfg),
            output=ProgressFilter(log, out, args.verbose),  # type: ignore[arg-type]
        )
    if not (run_dir / REPORT_FILE).is_file():  # the ServerApp died before it could write one
        write_report(run_dir)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if summary.get("status") == "failed":  # stopped on purpose: say why, and who did not count
        out.write(f"\nrun directory: {run_dir}\n")
        print_summary(summary, out)
        out.write(f"coautogen: the run stopped: {summary.get('reason')}\n")
        return 1
    if not status.completed or not summary:
        out.write(f"coautogen: Flower run {status.run_id} ended as {status.status}; see {run_dir / 'flower.log'}\n")
        return 1
    out.write(f"\nrun directory: {run_dir}\n")
    print_summary(json.loads(summary_file.read_text()), out)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand anywhere after ``run``, also
    between options (argparse alone takes positionals only in one block)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if args.command != "run":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        if args.command == "privacy":
            return command_privacy(args)
        if args.command == "cleanup":
            return command_cleanup(args)
        if args.command == "report":
            return command_report(args)
        if args.command == "export":
            return command_export(args)
        if args.command == "review":
            return command_review(args)
    except (ConfigError, PreflightError, SimulationError) as exc:
        print(f"coautogen: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
