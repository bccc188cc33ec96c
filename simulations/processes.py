"""Find, record and stop process trees by PID, never signalling a process that merely reuses a PID.

One module for the launcher (``simulations/launcher.py``), ``coautogen cleanup`` and the tests'
process watch (``tests/flower_processes.py``).

A process is identified by its PID *and* its creation time (:class:`ProcessRecord`). Before any
signal, the PID is looked up again and its creation time compared with the recorded one: a
record whose process is gone, or whose PID now belongs to a process created at another time, is
never signalled. psutil computes the creation time from the kernel's start tick plus the boot
time, which the kernel may report one second off after a clock adjustment; records therefore
match within :data:`CREATE_TIME_TOLERANCE_S` (a PID is not recycled within a second).

Flower's processes span several sessions: the SuperLink (started in its own session),
SuperExec (which starts a session of its own), the simulation runtime and Ray's processes. So
:func:`stop` collects the whole tree (descendants found with psutil, re-scanned until stable)
plus every process whose command line names a marker (a run's ``FLWR_HOME``) or whose
environment holds given values (``FLWR_HOME=...``), sends SIGTERM to each and to the process
group of each verified group leader, re-scans for late children, and sends SIGKILL to whatever
is still the same process after the grace period.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import psutil

#: Creation times of the same process, read at different moments, agree within this.
CREATE_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class ProcessRecord:
    """One process as seen once: its PID, its creation time (seconds since the epoch) and its
    command line (for reports; not part of the identity)."""

    pid: int
    create_time: float
    command: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[int, float]:
        return (self.pid, self.create_time)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "command": self.command}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ProcessRecord":
        return cls(int(data["pid"]), float(data["create_time"]), str(data.get("command", "")))

    def describe(self) -> str:
        return f"{self.pid} ({self.command[:120] or '?'})"


def same_time(a: float, b: float) -> bool:
    return abs(a - b) <= CREATE_TIME_TOLERANCE_S


def _command(proc: psutil.Process) -> str:
    try:
        parts = proc.cmdline()
    except (psutil.Error, OSError):
        return ""
    if parts:
        return " ".join(parts)
    try:
        return proc.name()
    except (psutil.Error, OSError):
        return ""


def _running(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def record(pid: int, command: Sequence[str] | None = None) -> ProcessRecord | None:
    """The record of the live process ``pid`` now, None if there is none (or it is a zombie).

    ``command``: the command line we started ``pid`` with. Read back just after the start, a
    process may not show it yet (before its exec, or an empty ``cmdline`` during it), so a
    caller that knows it passes it in."""
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except (psutil.Error, OSError, ValueError):
        return None
    if not _running(proc):
        return None
    return ProcessRecord(pid, created, " ".join(command) if command else _command(proc))


def _record_of(proc: psutil.Process) -> ProcessRecord | None:
    try:
        created = proc.create_time()
    except (psutil.Error, OSError):
        return None
    return ProcessRecord(proc.pid, created, _command(proc)) if _running(proc) else None


def current(rec: ProcessRecord) -> psutil.Process | None:
    """The live process ``rec`` describes, or None if it is gone or its PID was reused."""
    try:
        proc = psutil.Process(rec.pid)
        created = proc.create_time()
    except (psutil.Error, OSError, ValueError):
        return None
    if not same_time(created, rec.create_time) or not _running(proc):
        return None
    return proc


def is_alive(rec: ProcessRecord) -> bool:
    return current(rec) is not None


def descendants(root: ProcessRecord | int) -> list[ProcessRecord]:
    """Every live process below ``root`` (empty if ``root`` is gone or its PID was reused)."""
    rec = root if isinstance(root, ProcessRecord) else record(root)
    proc = current(rec) if rec is not None else None
    if proc is None:
        return []
    try:
        children = proc.children(recursive=True)
    except (psutil.Error, OSError):
        return []
    return [r for child in children if (r := _record_of(child)) is not None]


def names(command: str, marker: str) -> bool:
    """Whether ``command`` contains ``marker`` as a whole word or path (``/a/run`` names
    ``/a/run/x`` and ``/a/run``, not ``/a/run2``)."""
    return re.search(re.escape(marker) + r"(?![\w.\-])", command) is not None


def find_processes(
    markers: Iterable[str] = (), env: Mapping[str, str] | None = None, exclude: Iterable[int] = ()
) -> list[ProcessRecord]:
    """Live processes whose command line names one of ``markers`` or whose environment holds
    every item of ``env`` (processes of other users, whose environment cannot be read, match
    only by command line). This process and ``exclude`` are left out."""
    markers = [m for m in markers if m]
    env = dict(env or {})
    if not markers and not env:
        return []
    skip = {os.getpid(), *exclude}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        command = _command(proc)
        hit = any(names(command, m) for m in markers)
        if not hit and env:
            try:
                environ = proc.environ()
            except (psutil.Error, OSError):
                environ = {}
            hit = all(environ.get(k) == v for k, v in env.items())
        if hit and (rec := _record_of(proc)) is not None:
            found.append(rec)
    return found


def collect(
    roots: Iterable[ProcessRecord],
    markers: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    exclude: Iterable[int] = (),
    settle_s: float = 0.2,
    max_rounds: int = 10,
) -> list[ProcessRecord]:
    """The live ``roots`` (each verified), their descendants and the processes naming a marker,
    re-scanned until a scan finds nothing new (a process may fork while we look)."""
    markers, exclude = list(markers), {os.getpid(), *exclude}
    found: dict[int, ProcessRecord] = {}

    def add(rec: ProcessRecord) -> bool:
        if rec.pid in exclude:
            return False
        old = found.get(rec.pid)
        if old is not None and same_time(old.create_time, rec.create_time):
            return False
        found[rec.pid] = rec
        return True

    for rec in roots:
        if is_alive(rec):
            add(rec)
    for _ in range(max(1, max_rounds)):
        new = False
        for rec in find_processes(markers, env, exclude):
            new |= add(rec)
        for rec in list(found.values()):
            for child in descendants(rec):
                new |= add(child)
        if not new:
            break
        time.sleep(settle_s)
    return [rec for rec in found.values() if is_alive(rec)]


def _send(rec: ProcessRecord, sig: int) -> bool:
    """Signal ``rec`` if it is still the same process, and its process group if ``rec`` leads
    it (a session or group we or Flower started), unless it is our own group. Only a leader
    verified just now: a group's ID is not recycled while its leader runs."""
    proc = current(rec)
    if proc is None:
        return False
    try:
        group = os.getpgid(rec.pid)
        if group == rec.pid and group != os.getpgrp():
            os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.send_signal(sig)
    except (psutil.Error, OSError):
        return False
    return True


def stop(
    roots: Iterable[ProcessRecord],
    markers: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    grace_s: float = 15.0,
    kill_wait_s: float = 5.0,
    exclude: Iterable[int] = (),
    reap: Callable[[], object] | None = None,
) -> list[ProcessRecord]:
    """Stop ``roots``, everything below them and every process naming a marker; return what was
    signalled.

    SIGTERM first (to each process and to the group of each group leader among them), then
    SIGKILL to whatever is still the same process after ``grace_s`` seconds. The tree is
    collected before any signal (children are re-parented once their parent dies) and
    re-scanned while waiting, so children started during the shutdown are stopped too.
    ``reap`` is called while waiting (e.g. ``popen.poll`` to reap a child of ours).
    """
    markers, exclude = list(markers), set(exclude)
    targets: dict[tuple[int, float], ProcessRecord] = {}

    def gather(from_roots: Iterable[ProcessRecord], settle_s: float) -> list[ProcessRecord]:
        new = []
        for rec in collect(from_roots, markers, env, exclude, settle_s=settle_s, max_rounds=10 if settle_s else 2):
            if not any(r.pid == rec.pid and same_time(r.create_time, rec.create_time) for r in targets.values()):
                targets[rec.key] = rec
                new.append(rec)
        return new

    def signal_all(recs: Iterable[ProcessRecord], sig: int) -> None:
        for rec in recs:
            _send(rec, sig)

    def alive() -> list[ProcessRecord]:
        return [rec for rec in targets.values() if is_alive(rec)]

    signal_all(gather(roots, settle_s=0.2), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while True:
        if reap is not None:
            reap()
        signal_all(gather(alive(), settle_s=0.0), signal.SIGTERM)
        if not alive() or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for _ in range(3):  # SIGKILL survivors and anything that appeared meanwhile
        survivors = alive() + gather(alive(), settle_s=0.0)
        if not survivors:
            break
        signal_all(survivors, signal.SIGKILL)
        end = time.monotonic() + kill_wait_s
        while time.monotonic() < end and alive():
            if reap is not None:
                reap()
            time.sleep(0.05)
    if reap is not None:
        reap()
    return list(targets.values())


def still_running(recs: Iterable[ProcessRecord]) -> list[ProcessRecord]:
    return [rec for rec in recs if is_alive(rec)]


# ---------------------------------------------------------------------------------- signals
class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised in the main thread (a BaseException, so that no
    ``except Exception`` swallows it on the way to the command)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.leftovers: list[ProcessRecord] = []  # what the stop could not end (set by the launcher)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_state = {"handler": None}


class SignalHandler:
    """Turns SIGTERM and SIGINT into :class:`Interrupted`, once.

    Inside :func:`shielded` (starting a process and recording it, stopping processes) the
    exception waits until the shielded block ends, so that no child is left unrecorded and no
    stop is cut short. A second signal while stopping is ignored: the stop is bounded.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self.raised = False
        self.depth = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self.depth == 0:
            self.raised = True
            raise Interrupted(signum)

    def install(self) -> "SignalHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            _state["handler"] = self
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
        if _state["handler"] is self:
            _state["handler"] = None

    def __enter__(self) -> "SignalHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


@contextmanager
def shielded() -> Iterator[None]:
    """A block that SIGTERM/SIGINT do not interrupt; a signal that arrived meanwhile is raised
    as :class:`Interrupted` when it ends. A no-op where no :class:`SignalHandler` is installed."""
    handler: SignalHandler | None = _state["handler"]
    if handler is None:
        yield
        return
    handler.depth += 1
    try:
        yield
    finally:
        handler.depth -= 1
    if handler.depth == 0 and handler.received is not None and not handler.raised:
        handler.raised = True
        raise Interrupted(handler.received)
