"""The `coautogen` subcommands beside `run`: cleanup, report, export and review (the parser and
`run` itself live in simulations/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO

from coautogen_fl.report import write_report

from .leftovers import Cleanup, cleanup, flwr_homes


def _report_cleanup(result: Cleanup, out: IO[str]) -> None:
    where = f"coautogen cleanup: {result.run_dir}"
    if result.launcher_running:
        out.write(f"{where}: its run is still going on (launcher PID {result.launcher.pid}); not touched\n")
        return
    if not result.stopped:
        out.write(f"{where}: nothing left running\n")
        return
    by = f" left by launcher PID {result.launcher.pid}" if result.launcher else ""
    out.write(f"{where}: stopped {len(result.stopped)} process(es){by}\n")
    for rec in result.stopped:
        out.write(f"  stopped {rec.describe()}\n")
    for rec in result.leftovers:
        out.write(f"  still running {rec.describe()}\n")


def command_cleanup(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Stop the processes runs whose launcher was killed left running; 1 if any survived."""
    out = out or sys.stdout
    if not args.run_dirs and not args.all_under:
        print("coautogen cleanup: name a RUN_DIR or --all-under OUT_DIR", file=sys.stderr)
        return 2
    homes: list[Path] = []
    for run_dir in args.run_dirs:
        if not Path(run_dir).expanduser().exists():
            print(f"coautogen cleanup: {run_dir} does not exist", file=sys.stderr)
            return 2
        homes += flwr_homes(Path(run_dir))
    if args.all_under:
        found = flwr_homes(Path(args.all_under), all_under=True)
        if not found:
            out.write(f"coautogen cleanup: no run directories under {Path(args.all_under).resolve()}\n")
        homes += found
    failed = False
    for home in dict.fromkeys(homes):
        result = cleanup(home)
        _report_cleanup(result, out)
        failed |= bool(result.leftovers)
    return 1 if failed else 0


def command_report(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Rebuild report.html of each run directory from its files; 2 if one is not a directory."""
    out = out or sys.stdout
    for run_dir in args.run_dirs:
        path = Path(run_dir).expanduser().resolve()
        if not path.is_dir():
            print(f"coautogen report: {run_dir} is not a directory", file=sys.stderr)
            return 2
        if not any((path / name).exists() for name in ("summary.json", "config.yaml", "metrics.jsonl")):
            print(
                f"coautogen report: {run_dir} holds no summary.json, config.yaml or metrics.jsonl: not a run directory",
                file=sys.stderr,
            )
            return 2
        out.write(f"coautogen report: {write_report(path)}\n")
    return 0


def command_export(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Export a run's final dataset; 2 when the run directory holds none."""
    from coautogen_fl.export import ExportError, export_run

    out = out or sys.stdout
    try:
        folder, count = export_run(args.run_dir, args.format, args.out)
    except ExportError as exc:
        print(f"coautogen export: {exc}", file=sys.stderr)
        return 2
    out.write(f"coautogen export: {count} images ({args.format}) in {folder}\n")
    return 0


def command_review(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Serve the review page of a run until Ctrl-C; decisions land in RUN_DIR/review.json."""
    from coautogen_fl.export import ExportError

    from .review import serve

    out = out or sys.stdout
    try:
        server = serve(args.run_dir, args.port, args.host)
    except (ExportError, OSError) as exc:
        print(f"coautogen review: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    out.write(
        f"coautogen review: open http://{host}:{port}/ (Ctrl-C stops; decisions are saved as you go in "
        f"{Path(args.run_dir).resolve() / 'review.json'})\n"
    )
    out.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
