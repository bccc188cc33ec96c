"""The launcher's state file and what cleans up after a killed launcher.

While a run goes on, :class:`~simulations.launcher.FlowerSimulation` records every process it
started in ``$FLWR_HOME/launcher.json`` (:data:`STATE_FILE`, written by :func:`write_state`).
:func:`cleanup` reads that record back and stops what a launcher killed outright (SIGKILL) left
running, unless that launcher still runs; :func:`flwr_homes` maps the run directories given to
``coautogen cleanup`` (or every one below an out dir) onto their Flower homes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from . import processes

STATE_FILE = "launcher.json"  # in FLWR_HOME: what the launcher started, for `coautogen cleanup`


def write_state(path: Path, payload: Mapping) -> None:
    """Write the launcher's state file atomically (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def flwr_homes(path: Path, all_under: bool = False) -> list[Path]:
    """The Flower homes a path stands for: a run directory (``<run_dir>/flower``), a Flower
    home itself, or with ``all_under`` every run directory directly below ``path``."""
    path = Path(path).expanduser().resolve()
    if all_under:
        return sorted(p.parent for p in path.glob(f"*/flower/{STATE_FILE}"))
    if (path / STATE_FILE).is_file() or path.name == "flower":
        return [path]
    return [path / "flower"]


@dataclass
class Cleanup:
    """What :func:`cleanup` found for one Flower home."""

    flwr_home: Path
    launcher: processes.ProcessRecord | None = None
    launcher_running: bool = False  # the launcher is alive: its run goes on, nothing touched
    stopped: list[processes.ProcessRecord] = field(default_factory=list)
    leftovers: list[processes.ProcessRecord] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.flwr_home.parent if self.flwr_home.name == "flower" else self.flwr_home


def _verified(recorded: Iterable[processes.ProcessRecord], flwr_home: Path) -> list[processes.ProcessRecord]:
    """The recorded processes that are still the same process (creation time) and provably the
    run's: their command line or environment names its FLWR_HOME, or they descend from one that
    does. A process that merely reuses a recorded PID fails the first test."""
    home = str(flwr_home)
    live: dict[int, tuple[processes.ProcessRecord, object]] = {}
    for rec in recorded:
        proc = processes.current(rec)
        if proc is not None:
            live[rec.pid] = (rec, proc)
    ours: dict[int, processes.ProcessRecord] = {}
    for pid, (rec, proc) in live.items():
        try:
            command = " ".join(proc.cmdline())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            command = ""
        try:
            environ = proc.environ()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            environ = {}
        if processes.names(command, home) or environ.get("FLWR_HOME") == home:
            ours[pid] = rec

    def below_ours(proc: object) -> bool:
        try:
            return any(
                a.pid in ours and processes.same_time(a.create_time(), ours[a.pid].create_time) for a in proc.parents()
            )  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - gone meanwhile
            return False

    changed = True
    while changed:
        changed = False
        for pid, (rec, proc) in live.items():
            if pid not in ours and below_ours(proc):
                ours[pid] = rec
                changed = True
    return list(ours.values())


def cleanup(flwr_home: Path, grace_s: float = 15.0, only_running: bool = False) -> Cleanup:
    """Stop what the launcher of ``flwr_home`` left running, unless that launcher still runs.

    The recorded processes that are still the same process and provably this run's, their
    descendants, and every process whose command line or environment names this run's
    ``FLWR_HOME`` are stopped (SIGTERM, SIGKILL after ``grace_s``). With ``only_running``, a
    state file saying the launcher stopped cleanly is trusted without a scan.
    """
    flwr_home = Path(flwr_home).resolve()
    state_file = flwr_home / STATE_FILE
    state = read_state(state_file)
    result = Cleanup(flwr_home)
    if only_running and state.get("state") != "running":
        return result
    if state.get("launcher"):
        result.launcher = processes.ProcessRecord.from_dict(state["launcher"])
        if result.launcher.pid != os.getpid() and processes.is_alive(result.launcher):
            result.launcher_running = True
            return result
    recorded = [processes.ProcessRecord.from_dict(d) for d in state.get("processes", []) + state.get("leftovers", [])]
    if state.get("superlink"):
        recorded.append(processes.ProcessRecord.from_dict(state["superlink"]))
    roots = _verified(recorded, flwr_home)
    result.stopped = processes.stop(roots, [str(flwr_home)], {"FLWR_HOME": str(flwr_home)}, grace_s=grace_s)
    result.leftovers = processes.still_running(result.stopped)
    if state:
        write_state(
            state_file,
            {
                **state,
                "state": "running" if result.leftovers else "stopped",
                "leftovers": [r.to_dict() for r in result.leftovers],
                "cleaned": time.time(),
            },
        )
    return result
