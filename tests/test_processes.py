"""Process handling in one place (simulations/processes.py): the tree walk, the PID-reuse guard,
stopping groups and trees, the launcher's state file and `coautogen cleanup`; and, with Flower,
`coautogen run` stopped by SIGTERM mid-round and cleaned up after SIGKILL.

Every process a test starts is stopped by PID (matched with its creation time) in a finally block.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from simulations import cli, commands, launcher, processes
from simulations.processes import ProcessRecord

from flower_processes import ProcessWatch, processes_naming

PY = sys.executable
SLEEP = "import time; time.sleep(600)"


# ---------------------------------------------------------------------------------- helpers
def spawn(code: str, *args: str, new_session: bool = False, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", code, *args],
        start_new_session=new_session,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_records(records) -> None:
    """SIGKILL, by PID, whatever of ``records`` is still the same process."""
    for rec in records:
        proc = processes.current(rec)
        if proc is not None:
            try:
                proc.kill()
            except psutil.Error:
                pass


def reap(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


# A parent (root of its own session) with: a child; a grandchild in a session of its own (as
# SuperExec and Ray's processes do); a child that ignores SIGTERM; and an orphan in the root's
# process group (its parent exited: no longer a descendant, still in the group). It writes their
# PIDs to a file once all run.
TREE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    out = sys.argv[1]
    py = sys.executable
    sleep = "import time; time.sleep(600)"
    child = subprocess.Popen([py, "-c", "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(600)", out + ".grandchild"])
    stubborn = subprocess.Popen([py, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(__import__('sys').argv[1], 'w').write('ready'); time.sleep(600)", out + ".stubborn"])
    middle = subprocess.Popen([py, "-c", "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "open(sys.argv[1], 'w').write(str(p.pid))", out + ".orphan"])
    middle.wait()
    while not all(os.path.exists(out + s) for s in (".grandchild", ".stubborn", ".orphan")):
        time.sleep(0.02)
    pids = {"root": os.getpid(), "child": child.pid, "stubborn": stubborn.pid,
            "grandchild": int(open(out + ".grandchild").read()), "orphan": int(open(out + ".orphan").read())}
    open(out + ".tmp", "w").write(json.dumps(pids))
    os.replace(out + ".tmp", out)
    time.sleep(600)
    """
)


@pytest.fixture
def tree(tmp_path):
    """The dummy tree above; yields (root Popen, {role: ProcessRecord}); all killed afterwards."""
    out = tmp_path / "tree.json"
    root = spawn(TREE, str(out), new_session=True)
    records: dict[str, ProcessRecord] = {}
    try:
        pids = wait_for(lambda: out.is_file() and json.loads(out.read_text()), what="the dummy tree")
        for role, pid in pids.items():
            rec = processes.record(pid)
            assert rec is not None, f"{role} {pid} not running"
            records[role] = rec
        yield root, records
    finally:
        kill_records(records.values())
        reap(root)


# ---------------------------------------------------------------------------------- unit tests
def test_record_identifies_a_process_by_pid_and_creation_time():
    proc = spawn(SLEEP)
    try:
        rec = wait_for(lambda: processes.record(proc.pid), what="the record")
        assert rec.pid == proc.pid and abs(rec.create_time - psutil.Process(proc.pid).create_time()) < 1e-6
        assert processes.is_alive(rec)
        assert ProcessRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
        # The command we started it with wins over a read-back (empty or the parent's just after a start).
        launched = processes.record(proc.pid, ["flower-superlink", "--insecure"])
        assert launched.command == "flower-superlink --insecure" and launched.key == rec.key
        proc.kill()
        proc.wait()
        assert not processes.is_alive(rec)
        assert processes.record(proc.pid) is None
    finally:
        reap(proc)


def test_a_zombie_counts_as_gone():
    proc = spawn("pass")
    try:
        rec = ProcessRecord(proc.pid, psutil.Process(proc.pid).create_time())
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, what="the zombie")
        assert not processes.is_alive(rec)  # exited; only our wait() is missing
    finally:
        reap(proc)


def test_pid_reuse_guard_never_signals_a_different_process():
    """A record whose creation time does not match the live process with that PID (what a
    recycled PID looks like) is never signalled, neither by stop() nor by its group."""
    proc = spawn(SLEEP, new_session=True)  # a group leader: the group kill is guarded too
    try:
        real = wait_for(lambda: processes.record(proc.pid), what="the record")
        for offset in (-3600.0, -2.0, 2.0, 3600.0):
            recycled = ProcessRecord(real.pid, real.create_time + offset, "what used to have this PID")
            assert processes.current(recycled) is None and not processes.is_alive(recycled)
            assert processes.descendants(recycled) == []
            stopped = processes.stop([recycled], grace_s=0.5, kill_wait_s=0.5)
            assert stopped == []
            assert processes.is_alive(real) and proc.poll() is None
        # The tolerance covers the boot-time rounding of creation times, nothing more.
        assert processes.CREATE_TIME_TOLERANCE_S <= 1.0
        assert processes.is_alive(ProcessRecord(real.pid, real.create_time + 0.5))
    finally:
        reap(proc)


def test_descendants_walk_the_tree_across_sessions(tree):
    root, recs = tree
    below = {rec.pid for rec in processes.descendants(recs["root"])}
    assert {recs["child"].pid, recs["grandchild"].pid, recs["stubborn"].pid} <= below
    assert recs["orphan"].pid not in below  # re-parented: only its process group ties it to the root
    assert os.getsid(recs["grandchild"].pid) == recs["grandchild"].pid != os.getsid(recs["root"].pid)
    assert os.getpgid(recs["orphan"].pid) == recs["root"].pid
    assert processes.descendants(root.pid) and processes.descendants(ProcessRecord(root.pid, 1.0)) == []


def test_stop_takes_the_tree_the_group_and_the_stubborn(tree):
    root, recs = tree
    started = time.monotonic()
    stopped = processes.stop([recs["root"]], grace_s=2.0, kill_wait_s=5.0, reap=root.poll)
    elapsed = time.monotonic() - started
    assert {rec.pid for rec in stopped} >= {r.pid for role, r in recs.items() if role != "orphan"}
    for role, rec in recs.items():
        assert not processes.is_alive(rec), f"{role} still running"
    assert root.poll() == -signal.SIGTERM  # the root went on SIGTERM; the stubborn one needed SIGKILL
    assert 2.0 <= elapsed < 15.0  # the grace, then SIGKILL
    assert processes.still_running(stopped) == []


def test_markers_match_whole_paths_and_environment(tmp_path):
    home = tmp_path / "run" / "flower"
    home.mkdir(parents=True)
    assert processes.names(f"flower-superlink --log-file {home}/superlink.log", str(home))
    assert processes.names(f"x --home {home}", str(home))
    assert not processes.names(f"x --home {home}2/superlink.log", str(home))
    assert not processes.names(f"x --home {home}.old", str(home))
    by_command = spawn(SLEEP, f"{home}/superlink.log", new_session=True)
    by_env = spawn(SLEEP, new_session=True, env={**os.environ, "FLWR_HOME": str(home)})
    other = spawn(SLEEP, f"{home}2/superlink.log", new_session=True, env={**os.environ, "FLWR_HOME": f"{home}2"})
    try:
        wait_for(lambda: all(processes.record(p.pid) for p in (by_command, by_env, other)), what="the sleepers")
        found = {rec.pid for rec in processes.find_processes([str(home)], {"FLWR_HOME": str(home)})}
        assert by_command.pid in found and by_env.pid in found and other.pid not in found
        assert os.getpid() not in found
        stopped = processes.stop(
            [], [str(home)], {"FLWR_HOME": str(home)}, grace_s=5.0, reap=lambda: (by_command.poll(), by_env.poll())
        )
        assert {rec.pid for rec in stopped} == {by_command.pid, by_env.pid}
        assert by_command.wait(5) == -signal.SIGTERM and by_env.wait(5) == -signal.SIGTERM
        assert other.poll() is None  # another run's FLWR_HOME, a prefix apart
    finally:
        reap(by_command, by_env, other)


def _dead_record() -> ProcessRecord:
    proc = spawn("pass")
    rec = ProcessRecord(proc.pid, psutil.Process(proc.pid).create_time(), "coautogen run (killed)")
    proc.wait()
    return rec


def _write_state(
    home: Path, launcher_rec: ProcessRecord, recorded: list[ProcessRecord], state: str = "running"
) -> Path:
    path = home / launcher.STATE_FILE
    launcher.write_state(
        path,
        {
            "version": 1,
            "state": state,
            "flwr_home": str(home),
            "launcher": launcher_rec.to_dict(),
            "superlink": recorded[0].to_dict() if recorded else None,
            "processes": [r.to_dict() for r in recorded],
            "leftovers": [],
        },
    )
    return path


def test_cleanup_stops_what_a_killed_launcher_left_and_nothing_else(tmp_path):
    """The state file of a killed launcher: its "SuperLink" (naming FLWR_HOME, own session) with
    a child in another session, a process with FLWR_HOME in its environment that nobody
    recorded; plus recorded entries that must survive: a live process whose creation time does
    not match (a recycled PID) and a live process with a matching time that is not the run's."""
    home = (tmp_path / "runs" / "r1" / "flower").resolve()
    home.mkdir(parents=True)
    link_code = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        "start_new_session=True); time.sleep(600)"
    )
    link = spawn(link_code, "--log-file", f"{home}/superlink.log", new_session=True)
    unrecorded = spawn(SLEEP, new_session=True, env={**os.environ, "FLWR_HOME": str(home)})
    recycled = spawn(SLEEP, new_session=True)
    unrelated = spawn(SLEEP, new_session=True)
    everything = [link, unrecorded, recycled, unrelated]
    records: list[ProcessRecord] = []
    try:
        link_rec = wait_for(lambda: processes.record(link.pid), what="the fake SuperLink")
        worker = wait_for(lambda: processes.descendants(link_rec), what="its child")[0]
        records = [link_rec, worker, *(wait_for(lambda p=p: processes.record(p.pid)) for p in everything[1:])]
        recycled_rec = processes.record(recycled.pid)
        fake_recycled = ProcessRecord(recycled_rec.pid, recycled_rec.create_time - 120.0, "an old process")
        unrelated_rec = processes.record(unrelated.pid)
        state_file = _write_state(home, _dead_record(), [link_rec, worker, fake_recycled, unrelated_rec])

        result = launcher.cleanup(home, grace_s=5.0)
        assert not result.launcher_running and result.run_dir == home.parent
        assert {r.pid for r in result.stopped} == {link.pid, worker.pid, unrecorded.pid}
        assert result.leftovers == []
        for rec in (link_rec, worker, records[2]):
            assert not processes.is_alive(rec)
        assert recycled.poll() is None and unrelated.poll() is None  # never signalled
        assert json.loads(state_file.read_text())["state"] == "stopped"

        # A second pass finds nothing; so does the sweep at the start of the next run.
        assert launcher.cleanup(home).stopped == []
        buffer = io.StringIO()
        cli._sweep_leftovers(home.parent.parent, buffer)
        assert buffer.getvalue() == ""
    finally:
        kill_records(records)
        reap(*everything)


def test_cleanup_leaves_a_running_launcher_alone(tmp_path):
    home = (tmp_path / "r2" / "flower").resolve()
    home.mkdir(parents=True)
    live_launcher = spawn(SLEEP)
    link = spawn(SLEEP, f"{home}/superlink.log", new_session=True)
    try:
        launcher_rec = wait_for(lambda: processes.record(live_launcher.pid))
        link_rec = wait_for(lambda: processes.record(link.pid))
        _write_state(home, launcher_rec, [link_rec])
        result = launcher.cleanup(home)
        assert result.launcher_running and result.stopped == []
        assert link.poll() is None
        out = io.StringIO()
        commands._report_cleanup(result, out)
        assert f"still going on (launcher PID {live_launcher.pid}); not touched" in out.getvalue()
    finally:
        reap(live_launcher, link)


def test_next_run_sweeps_leftovers_of_a_killed_run(tmp_path):
    out_dir = tmp_path / "runs"
    home = (out_dir / "killed" / "flower").resolve()
    home.mkdir(parents=True)
    (out_dir / "clean" / "flower").mkdir(parents=True)  # a run that ended normally: not scanned
    link = spawn(SLEEP, f"{home}/superlink.log", new_session=True)
    try:
        link_rec = wait_for(lambda: processes.record(link.pid))
        _write_state(home, _dead_record(), [link_rec])
        _write_state(out_dir / "clean" / "flower", _dead_record(), [], state="stopped")
        buffer = io.StringIO()
        cli._sweep_leftovers(out_dir, buffer)
        assert (
            buffer.getvalue() == f"coautogen: stopped 1 process(es) left running by the killed run in {home.parent}\n"
        )
        assert link.wait(10) == -signal.SIGTERM
    finally:
        reap(link)


def test_cleanup_command(tmp_path, capsys):
    home = (tmp_path / "runs" / "r3" / "flower").resolve()
    home.mkdir(parents=True)
    link = spawn(SLEEP, f"{home}/superlink.log", new_session=True)
    try:
        link_rec = wait_for(lambda: processes.record(link.pid))
        dead = _dead_record()
        _write_state(home, dead, [link_rec])
        assert cli.main(["cleanup", str(home.parent)]) == 0
        out = capsys.readouterr().out
        assert f"coautogen cleanup: {home.parent}: stopped 1 process(es) left by launcher PID {dead.pid}" in out
        assert f"  stopped {link.pid} ({sys.executable} -c {SLEEP}" in out
        assert link.wait(10) == -signal.SIGTERM
        assert cli.main(["cleanup", "--all-under", str(tmp_path / "runs")]) == 0
        assert capsys.readouterr().out == f"coautogen cleanup: {home.parent}: nothing left running\n"
        assert cli.main(["cleanup"]) == 2
        assert cli.main(["cleanup", str(tmp_path / "missing")]) == 2
    finally:
        reap(link)


SHIELD = textwrap.dedent(
    """
    import os, signal, sys
    from simulations import processes
    handler = processes.SignalHandler().install()
    try:
        with processes.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            print("shield held", flush=True)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: ignored
        print("not reached", flush=True)
    except processes.Interrupted as exc:
        print(f"interrupted by {exc.name}", flush=True)
        sys.exit(128 + exc.signum)
    """
)


def test_signals_wait_for_the_shielded_block():
    """SIGTERM inside a shielded block (starting or stopping processes) is raised as
    Interrupted when the block ends; a second signal does not cut the stop short."""
    result = subprocess.run(
        [PY, "-c", SHIELD], capture_output=True, text=True, timeout=60, cwd=Path(cli.__file__).resolve().parent.parent
    )
    assert result.stdout.splitlines() == ["shield held", "interrupted by SIGTERM"], result.stderr
    assert result.returncode == 143


FAKE_SUPERLINK = """#!{python}
# Stands in for flower-superlink: answers /health, and starts a "SuperExec" in a session of its own
# that starts a "Ray worker" in yet another session (both inherit FLWR_HOME from the launcher).
import http.server, subprocess, sys, threading
port = int(sys.argv[sys.argv.index("--port") + 1])
subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
                  "time.sleep(600)"], start_new_session=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
FAKE_FLWR = """#!{python}
# Stands in for `flwr run --stream`: says it is ready, then streams nothing for a long time.
import os, time
open(os.environ["FAKE_FLWR_READY"], "w").write("ready")
time.sleep(600)
"""
RUN_WITH_FAKES = textwrap.dedent(
    """
    import sys
    from simulations import cli, launcher
    fakes = {"flower-superlink": sys.argv[1], "flwr": sys.argv[2]}
    real_bin = launcher._bin
    launcher._bin = lambda name: fakes.get(name) or real_bin(name)
    sys.exit(cli.main(["run", *sys.argv[3:]]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_stops_its_tree_without_flower(tmp_path, sig):
    """`coautogen run` with stand-ins for flower-superlink and `flwr run`: SIGINT or SIGTERM while
    it streams stops the whole tree it started (other sessions included), exits 128 + signum
    with one line on stderr, and marks its state file stopped."""
    fakes = []
    for name, text in (("superlink", FAKE_SUPERLINK), ("flwr", FAKE_FLWR)):
        path = tmp_path / f"fake-{name}"
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
        fakes.append(str(path))
    run_dir = tmp_path / "runs" / "fake"
    home = str((run_dir / "flower").resolve())
    ready = tmp_path / "ready"
    command = [
        PY,
        "-c",
        RUN_WITH_FAKES,
        *fakes,
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "fake",
        "--num-hospitals",
        "2",
    ]
    proc = subprocess.Popen(
        command,
        cwd=Path(cli.__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FAKE_FLWR_READY": str(ready)},
    )
    seen: list[ProcessRecord] = []
    try:

        def tree_up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"exited early: {proc.communicate()}")
            seen[:] = processes.find_processes([home], {"FLWR_HOME": home})
            return ready.is_file() and len(seen) >= 4  # superlink, its "SuperExec" and worker, the client

        wait_for(tree_up, 60, "the fake tree")
        assert len({os.getsid(r.pid) for r in seen}) >= 3  # spread over sessions, like Flower's
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        name = signal.Signals(sig).name
        assert proc.returncode == 128 + sig, (stdout, stderr)
        assert stderr.strip().splitlines()[-1] == (
            f"coautogen run: stopped by {name}; the Flower processes it started are stopped; "
            f"the run directory keeps what finished: {run_dir}"
        ), stderr
        assert "Traceback" not in stderr
        assert processes.still_running(seen) == [] and processes.find_processes([home], {"FLWR_HOME": home}) == []
        state = json.loads((run_dir / "flower" / launcher.STATE_FILE).read_text())
        assert state["state"] == "stopped" and state["launcher"]["pid"] == proc.pid
        recorded = {d["pid"] for d in state["processes"]}
        assert {r.pid for r in seen} <= recorded  # the recorder had the whole tree in the state file
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        kill_records(seen)


# ---------------------------------------------------------------------------------- with Flower
TINY = [
    "--num-hospitals",
    "3",
    "feedback.rounds=3",
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=2",
]
ROUND_STARTED = "round 1/3:"  # the strategy's line when round 1's candidates go out
FLOWER_BINARIES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet")
ACTOR = "ray::ClientAppActor"


def _start_run(tmp_path: Path, watch: ProcessWatch, name: str) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "runs" / name
    command = [
        str(Path(sys.executable).parent / "coautogen"),
        "run",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        name,
        *TINY,
    ]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch.add_root(proc.pid)
    return proc, run_dir


def _wait_for_round(proc: subprocess.Popen, run_dir: Path, watch: ProcessWatch, timeout: float = 240.0) -> None:
    """Until round 1's candidates went out and the sites' ClientApps (Ray actors) run."""
    log = run_dir / "flower.log"

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"coautogen run exited early ({proc.returncode}): {proc.communicate()}")
        if not (log.is_file() and ROUND_STARTED in log.read_text(errors="replace")):
            return False
        watch.scan()
        return any(ACTOR in command for command in watch.alive().values())

    wait_for(started, timeout, "round 1 with running ClientApp actors")


def _ours(run_dir: Path) -> list[ProcessRecord]:
    home = str((run_dir / "flower").resolve())
    return processes.find_processes([home], {"FLWR_HOME": home})


@pytest.mark.flower
def test_sigterm_mid_round_stops_everything(tmp_path):
    started = time.monotonic()
    with ProcessWatch([str(tmp_path)]) as watch:
        proc, run_dir = _start_run(tmp_path, watch, "term")
        try:
            _wait_for_round(proc, run_dir, watch)
            watch.scan()
            running = " ".join(watch.alive().values())
            assert all(b in running for b in FLOWER_BINARIES), running  # mid-round: the tree is up
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=90)
            stop_s = time.monotonic() - sent
            assert proc.returncode == 143, f"stdout:\n{stdout}\nstderr:\n{stderr}"
            line = (
                f"coautogen run: stopped by SIGTERM; the Flower processes it started are stopped; "
                f"the run directory keeps what finished: {run_dir}"
            )
            assert stderr.strip().splitlines()[-1] == line, stderr
            assert "Traceback" not in stderr
            watch.scan()
            assert watch.alive() == {}, f"left running: {watch.alive()}"
            assert processes_naming([str(tmp_path)]) == [] and _ours(run_dir) == []
            state = json.loads((run_dir / "flower" / launcher.STATE_FILE).read_text())
            assert state["state"] == "stopped" and state["leftovers"] == []
            assert (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            watch.kill_leftovers()
    print(f"SIGTERM test: {time.monotonic() - started:.1f} s; SIGTERM to exit {stop_s:.1f} s")


@pytest.mark.flower
def test_sigkill_then_cleanup_stops_the_leftovers(tmp_path):
    started = time.monotonic()
    with ProcessWatch([str(tmp_path)]) as watch:
        proc, run_dir = _start_run(tmp_path, watch, "kill")
        try:
            _wait_for_round(proc, run_dir, watch)
            launcher_pid = proc.pid
            proc.kill()
            proc.communicate(timeout=30)
            time.sleep(1.0)
            watch.scan()
            leftovers = watch.alive()
            left = " ".join(leftovers.values())
            assert all(b in left for b in (*FLOWER_BINARIES, ACTOR)), left  # what a killed launcher leaves behind
            assert _ours(run_dir)
            cleanup_started = time.monotonic()

            result = subprocess.run(
                [str(Path(sys.executable).parent / "coautogen"), "cleanup", str(run_dir)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            cleanup_s = time.monotonic() - cleanup_started
            assert result.returncode == 0, result
            reported = {int(line.split()[1]) for line in result.stdout.splitlines()[1:]}
            # The leftovers that never exit on their own are among the processes reported stopped.
            must = {
                pid for (pid, _), command in leftovers.items() if any(b in command for b in (*FLOWER_BINARIES, ACTOR))
            }
            assert must and must <= reported, (must, result.stdout)
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"coautogen cleanup: {run_dir}: stopped ") and lines[0].endswith(
                f" process(es) left by launcher PID {launcher_pid}"
            ), result.stdout
            assert any("flower-superlink" in line for line in lines[1:]) and any(
                "flwr-simulation" in line for line in lines[1:]
            ), result.stdout
            watch.scan()
            assert watch.alive() == {}, f"left running: {watch.alive()}"
            assert processes_naming([str(tmp_path)]) == [] and _ours(run_dir) == []
            state = json.loads((run_dir / "flower" / launcher.STATE_FILE).read_text())
            assert state["state"] == "stopped"
            again = subprocess.run(
                [str(Path(sys.executable).parent / "coautogen"), "cleanup", str(run_dir)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert again.stdout == f"coautogen cleanup: {run_dir}: nothing left running\n"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            watch.kill_leftovers()
    print(f"SIGKILL + cleanup test: {time.monotonic() - started:.1f} s; cleanup {cleanup_s:.1f} s")
