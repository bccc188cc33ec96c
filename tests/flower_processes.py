"""Start Flower's deployment processes on loopback and stop exactly them, by PID.

Used by tests/test_deployment.py. A deployment is one ``flower-superlink`` (no
``--simulation``: in flwr 1.41 the Fleet API shares the SuperLink's HTTP ``--port`` with the
Control and ServerAppIo APIs) and any number of ``flower-supernode`` processes, each with its
own Runtime API ``--port`` (default 9094, so two on one host collide without it).

Process tree (all with ``--isolation subprocess``, the default):
    flower-superlink -> flower-superexec (own session) -> flwr-serverapp
    flower-supernode -> flower-superexec               -> flwr-clientapp

:class:`ProcessWatch` records, while a test runs, every descendant of the processes the test
started and every process whose command line names one of the test's markers (its tmp folder,
its ports), so that the test can stop them and check that none is left. The process handling
itself (tree walk, PID-reuse guard, stopping) is ``simulations/processes.py``.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import httpx
import psutil

from simulations import processes

FLOWER_ENV = {
    # Offline machines: never let the SuperLink pip-install the app's dependencies.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
BIN = Path(sys.executable).parent  # /work/venv/bin: flower-superexec is looked up on PATH


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(flwr_home: Path, name: str, address: str) -> Path:
    """``$FLWR_HOME/config.toml`` with one insecure SuperLink connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n')
    return path


# ---------------------------------------------------------------------------------- processes
# One implementation for the launcher, `coautogen cleanup` and these tests: simulations/processes.py.
# A process is keyed by (pid, creation time), so a recycled PID is never taken for it.
Key = tuple  # (pid, create_time)


def cmdline(pid: int) -> str:
    rec = processes.record(pid)
    return rec.command if rec is not None else ""


def alive(key: Key) -> bool:
    """Whether the process ``key`` (pid, creation time) still runs (not a recycled PID)."""
    return processes.is_alive(processes.ProcessRecord(int(key[0]), float(key[1])))


def descendants(root: int) -> list[Key]:
    """(pid, creation time) of every live process below ``root``."""
    return [rec.key for rec in processes.descendants(root)]


def processes_naming(markers: Iterable[str]) -> list[tuple[int, str]]:
    """Live processes (but this one) whose command line names any of ``markers``."""
    return [(rec.pid, rec.command) for rec in processes.find_processes(markers)]


class ProcessWatch:
    """Records the processes a test started, for the check and the cleanup afterwards.

    Parameters
    ----------
    markers : sequence of str
        Strings unique to the test (its tmp folder, ``127.0.0.1:PORT``): processes naming
        one are the test's, whoever their parent is.
    """

    def __init__(self, markers: Sequence[str]) -> None:
        self.markers = list(markers)
        self.roots: set[Key] = set()
        self.seen: dict[Key, str] = {}  # (pid, creation time) -> command line
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add_marker(self, marker: str) -> None:
        with self._lock:
            self.markers.append(marker)

    def add_root(self, pid: int) -> None:
        rec = processes.record(pid)
        if rec is not None:
            with self._lock:
                self.roots.add(rec.key)
            self.scan()

    def _is_ours(self, command: str) -> bool:
        return any(processes.names(command, m) for m in self.markers)

    def _tracked_key(self, tracked: dict[int, float], pid: int, created: float) -> Key | None:
        known = tracked.get(pid)
        return (pid, known) if known is not None and processes.same_time(known, created) else None

    def scan(self) -> None:
        with self._lock:
            table: dict[int, tuple[int, float, str]] = {}  # pid -> (ppid, creation time, command)
            for proc in psutil.process_iter():
                if proc.pid == os.getpid():
                    continue
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    table[proc.pid] = (proc.ppid(), proc.create_time(), " ".join(proc.cmdline()))
                except (psutil.Error, OSError):
                    continue
            tracked: dict[int, float] = {}
            for pid, created in [*self.roots, *self.seen]:
                entry = table.get(pid)
                if entry is not None and processes.same_time(entry[1], created):
                    tracked[pid] = created
            changed = True
            while changed:  # children of tracked processes are tracked, transitively
                changed = False
                for pid, (ppid, created, command) in table.items():
                    if pid in tracked:
                        continue
                    parent = table.get(ppid)
                    if (parent is not None and self._tracked_key(tracked, ppid, parent[1])) or self._is_ours(command):
                        tracked[pid] = created
                        self.seen[(pid, created)] = command
                        changed = True
            for key in self.roots:
                self.seen.setdefault(key, table.get(key[0], (0, 0.0, ""))[2])
            # A child first seen between fork and exec still shows its parent's command line:
            # refresh the command of every tracked process that is still running.
            for key in list(self.seen):
                entry = table.get(key[0])
                if entry is not None and processes.same_time(entry[1], key[1]) and entry[2]:
                    self.seen[key] = entry[2]

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.scan()

    def __enter__(self) -> "ProcessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def alive(self) -> dict[Key, str]:
        return {key: command for key, command in list(self.seen.items()) if alive(key)}

    def wait_all_gone(self, timeout: float) -> dict[Key, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return {}
            time.sleep(0.2)
        return self.alive()

    def kill_leftovers(self) -> None:
        """SIGKILL, by PID, every recorded process that is still the same process."""
        for key in list(self.alive()):
            proc = processes.current(processes.ProcessRecord(*key))
            if proc is not None:
                try:
                    proc.kill()
                except psutil.Error:
                    pass


def stop_tree(proc: subprocess.Popen, timeout: float = 15.0) -> list[Key]:
    """Stop ``proc``, every process below it and its process group, by PID; return the
    (pid, creation time) of what was signalled.

    The tree is collected first (children are re-parented once their parent dies) and
    re-scanned while waiting; each process gets SIGTERM, and SIGKILL if it is still the same
    process after ``timeout``. Flower's processes watch their ``--parent-pid`` and exit with it
    too, but we do not rely on it.
    """
    # Only while it is our unreaped child is proc.pid surely still this process (not recycled).
    root = processes.record(proc.pid) if proc.poll() is None else None
    stopped = processes.stop([root] if root else [], grace_s=timeout, reap=proc.poll)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return [rec.key for rec in stopped]


# ---------------------------------------------------------------------------------- launchers
class FlowerProcess:
    """One long-running Flower binary, its output in a log file, stopped by PID."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        watch: ProcessWatch | None = None,
    ) -> None:
        self.name, self.command, self.log = name, list(command), log
        self._log_handle = open(log, "w")
        self.stopped = False
        self.proc = subprocess.Popen(
            self.command,
            env=dict(env),
            cwd=cwd,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if watch is not None:
            watch.add_root(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_output(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{tail(out)}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not print {text!r} within {timeout:.0f} s:\n{tail(self.output())}")

    def stop(self, timeout: float = 15.0) -> list[tuple[int, int]]:
        """Stop it and its descendants (once; later calls return [])."""
        if self.stopped:
            return []
        self.stopped = True
        try:
            return stop_tree(self.proc, timeout)
        finally:
            self._log_handle.close()


def start_superlink(
    port: int,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    watch: ProcessWatch | None = None,
    timeout: float = 60.0,
    *,
    database: Path | None = None,
    tls: Sequence[str] = (),
    verify: ssl.SSLContext | None = None,
) -> FlowerProcess:
    """A deployment SuperLink: Fleet, Control and ServerAppIo APIs all on ``127.0.0.1:port``.

    ``database``: ``--database FILE`` (state kept across restarts). ``tls``: the TLS and
    authentication flags (``--ssl-*``, ``--enable-supernode-auth``) instead of ``--insecure``;
    the health endpoint is then asked over HTTPS, verified with ``verify``.
    """
    command = [
        str(BIN / "flower-superlink"),
        *(tls or ["--insecure"]),
        "--disable-runtime-dependency-installation",
        *(["--database", str(database)] if database else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    link = FlowerProcess("flower-superlink" + (" (TLS)" if tls else ""), command, env, cwd, log, watch)
    health = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {link.proc.returncode}:\n{tail(link.output())}")
        try:
            if httpx.get(health, timeout=1.0, **({"verify": verify} if tls else {})).is_success:
                return link
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    link.stop()
    raise TimeoutError(f"flower-superlink did not answer on port {port} within {timeout:.0f} s:\n{tail(link.output())}")


def start_supernode(
    superlink_port: int,
    port: int,
    node_config: str,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    watch: ProcessWatch | None = None,
) -> FlowerProcess:
    """A SuperNode of the SuperLink on ``127.0.0.1:superlink_port``; see :func:`node_id_of`."""
    command = [
        str(BIN / "flower-supernode"),
        "--insecure",
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    return FlowerProcess(f"flower-supernode ({node_config})", command, env, cwd, log, watch)


def node_id_of(node: FlowerProcess, timeout: float = 60.0) -> int:
    """The SuperNode's Flower node id, once it has registered with the SuperLink."""
    out = node.wait_for_output("SuperNode ID:", timeout)
    return int(out.split("SuperNode ID:", 1)[1].split()[0])


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------- deployment tests
def site_config(pid: int, num_sites: int, state_dir: Path, budget: float | None) -> str:
    """A deployed site's node config: its partition, its state dir and (unless None) its budget."""
    config = f'partition-id={pid} num-partitions={num_sites} state-dir="{state_dir}"'
    return config if budget is None else f"{config} site-epsilon={budget}"


def flwr(args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """The ``flwr`` CLI of this venv (output captured, never raising on a non-zero exit)."""
    return subprocess.run(
        [str(BIN / "flwr"), *args], env=dict(env), cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )


def run_id_of(output: str) -> int | None:
    """The run id `flwr run` printed, if any."""
    match = re.search(r"run (?:ID|id)[:\s]+(\d+)|Successfully started run (\d+)", output)
    return int(match.group(1) or match.group(2)) if match else None


def ledger_of(state_dir: Path) -> list[dict]:
    """A site's ledger entries ([] while it has none; a torn read counts as none yet)."""
    try:
        return json.loads((state_dir / "privacy_ledger.json").read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return []


def kill_tree(process: FlowerProcess) -> list[processes.ProcessRecord]:
    """SIGKILL ``process`` and everything below it at once, by PID: its machine dies. Returns
    what was killed."""
    root = processes.record(process.pid)
    assert root is not None and process.proc.poll() is None, f"{process.name} was already gone"
    victims = [root, *processes.descendants(root)]
    for rec in victims:
        proc = processes.current(rec)
        if proc is not None:
            proc.kill()
    process.proc.wait(timeout=30)
    return victims


def stop_all(procs: Sequence[FlowerProcess]) -> None:
    """Stop each process and its tree by PID (:meth:`FlowerProcess.stop`), all at the same time."""
    with ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
        for future in [pool.submit(p.stop) for p in procs]:
            future.result()
