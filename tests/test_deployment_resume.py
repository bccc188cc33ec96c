"""Kill the server machine of a loopback deployment mid-round and resume the run (issue 9).

One ``flower-superlink --insecure --database FILE`` and three ``flower-supernode`` sites with
their own terms (``partition-id``, ``state-dir``, ``site-epsilon=1.0``) start a tiny Feedback run
of 3 rounds with ``flwr run``. As soon as a site has paid for round 2 (its ledger holds the
round-2 entry) while the server's checkpoint still holds only round 1, the SuperLink, its
SuperExec and the ``flwr-serverapp`` process are SIGKILLed at once: a crash of the server
machine. The SuperNodes, on the sites' machines, keep running.

Then, as an operator would:

(a) the SuperLink is started again on the same ``--database`` and port. In flwr 1.41 the
    SuperNodes that stayed up reconnect by themselves (their HTTP retry loop never gives up,
    and the SuperLink's database still knows their node ids): each logs ``Connection attempt
    failed`` while the SuperLink is down and ``Connection successful after ...`` once it is back.
    The test waits a bounded time for that; a SuperNode that does not reconnect is restarted
    with the same node config and ``state-dir`` (a restart loses nothing: the site's ledger,
    secret and stored releases are in ``state-dir``), and the test prints which was needed.
(b) ``flwr run ... --run-config 'config-file="<run_dir>/config.yaml" tracking.resume=true'``
    continues the run from its checkpoint; ``flwr ls`` must show it ``finished:completed``.
(c) The resumed server replayed round 1 and asked rounds 2 and 3 and the noised evaluation;
    every site that had already paid for round 2 answered with the release it stored (its
    ledger entry and stored release are unchanged), so each site's ledger holds rounds
    1, 2, 3, 4 exactly once, all under the crashed run's key; ``metrics.jsonl`` has rounds
    1-3 once each, ``rounds/round_001..003`` and the 100 synthetic images exist, and no site
    spent more than its epsilon of 1.

Every process the test starts is stopped by PID in ``finally`` blocks; afterwards no process
naming the test's tmp folder or ports may remain.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from coautogen_fl.checkpoint import Checkpoint, CheckpointError
from coautogen_fl.config import load_config, save_config
from coautogen_fl.tracking import read_metrics
from simulations import processes
from simulations.launcher import app_dir, free_port, parse_status

from flower_processes import (
    BIN,
    FlowerProcess,
    ProcessWatch,
    alive,
    flower_env,
    flwr,
    kill_tree,
    ledger_of,
    node_id_of,
    processes_naming,
    run_id_of,
    site_config,
    start_superlink,
    start_supernode,
    stop_all,
    tail,
    write_connection,
)

pytestmark = pytest.mark.flower

CONNECTION = "deploy"
NUM_SITES, ROUNDS, EPSILON = 3, 3, 1.0
TINY = [
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=1",
    f"federation.num_hospitals={NUM_SITES}",
    f"privacy.epsilon={EPSILON}",
    "federation.timeout_s=150",
    f"feedback.rounds={ROUNDS}",
]
CRASH_ROUND = 2  # the round in flight when the server machine dies
RUN_TIMEOUT_S = 300.0  # each phase; a run takes ~50-60 s on 2 idle cores
DOWN_S = 60.0  # for every SuperNode to notice that the SuperLink is gone
RECONNECT_S = 90.0  # for the SuperNodes to reconnect to the restarted SuperLink by themselves
CLIENTAPPS_S = 60.0  # for the ClientApps in flight at the crash to finish
EXIT_GRACE_S = 15.0
NOTICED, RECONNECTED = "Connection attempt failed", "Connection successful after"


# ---------------------------------------------------------------------------------- helpers
def completed_rounds(run_dir: Path) -> int:
    try:
        return Checkpoint.load(run_dir).completed_rounds
    except CheckpointError:  # not written yet
        return 0


def since(process: FlowerProcess, offset: int) -> str:
    """What ``process`` logged after the first ``offset`` characters."""
    return process.output()[offset:]


# ---------------------------------------------------------------------------------- the test
def test_server_machine_killed_mid_round_resumes_on_the_same_database(tmp_path):
    started = time.monotonic()
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 1)

    flwr_home, cwd = tmp_path / "flwr-home", tmp_path / "cwd"
    cwd.mkdir()
    env = flower_env(flwr_home)
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    write_connection(flwr_home, CONNECTION, address)
    database = tmp_path / "superlink" / "state.db"
    database.parent.mkdir()
    state = {i: tmp_path / f"site{i}" for i in range(NUM_SITES)}
    run_dir = tmp_path / "run"
    run_config = save_config(
        load_config(overrides=[*TINY, f"tracking.run_dir={run_dir}"]),
        tmp_path / "run.yaml",
    )

    links: list[FlowerProcess] = []
    nodes: dict[int, FlowerProcess] = {}
    replaced: list[FlowerProcess] = []  # SuperNodes restarted because they did not reconnect
    first_run: subprocess.Popen | None = None
    first_out = tmp_path / "flwr-run-1.out"

    def logs() -> str:
        parts = [f"--- {p.name} ({p.log.name})\n{tail(p.output(), 30)}" for p in [*links, *nodes.values(), *replaced]]
        if first_out.exists():
            parts.append(f"--- flwr run (crashed run)\n{tail(first_out.read_text(errors='replace'), 30)}")
        return "\n".join(parts)

    with ProcessWatch([str(tmp_path), address]) as watch:
        try:
            # ---------------------------------------------------------- the deployment and the run
            links.append(start_superlink(link_port, env, cwd, tmp_path / "superlink-1.log", watch, database=database))
            for i in range(NUM_SITES):
                port = free_port()
                watch.add_marker(f"127.0.0.1:{port}")
                nodes[i] = start_supernode(
                    link_port,
                    port,
                    site_config(i, NUM_SITES, state[i], EPSILON),
                    env,
                    cwd,
                    tmp_path / f"site{i}.log",
                    watch,
                )
            node_ids = {i: node_id_of(nodes[i]) for i in range(NUM_SITES)}
            mark("deployment up")

            with open(first_out, "w") as out:
                first_run = subprocess.Popen(
                    [
                        str(BIN / "flwr"),
                        "run",
                        str(app_dir()),
                        CONNECTION,
                        "--stream",
                        "--run-config",
                        f'config-file="{run_config}"',
                    ],
                    env=env,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            watch.add_root(first_run.pid)

            # ---------------------------------------------------------- wait for round 2 in flight
            # Round 1 decided (checkpointed), round 2 asked, and at least one site has paid for it:
            # the server cannot have decided round 2 yet, because it waits for every site's reply.
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                output = first_out.read_text(errors="replace")
                paid = [i for i in range(NUM_SITES) if CRASH_ROUND in [e["round"] for e in ledger_of(state[i])]]
                if paid and f"round {CRASH_ROUND}/{ROUNDS}:" in output and completed_rounds(run_dir) == CRASH_ROUND - 1:
                    break
                assert first_run.poll() is None, f"the run ended before round {CRASH_ROUND}:\n{tail(output)}\n{logs()}"
                assert completed_rounds(run_dir) < CRASH_ROUND, (
                    f"round {CRASH_ROUND} was decided before a site paid for it"
                )
                assert time.monotonic() < deadline, f"round {CRASH_ROUND} was never paid for:\n{tail(output)}\n{logs()}"
                time.sleep(0.05)
            offsets = {i: len(nodes[i].output()) for i in range(NUM_SITES)}

            # ---------------------------------------------------------- crash of the server machine
            watch.scan()
            killed = kill_tree(links[0])
            links[0].stop()  # already dead: closes its log
            mark("crash")
            commands = " ".join(rec.command for rec in killed)
            for binary in ("flower-superlink", "flower-superexec", "flwr-serverapp"):
                assert binary in commands, f"{binary} not among the killed processes: {commands}"
            gone_by = time.monotonic() + 10
            while any(processes.is_alive(rec) for rec in killed) and time.monotonic() < gone_by:
                time.sleep(0.1)
            assert not [rec.describe() for rec in killed if processes.is_alive(rec)]
            assert all(node.proc.poll() is None for node in nodes.values()), (
                f"a SuperNode died with the server\n{logs()}"
            )
            assert completed_rounds(run_dir) == CRASH_ROUND - 1, "the crash came after round 2 was decided"
            assert not (run_dir / "summary.json").exists()
            run_key = Checkpoint.load(run_dir).run_key
            try:  # the operator's `flwr run --stream` loses its SuperLink and gives up by itself
                first_run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            crashed_run_id = run_id_of(first_out.read_text(errors="replace"))
            assert crashed_run_id is not None and str(crashed_run_id) == run_key

            # Every SuperNode notices that the SuperLink is gone (it keeps retrying, it does not exit).
            deadline = time.monotonic() + DOWN_S
            while not all(NOTICED in since(nodes[i], offsets[i]) for i in range(NUM_SITES)):
                assert time.monotonic() < deadline, f"a SuperNode never noticed the crash\n{logs()}"
                time.sleep(0.2)
            mark("sites noticed")

            # ---------------------------------------------------------- (a) restart the SuperLink
            links.append(start_superlink(link_port, env, cwd, tmp_path / "superlink-2.log", watch, database=database))
            mark("superlink restarted")
            deadline = time.monotonic() + RECONNECT_S
            while not all(RECONNECTED in since(nodes[i], offsets[i]) for i in range(NUM_SITES)):
                if time.monotonic() > deadline or any(node.proc.poll() is not None for node in nodes.values()):
                    break
                time.sleep(0.2)
            reconnected = {
                i: nodes[i].proc.poll() is None and RECONNECTED in since(nodes[i], offsets[i]) for i in range(NUM_SITES)
            }
            for i in [i for i, ok in reconnected.items() if not ok]:
                # Not back by itself: restart it with the same node config and state dir.
                replaced.append(nodes[i])
                nodes[i].stop()
                port = free_port()
                watch.add_marker(f"127.0.0.1:{port}")
                nodes[i] = start_supernode(
                    link_port,
                    port,
                    site_config(i, NUM_SITES, state[i], EPSILON),
                    env,
                    cwd,
                    tmp_path / f"site{i}-restarted.log",
                    watch,
                )
                node_ids[i] = node_id_of(nodes[i])
            mark("sites reconnected" if all(reconnected.values()) else "sites restarted")

            # The ClientApps that were in flight at the crash finish at their sites (the SuperNode
            # holds their replies); then each site has paid for round 2 or never saw it.
            deadline = time.monotonic() + CLIENTAPPS_S
            while any("flwr-clientapp" in command for command in watch.alive().values()):
                assert time.monotonic() < deadline, (
                    f"ClientApps still running {CLIENTAPPS_S:.0f} s after the crash\n{logs()}"
                )
                time.sleep(0.2)
            before = {i: ledger_of(state[i]) for i in range(NUM_SITES)}
            paid = [i for i in range(NUM_SITES) if [e["round"] for e in before[i]] == [1, CRASH_ROUND]]
            assert paid, before  # at least the site that triggered the crash
            for i in range(NUM_SITES):
                assert [e["round"] for e in before[i]] in ([1], [1, CRASH_ROUND]), (
                    i,
                    before[i],
                )
                assert {e["run_id"] for e in before[i]} == {run_key}, (i, before[i])
            stored = {i: (state[i] / "releases" / run_key / f"train-{CRASH_ROUND:04d}.json").read_bytes() for i in paid}

            # ---------------------------------------------------------- (b) resume the run
            resume_config = f'config-file="{run_dir / "config.yaml"}" tracking.resume=true'
            try:
                result = flwr(
                    [
                        "run",
                        str(app_dir()),
                        CONNECTION,
                        "--stream",
                        "--run-config",
                        resume_config,
                    ],
                    env,
                    cwd,
                    timeout=RUN_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"the resumed `flwr run` did not finish within {RUN_TIMEOUT_S:.0f} s\n{logs()}")
            output = result.stdout + result.stderr
            resumed_run_id = run_id_of(output)
            assert resumed_run_id is not None, (
                f"`flwr run` started no run (exit {result.returncode}):\n{tail(output)}\n{logs()}"
            )
            listing = flwr(["ls", CONNECTION, "--format", "json"], env, cwd).stdout
            status = parse_status(listing, resumed_run_id)
            assert status == "finished:completed", f"run {resumed_run_id}: {status}\n{tail(output)}\n{logs()}"
            crashed_status = parse_status(listing, crashed_run_id)  # "running" until the SuperLink times it out
            assert crashed_status != "finished:completed", crashed_status
            assert f"resumed run {run_key} after round {CRASH_ROUND - 1} of {ROUNDS}" in output, tail(output)
            mark("resumed run")

            # ---------------------------------------------------------- (c) what the resumed run left
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["reason"] is None, summary
            assert sorted(summary["sites"]) == [str(i) for i in range(NUM_SITES)], summary["sites"]
            assert summary["dropped_replies"] == [], summary["dropped_replies"]
            for i in range(NUM_SITES):
                site = summary["sites"][str(i)]
                assert site["node_id"] == node_ids[i], (
                    i,
                    site,
                )  # the SuperNode that answered the resumed run
                assert site["rounds_answered"] == ROUNDS and site["refusals"] == [] and site["failures"] == [], (
                    i,
                    site,
                )
                assert site["epsilon_spent"] <= EPSILON + 1e-6, (i, site)
                entries = ledger_of(state[i])
                # Three votes and the noised evaluation, once each, all under the crashed run's key.
                assert [e["round"] for e in entries] == [1, 2, 3, ROUNDS + 1], (
                    i,
                    entries,
                )
                assert {e["run_id"] for e in entries} == {run_key} != {str(resumed_run_id)}, (i, entries)
                assert entries[: len(before[i])] == before[i], (
                    i,
                    entries,
                )  # nothing paid before was charged again
            for i in paid:  # round 2 answered from the release the site stored before the crash
                assert (state[i] / "releases" / run_key / f"train-{CRASH_ROUND:04d}.json").read_bytes() == stored[i], i
            assert summary["epsilon_spent_max"] <= EPSILON + 1e-6
            assert [r["round"] for r in read_metrics(run_dir)] == list(range(1, ROUNDS + 1))
            assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
                f"round_{r:03d}" for r in range(1, ROUNDS + 1)
            ]
            assert len(list((run_dir / "synthetic").rglob("*.png"))) == summary["num_synthetic"] == 100
        finally:
            if first_run is not None and first_run.poll() is None:  # still our unreaped child: still this process
                first_run.kill()
                first_run.wait(timeout=10)
            stop_all([*nodes.values(), *replaced])  # SuperNodes in parallel, then the SuperLink(s)
            stop_all(links)
            leftovers = watch.wait_all_gone(EXIT_GRACE_S)
            watch.kill_leftovers()
            mark("stopped")
        seen = " ".join(watch.seen.values())

    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after they were stopped: {leftovers}"
    for binary in (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
    ):
        assert binary in seen, f"{binary} never seen: {sorted(set(watch.seen.values()))}"
    assert processes_naming(watch.markers) == []
    assert not [key for rec in killed if alive(key := rec.key)]
    print(
        f"deployment resume test: {time.monotonic() - started:.1f} s; phases (s since start): {phases}; "
        f"SuperNodes reconnected by themselves: {reconnected}; sites that had paid round {CRASH_ROUND} "
        f"before the resume: {paid}; crashed run {crashed_run_id}: {crashed_status}"
    )
