"""Run the Flower App through Flower's simulation engine with a SuperLink of our own.

``flwr run . local`` starts a shared background SuperLink on fixed ports and leaves it
running. We start a private one instead (free port, private ``FLWR_HOME``), submit the run
with ``flwr run APP coautogen --stream``, check its final status with ``flwr ls`` (``--stream``
exits 0 even when the run failed), and stop exactly the processes we started, by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping

import httpx

CONNECTION = "coautogen"
FLOWER_ENV = {
    # Offline machines: never let the SuperLink pip-install the app's dependencies.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


class SimulationError(RuntimeError):
    """The Flower simulation could not start or the run did not complete."""


def app_dir() -> Path:
    """The Flower App folder: the project root holding pyproject.toml with [tool.flwr.app]."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(f"no pyproject.toml next to {root}; install the project with `pip install -e .`")
    return root


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """PIDs of every live process below ``root`` (from /proc; empty where /proc is absent)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (info := _ppid_and_state(int(entry))) is not None:
            children.setdefault(info[0], []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def _signal(pid: int, sig: int, own_group: int) -> None:
    """Signal a process and, unless it is ours, its process group."""
    try:
        group = os.getpgid(pid)
        if group != own_group:
            os.killpg(group, sig)
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (not whatever PATH has first)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


@dataclass
class RunStatus:
    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class FlowerSimulation:
    """A private simulation SuperLink; use as a context manager.

    Parameters
    ----------
    flwr_home : Path
        A private Flower home (config.toml, SuperLink log); created if needed.
    port : int, optional
        The SuperLink's HTTP port; a free one by default.
    """

    def __init__(self, flwr_home: Path, port: int | None = None) -> None:
        self.flwr_home = Path(flwr_home).resolve()
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_file = self.flwr_home / "superlink.log"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec
        return env

    def _write_flower_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its HTTP API answers."""
        self._write_flower_config()
        command = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--log-file", str(self.log_file),
        ]
        self.process = subprocess.Popen(
            command, env=self.env, cwd=self.flwr_home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() takes its children too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SimulationError(f"flower-superlink did not answer within {timeout:.0f} s; see {self.log_file}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the SuperLink and every process under it, by PID.

        SuperExec starts a session of its own, and the simulation runtime and Ray workers live
        in it, so the SuperLink's process group alone is not enough: collect the whole tree
        first (children are re-parented once their parent dies), then terminate each process
        and its group, and kill whatever is still alive after ``timeout`` seconds.
        """
        if self.process is None:
            return
        tree = [self.process.pid, *descendants(self.process.pid)]
        own_group = os.getpgrp()
        for pid in tree:
            _signal(pid, signal.SIGTERM, own_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            self.process.poll()  # reap the SuperLink, our own child
            time.sleep(0.2)
        for pid in tree:
            if _alive(pid):
                _signal(pid, signal.SIGKILL, own_group)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "FlowerSimulation":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self,
        app: Path,
        run_config: Mapping[str, object],
        num_supernodes: int,
        num_cpus: int = 1,
        num_gpus: float = 0.0,
        output: IO[str] | None = None,
    ) -> RunStatus:
        """Submit the app, stream its logs to ``output`` and return its final status."""
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} client-resources-num-gpus={float(num_gpus)}"
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        command = [_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--federation-config", federation]
        if overrides:
            command += ["--run-config", overrides]
        # A neutral working directory: Ray workers put the cwd first on sys.path.
        proc = subprocess.Popen(command, env=self.env, cwd=self.flwr_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if output is not None:
                output.write(line)
                output.flush()
            match = re.search(r"run (?:ID|id)[:\s]+(\d+)|Successfully started run (\d+)", line)
            if match and run_id is None:
                run_id = int(match.group(1) or match.group(2))
        proc.wait()
        if run_id is None:
            raise SimulationError(f"`flwr run` did not start a run (exit code {proc.returncode}); see the output above and {self.log_file}")
        return RunStatus(run_id, self.status(run_id))

    def status(self, run_id: int) -> str:
        """The run's status as `flwr ls` reports it, e.g. ``finished:completed``."""
        command = [_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
        result = subprocess.run(command, env=self.env, cwd=self.flwr_home, capture_output=True, text=True, timeout=60)
        return parse_status(result.stdout, run_id)


def parse_status(text: str, run_id: int) -> str:
    """Find the status of ``run_id`` in `flwr ls --format json` output."""
    start = text.find("{")
    if start < 0:
        raise SimulationError(f"`flwr ls` printed no JSON: {text.strip()[:300]}")
    payload = json.loads(text[start:])
    for run in payload.get("runs", []):
        if int(run.get("run-id", -1)) == run_id:
            return str(run.get("status", "unknown"))
    raise SimulationError(f"run {run_id} not in `flwr ls` output: {text.strip()[:300]}")


def run_simulation(
    run_config: Mapping[str, object],
    num_supernodes: int,
    flwr_home: Path,
    num_cpus: int = 1,
    num_gpus: float = 0.0,
    output: IO[str] | None = None,
) -> RunStatus:
    """Start a private SuperLink, run the app once, stop the SuperLink."""
    with FlowerSimulation(flwr_home) as simulation:
        return simulation.run(app_dir(), run_config, num_supernodes, num_cpus, num_gpus, output)
