"""Lose one site of three mid-round in a loopback deployment: the run still finishes (issue 9).

One ``flower-superlink --insecure --database FILE`` and three ``flower-supernode`` sites with
their own terms (``partition-id``, ``state-dir``, ``site-epsilon=1.0``) start a tiny Feedback run
of 2 rounds with ``flwr run``. As soon as round 1 is in flight (the server has asked the sites,
or a ClientApp runs under the victim SuperNode) and before the victim has paid for round 1, that
SuperNode and everything below it (its SuperExec, its ``flwr-clientapp`` processes) are SIGKILLed
at once: the site's machine dies. It stays dead.

In flwr 1.41 a SuperNode sends a heartbeat every 30 s (``HEARTBEAT_DEFAULT_INTERVAL``) and the
SuperLink marks it offline once ``HEARTBEAT_PATIENCE`` (2) intervals pass without one; from then
on the SuperLink answers the messages addressed to it with an error reply of its own
(``ErrorCode.NODE_UNAVAILABLE`` = 5), so the grid gets the lost node's "reply" some 30-60 s after
the kill (observed: round 1 decided ~45 s after it), before ``federation.timeout_s`` (90 s here)
would give up on it. Later rounds no longer sample it (``grid.get_node_ids()`` lists online
nodes only).

That error reply's ``src_node_id`` is the SuperLink's own id (``SUPERLINK_NODE_ID`` = 1), not the
lost node's: only ``metadata.reply_to_message_id`` ties it to the request. The strategy maps it back
to the node the request went to (``CoAutoGenStrategy.sender``), so the lost site is named once, as
failed with Flower's "node lost" line, and no site of the SuperLink's id appears.

The two remaining sites (2 of 3 >= the default ``federation.min_sites``: more than half of the
sites asked) answer both rounds; ``flwr ls`` shows the run ``finished:completed``, and
``summary.json`` names the killed site as failed (its node id, no round answered, at least one
failure: the error reply or "no reply") and the two others as answering every round.

Every process the test starts is stopped by PID in ``finally`` blocks; afterwards no process
naming the test's tmp folder or ports may remain.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

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
NUM_SITES, ROUNDS, EPSILON = 3, 2, 1.0
TIMEOUT_S = 90  # federation.timeout_s: above the SuperLink's 60 s heartbeat patience
TINY = [
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=1",
    f"federation.num_hospitals={NUM_SITES}",
    f"privacy.epsilon={EPSILON}",
    f"federation.timeout_s={TIMEOUT_S}",
    f"feedback.rounds={ROUNDS}",
]
VICTIM = 2  # partition id of the site whose machine dies
LOST_ROUND = 1  # the round in flight when it dies
RUN_TIMEOUT_S = 400.0
EXIT_GRACE_S = 15.0
CLIENTAPP_WAIT_S = 5.0
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the sender of the SuperLink's own error replies


# ---------------------------------------------------------------------------------- helpers
def clientapps_under(node: FlowerProcess) -> list[str]:
    root = processes.record(node.pid)
    if root is None:
        return []
    return [rec.command for rec in processes.descendants(root) if "flwr-clientapp" in rec.command]


# ---------------------------------------------------------------------------------- the test
def test_site_killed_mid_round_the_run_finishes_with_the_others(tmp_path):
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
    run: subprocess.Popen | None = None
    run_out = tmp_path / "flwr-run.out"
    killed: list[processes.ProcessRecord] = []
    trigger = ""
    decided_after_s: float | None = None

    def logs() -> str:
        parts = [f"--- {p.name} ({p.log.name})\n{tail(p.output(), 30)}" for p in [*links, *nodes.values()]]
        if run_out.exists():
            parts.append(f"--- flwr run\n{tail(run_out.read_text(errors='replace'), 40)}")
        return "\n".join(parts)

    with ProcessWatch([str(tmp_path), address]) as watch:
        try:
            # ---------------------------------------------------------- the deployment and the run
            links.append(start_superlink(link_port, env, cwd, tmp_path / "superlink.log", watch, database=database))
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

            with open(run_out, "w") as out:
                run = subprocess.Popen(
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
            watch.add_root(run.pid)

            # ---------------------------------------------------------- wait for round 1 in flight
            # The server has asked the sites; best, the victim's ClientApp for the request is running
            # (it is killed with the SuperNode); if none shows within CLIENTAPP_WAIT_S, kill anyway.
            deadline = time.monotonic() + RUN_TIMEOUT_S
            asked_at: float | None = None
            while True:
                output = run_out.read_text(errors="replace")
                if clientapps_under(nodes[VICTIM]) and (asked_at or f"round {LOST_ROUND}/{ROUNDS}:" in output):
                    trigger = "a ClientApp ran under the victim SuperNode"
                    break
                if asked_at is None and f"round {LOST_ROUND}/{ROUNDS}:" in output:
                    asked_at = time.monotonic()
                if asked_at is not None and time.monotonic() > asked_at + CLIENTAPP_WAIT_S:
                    trigger = f"the server had logged round {LOST_ROUND}/{ROUNDS} {CLIENTAPP_WAIT_S:.0f} s before"
                    break
                assert run.poll() is None, f"the run ended before round {LOST_ROUND}:\n{tail(output)}\n{logs()}"
                assert time.monotonic() < deadline, f"round {LOST_ROUND} never started:\n{tail(output)}\n{logs()}"
                time.sleep(0.02)

            # ---------------------------------------------------------- the site's machine dies
            watch.scan()
            killed = kill_tree(nodes[VICTIM])
            killed_at = time.monotonic()
            nodes[VICTIM].stop()  # already dead: closes its log
            mark("site killed")
            commands = " ".join(rec.command for rec in killed)
            assert "flower-supernode" in commands, commands
            gone_by = time.monotonic() + 10
            while any(processes.is_alive(rec) for rec in killed) and time.monotonic() < gone_by:
                time.sleep(0.1)
            assert not [rec.describe() for rec in killed if processes.is_alive(rec)]
            assert ledger_of(state[VICTIM]) == [], (
                f"the victim had already paid for round {LOST_ROUND}: {ledger_of(state[VICTIM])}"
            )
            assert not (run_dir / "summary.json").exists()

            # ---------------------------------------------------------- the run goes on without it
            while run.poll() is None:
                if decided_after_s is None and read_metrics(run_dir):
                    decided_after_s = round(time.monotonic() - killed_at, 1)
                assert time.monotonic() < killed_at + RUN_TIMEOUT_S, (
                    f"`flwr run` did not finish within {RUN_TIMEOUT_S:.0f} s of the kill\n{logs()}"
                )
                time.sleep(0.2)
            mark("run finished")
            output = run_out.read_text(errors="replace")
            run_id = run_id_of(output)
            assert run_id is not None, f"`flwr run` started no run (exit {run.returncode}):\n{tail(output)}\n{logs()}"
            listing = flwr(["ls", CONNECTION, "--format", "json"], env, cwd).stdout
            status = parse_status(listing, run_id)
            assert status == "finished:completed", f"run {run_id}: {status}\n{tail(output)}\n{logs()}"

            # ---------------------------------------------------------- what the run left
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["reason"] is None, summary
            sites = summary["sites"]
            lost_key = str(VICTIM) if str(VICTIM) in sites else f"node-{node_ids[VICTIM]}"
            # The SuperLink's NODE_UNAVAILABLE reply (sent from its own id) is filed under the lost node.
            phantom = {k: v for k, v in sites.items() if v["node_id"] == SUPERLINK_NODE_ID}
            assert phantom == {}, phantom
            assert sorted(sites) == sorted([str(i) for i in range(NUM_SITES) if i != VICTIM] + [lost_key]), sites
            lost = sites[lost_key]
            assert lost["node_id"] == node_ids[VICTIM], lost
            assert lost["rounds_answered"] == 0, lost  # it never answered, round 1 nor round 2
            assert lost["status"] == "failed" or lost["failures"], lost
            assert lost["failures"] and lost["failures"][0].startswith(f"round {LOST_ROUND}: "), lost
            assert lost["failures"] == [
                f"round {LOST_ROUND}: failed: the node was lost (Flower: node unavailable) (code 5)"
            ], lost
            lost_drops = [d for d in summary["dropped_replies"] if d["node"] == node_ids[VICTIM]]
            assert [d["round"] for d in lost_drops][:1] == [LOST_ROUND], summary["dropped_replies"]
            assert [d["node"] for d in summary["dropped_replies"]] == [node_ids[VICTIM]], summary["dropped_replies"]
            for i in range(NUM_SITES):
                if i == VICTIM:
                    continue
                site = sites[str(i)]
                assert site["node_id"] == node_ids[i], (i, site)
                assert site["status"] == "answered", (i, site)
                assert site["rounds_answered"] == ROUNDS and site["refusals"] == [] and site["failures"] == [], (
                    i,
                    site,
                )
                assert site["epsilon_spent"] <= EPSILON + 1e-6, (i, site)
                rounds_paid = [e["round"] for e in ledger_of(state[i])]
                assert set(range(1, ROUNDS + 1)) <= set(rounds_paid), (i, rounds_paid)
            assert ledger_of(state[VICTIM]) == []  # it stayed dead: it never paid for anything
            metrics = read_metrics(run_dir)
            assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1)), metrics
            for r in metrics:  # every round decided on the two live sites' valid votes
                assert r["votes_received"] == NUM_SITES - 1, r
            assert summary["num_hospitals"] == NUM_SITES - 1, summary
            mark("checked")
        finally:
            if run is not None and run.poll() is None:  # still our unreaped child: still this process
                run.kill()
                run.wait(timeout=10)
            stop_all(list(nodes.values()))  # SuperNodes in parallel, then the SuperLink
            stop_all(links)
            leftovers = watch.wait_all_gone(EXIT_GRACE_S)
            watch.kill_leftovers()
            mark("stopped")
        seen = " ".join(watch.seen.values())

    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after they were stopped: {leftovers}"
    for binary in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"):
        assert binary in seen, f"{binary} never seen: {sorted(set(watch.seen.values()))}"
    assert processes_naming(watch.markers) == []
    assert not [key for rec in killed if alive(key := rec.key)]
    killed_names = [
        next((w.rsplit("/", 1)[-1] for w in rec.command.split() if "/flwr" in w or "/flower" in w), rec.command[:40])
        for rec in killed
    ]
    print(
        f"deployment site-lost test: {time.monotonic() - started:.1f} s; phases (s since start): {phases}; "
        f"killed when {trigger}: {killed_names}; "
        f"round {LOST_ROUND} decided {decided_after_s} s after the kill; lost site {lost_key}: "
        f"{lost['failures']}; "
        f"dropped replies: {summary['dropped_replies']}"
    )
