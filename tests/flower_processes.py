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
its ports), so that the test can stop them and check that none is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import httpx

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


# ---------------------------------------------------------------------------------- /proc
def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def alive(key: tuple[int, int]) -> bool:
    stat = _stat(key[0])
    return stat is not None and stat[1] == key[1]


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process below ``root``."""
    table = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append((child, table[child][1]))
            stack.append(child)
    return found


def processes_naming(markers: Iterable[str]) -> list[tuple[int, str]]:
    """Live processes (but this one) whose command line contains any of ``markers``."""
    markers = list(markers)
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        command = cmdline(pid)
        if any(m in command for m in markers) and _stat(pid) is not None:
            found.append((pid, command))
    return found


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
        self.roots: set[tuple[int, int]] = set()
        self.seen: dict[tuple[int, int], str] = {}  # (pid, start time) -> command line
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add_marker(self, marker: str) -> None:
        with self._lock:
            self.markers.append(marker)

    def add_root(self, pid: int) -> None:
        stat = _stat(pid)
        if stat is not None:
            with self._lock:
                self.roots.add((pid, stat[1]))
            self.scan()

    def _is_ours(self, pid: int) -> bool:
        command = cmdline(pid)
        return any(m in command for m in self.markers)

    def scan(self) -> None:
        with self._lock:
            table = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
            tracked = set(self.roots) | set(self.seen)
            changed = True
            while changed:  # children of tracked processes are tracked, transitively
                changed = False
                for pid, (ppid, start) in table.items():
                    key = (pid, start)
                    if key in tracked or pid == os.getpid():
                        continue
                    parent = table.get(ppid)
                    if (parent is not None and (ppid, parent[1]) in tracked) or self._is_ours(pid):
                        tracked.add(key)
                        self.seen[key] = cmdline(pid)
                        changed = True
            for key in self.roots:
                self.seen.setdefault(key, cmdline(key[0]))
            # A child first seen between fork and exec still shows its parent's command line:
            # refresh the command of every tracked process that is still running.
            for pid, start in list(self.seen):
                if table.get(pid, (None, None))[1] == start and (command := cmdline(pid)):
                    self.seen[(pid, start)] = command

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.scan()

    def __enter__(self) -> "ProcessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def alive(self) -> dict[tuple[int, int], str]:
        return {key: command for key, command in self.seen.items() if alive(key)}

    def wait_all_gone(self, timeout: float) -> dict[tuple[int, int], str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return {}
            time.sleep(0.2)
        return self.alive()

    def kill_leftovers(self) -> None:
        """SIGKILL, by PID, every recorded process that is still the same process."""
        for key in list(self.alive()):
            try:
                os.kill(key[0], signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_tree(proc: subprocess.Popen, timeout: float = 15.0) -> list[tuple[int, int]]:
    """Stop ``proc`` and every process below it, by PID; return the (pid, start) stopped.

    The tree is collected first (children are re-parented once their parent dies), then
    each process gets SIGTERM, and SIGKILL if it is still the same process after ``timeout``.
    Flower's processes watch their ``--parent-pid`` and exit with it too, but we do not rely
    on it.
    """
    tree: list[tuple[int, int]] = []
    # Only while it is our unreaped child is proc.pid surely still this process (not recycled).
    if proc.poll() is None and (stat := _stat(proc.pid)) is not None:
        tree = [(proc.pid, stat[1]), *descendants(proc.pid)]
    for pid, _ in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap our own child
        if not any(alive(key) for key in tree):
            break
        time.sleep(0.1)
    for key in tree:
        if alive(key):
            try:
                os.kill(key[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return tree


# ---------------------------------------------------------------------------------- launchers
class FlowerProcess:
    """One long-running Flower binary, its output in a log file, stopped by PID."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path,
                 watch: ProcessWatch | None = None) -> None:
        self.name, self.command, self.log = name, list(command), log
        self._log_handle = open(log, "w")
        self.stopped = False
        self.proc = subprocess.Popen(
            self.command, env=dict(env), cwd=cwd, stdout=self._log_handle, stderr=subprocess.STDOUT,
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


def start_superlink(port: int, env: Mapping[str, str], cwd: Path, log: Path, watch: ProcessWatch | None = None,
                    timeout: float = 60.0) -> FlowerProcess:
    """A deployment SuperLink: Fleet, Control and ServerAppIo APIs all on ``127.0.0.1:port``."""
    command = [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port)]
    link = FlowerProcess("flower-superlink", command, env, cwd, log, watch)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {link.proc.returncode}:\n{tail(link.output())}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return link
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    link.stop()
    raise TimeoutError(f"flower-superlink did not answer on port {port} within {timeout:.0f} s:\n{tail(link.output())}")


def start_supernode(superlink_port: int, port: int, node_config: str, env: Mapping[str, str], cwd: Path, log: Path,
                    watch: ProcessWatch | None = None) -> FlowerProcess:
    """A SuperNode of the SuperLink on ``127.0.0.1:superlink_port``; see :func:`node_id_of`."""
    command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
               "--port", str(port), "--node-config", node_config]
    return FlowerProcess(f"flower-supernode ({node_config})", command, env, cwd, log, watch)


def node_id_of(node: FlowerProcess, timeout: float = 60.0) -> int:
    """The SuperNode's Flower node id, once it has registered with the SuperLink."""
    out = node.wait_for_output("SuperNode ID:", timeout)
    return int(out.split("SuperNode ID:", 1)[1].split()[0])


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
