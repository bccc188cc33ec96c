"""``privacy.mode=secagg`` in a real loopback deployment: one SuperLink, three SuperNodes, `flwr run`.

Each SuperNode sets its own terms, and ``secagg-trust-sites=2``: it counts on two sites' noise in
any sum, the run's threshold for three sites (ceil(0.6 x 3) = 2). A vote round is SecAgg+'s four
stages between separate processes (every message starts a ``flwr-clientapp``; SecAgg+'s keys and
shares live in the node's Context state between them). The run completes; every site's ledger
holds the discrete-Gaussian ("ddg") charge of the round plus the noised evaluation, within its
budget; the server's summary names every site as answering every round.

Every process the test starts is stopped by PID in ``finally``; none naming the test's tmp
folder or ports may remain.
"""

from __future__ import annotations

import json

import pytest

from coautogen_fl.config import load_config, save_config
from simulations.launcher import app_dir, free_port, parse_status

from flower_processes import (
    FlowerProcess,
    ProcessWatch,
    flower_env,
    flwr,
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
NUM_SITES, ROUNDS, EPSILON = 3, 1, 1.0  # one round: each SecAgg+ stage starts a ClientApp process per site
TINY = [
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=1",
    f"federation.num_hospitals={NUM_SITES}",
    f"privacy.epsilon={EPSILON}",
    "federation.timeout_s=150",
    f"feedback.rounds={ROUNDS}",
    "privacy.mode=secagg",
]
RUN_TIMEOUT_S = 400.0
EXIT_GRACE_S = 15.0


def test_secagg_run_in_a_loopback_deployment(tmp_path):
    flwr_home, cwd = tmp_path / "flwr-home", tmp_path / "cwd"
    cwd.mkdir()
    env = flower_env(flwr_home)
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    write_connection(flwr_home, CONNECTION, address)
    state = {i: tmp_path / f"site{i}" for i in range(NUM_SITES)}
    run_dir = tmp_path / "run"
    run_config = save_config(load_config(overrides=[*TINY, f"tracking.run_dir={run_dir}"]), tmp_path / "run.yaml")
    links: list[FlowerProcess] = []
    nodes: dict[int, FlowerProcess] = {}

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{tail(p.output(), 30)}" for p in [*links, *nodes.values()])

    with ProcessWatch([str(tmp_path), address]) as watch:
        try:
            links.append(start_superlink(link_port, env, cwd, tmp_path / "superlink.log", watch))
            for i in range(NUM_SITES):
                port = free_port()
                watch.add_marker(f"127.0.0.1:{port}")
                config = f"{site_config(i, NUM_SITES, state[i], EPSILON)} secagg-trust-sites=2"
                nodes[i] = start_supernode(link_port, port, config, env, cwd, tmp_path / f"site{i}.log", watch)
            node_ids = {i: node_id_of(nodes[i]) for i in range(NUM_SITES)}

            result = flwr(
                ["run", str(app_dir()), CONNECTION, "--stream", "--run-config", f'config-file="{run_config}"'],
                env,
                cwd,
                timeout=RUN_TIMEOUT_S,
            )
            output = result.stdout + result.stderr
            run_id = run_id_of(output)
            assert run_id is not None, f"`flwr run` started no run:\n{tail(output)}\n{logs()}"
            status = parse_status(flwr(["ls", CONNECTION, "--format", "json"], env, cwd).stdout, run_id)
            assert status == "finished:completed", f"run {run_id}: {status}\n{tail(output)}\n{logs()}"

            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["privacy_mode"] == "secagg", summary
            assert summary["dropped_replies"] == [], summary["dropped_replies"]
            for i in range(NUM_SITES):
                site = summary["sites"][str(i)]
                assert site["node_id"] == node_ids[i] and site["rounds_answered"] == ROUNDS, site
                entries = ledger_of(state[i])
                assert [(e["round"], e.get("kind", "gaussian")) for e in entries] == [(1, "ddg"), (2, "gaussian")]
                assert site["epsilon_spent"] <= EPSILON * (1 + 1e-6), site
            assert summary["accuracy_real_test"] is not None
        finally:
            stop_all(list(nodes.values()))
            stop_all(links)
            leftovers = watch.wait_all_gone(EXIT_GRACE_S)
            watch.kill_leftovers()
        seen = " ".join(watch.seen.values())

    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after they were stopped: {leftovers}"
    assert "flwr-clientapp" in seen and "flwr-serverapp" in seen
    assert processes_naming(watch.markers) == []
