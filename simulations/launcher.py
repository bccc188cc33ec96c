"""Run the Flower App through Flower's simulation engine with a SuperLink of our own.

``flwr run . local`` starts a shared background SuperLink on fixed ports and leaves it
running. We start a private one instead (free port, private ``FLWR_HOME``), submit the run
with ``flwr run APP coautogen --stream``, check its final status with ``flwr ls`` (``--stream``
exits 0 even when the run failed), and stop exactly the processes we started, by PID
(``simulations/processes.py``), also when the launcher is interrupted. What it started is
recorded in ``$FLWR_HOME/launcher.json``; :func:`cleanup` stops what a killed launcher left
(both in ``simulations/leftovers.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping

import httpx

from . import processes
from .leftovers import STATE_FILE, write_state
from .leftovers import cleanup as cleanup  # re-exported: tests call launcher.cleanup

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

    What it starts (the SuperLink, in a session and process group of its own, and the `flwr
    run` client) and every process seen below them is recorded, with creation times, in
    ``$FLWR_HOME/launcher.json`` while the run goes on, so that :func:`cleanup` can stop what a
    killed launcher left behind.

    Parameters
    ----------
    flwr_home : Path
        A private Flower home (config.toml, SuperLink log, launcher.json); created if needed.
    port : int, optional
        The SuperLink's HTTP port; a free one by default.
    """

    RECORD_INTERVAL_S = 1.0

    def __init__(self, flwr_home: Path, port: int | None = None) -> None:
        self.flwr_home = Path(flwr_home).resolve()
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None  # the `flwr run` (and `flwr ls`) client
        self.log_file = self.flwr_home / "superlink.log"
        self.state_file = self.flwr_home / STATE_FILE
        self.stopped: list[processes.ProcessRecord] = []  # what stop() signalled
        self.leftovers: list[processes.ProcessRecord] = []  # what survived even SIGKILL
        self._launcher = processes.record(os.getpid())
        self._records: dict[int, processes.ProcessRecord] = {}
        self._roots: list[processes.ProcessRecord] = []
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # the recorder thread and the main thread both save
        self._recording = threading.Event()
        self._recorder: threading.Thread | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec
        return env

    @property
    def markers(self) -> list[str]:
        return [str(self.flwr_home)]

    @property
    def env_marker(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.flwr_home)}

    def _write_flower_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    # ------------------------------------------------------------------ the state file
    def _add_root(self, pid: int, command: list[str]) -> None:
        rec = processes.record(pid, command)
        if rec is not None:
            with self._lock:
                self._roots.append(rec)
                self._records[rec.pid] = rec
        self._save("running")

    def _scan(self) -> bool:
        """Record every live process below the roots; True if something new was seen."""
        with self._lock:
            roots = list(self._roots)
        new = False
        for root in roots:
            for rec in processes.descendants(root):
                with self._lock:
                    old = self._records.get(rec.pid)
                    if old is None or not processes.same_time(old.create_time, rec.create_time):
                        self._records[rec.pid] = rec
                        new = True
        return new

    def _save(self, state: str) -> None:
        with self._lock:
            recorded = [rec.to_dict() for rec in self._records.values()]
        payload = {
            "version": 1,
            "state": state,
            "flwr_home": str(self.flwr_home),
            "port": self.port,
            "launcher": self._launcher.to_dict() if self._launcher else None,
            "superlink": self._roots[0].to_dict() if self._roots else None,
            "processes": recorded,
            "leftovers": [rec.to_dict() for rec in self.leftovers],
            "updated": time.time(),
        }
        with self._save_lock:
            write_state(self.state_file, payload)

    def _record_loop(self) -> None:
        while not self._recording.wait(self.RECORD_INTERVAL_S):
            try:
                if self._scan():
                    self._save("running")
            except Exception:  # noqa: BLE001 - recording is best effort; stop() scans again
                pass

    # ------------------------------------------------------------------ start and stop
    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its HTTP API answers."""
        self._write_flower_config()
        command = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            "--log-file",
            str(self.log_file),
        ]
        try:
            with processes.shielded():  # no signal between starting it and recording it
                self.process = subprocess.Popen(
                    command,
                    env=self.env,
                    cwd=self.flwr_home,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # its own session and process group: stop() signals the group
                )
                self._add_root(self.process.pid, command)
                self._recorder = threading.Thread(target=self._record_loop, name="coautogen-recorder", daemon=True)
                self._recorder.start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise SimulationError(
                        f"flower-superlink exited with code {self.process.returncode}; see {self.log_file}"
                    )
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            raise SimulationError(f"flower-superlink did not answer within {timeout:.0f} s; see {self.log_file}")
        except BaseException as exc:
            self.stop()
            if isinstance(exc, processes.Interrupted):
                exc.leftovers = list(self.leftovers)
            raise

    def _reap(self) -> None:
        for proc in (self.process, self.client):
            if proc is not None:
                proc.poll()

    def stop(self, timeout: float = 20.0) -> list[processes.ProcessRecord]:
        """Stop the SuperLink and every process it and the `flwr run` client started, by PID.

        SuperExec starts a session of its own, and the simulation runtime and Ray's processes
        live in it, so the SuperLink's process group alone is not enough: the whole tree
        (recorded while the run went on, re-scanned now) and every process naming this run's
        ``FLWR_HOME`` (command line or environment) get SIGTERM, each group leader's group too,
        and whatever is still the same process after ``timeout`` seconds gets SIGKILL.
        Signals arriving meanwhile wait until the stop is done. Returns what was signalled.
        """
        if self.process is None and self.client is None:
            return []
        with processes.shielded():
            self._recording.set()
            if self._recorder is not None:
                self._recorder.join(timeout=5)
            self._scan()
            with self._lock:
                roots = list(self._records.values())
            exclude = [self._launcher.pid] if self._launcher else []
            self.stopped = processes.stop(
                roots, self.markers, self.env_marker, grace_s=timeout, exclude=exclude, reap=self._reap
            )
            self.leftovers = processes.still_running(self.stopped)
            for proc in (self.process, self.client):
                if proc is not None:
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            self._save("stopped" if not self.leftovers else "running")
            self.process = self.client = None
        return self.stopped

    def __enter__(self) -> "FlowerSimulation":
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.stop()
        if isinstance(exc, processes.Interrupted):
            exc.leftovers = list(self.leftovers)

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
        federation = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} "
            f"client-resources-num-gpus={float(num_gpus)}"
        )
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        command = [_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--federation-config", federation]
        if overrides:
            command += ["--run-config", overrides]
        # A neutral working directory: Ray workers put the cwd first on sys.path.
        with processes.shielded():
            proc = self.client = subprocess.Popen(
                command, env=self.env, cwd=self.flwr_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            self._add_root(proc.pid, command)
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
            raise SimulationError(
                f"`flwr run` did not start a run (exit code {proc.returncode}); "
                f"see the output above and {self.log_file}"
            )
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
