"""A real Flower deployment on loopback: one SuperLink, three SuperNodes, `flwr run` twice.

No simulation engine: `flower-superlink` without `--simulation` serves the Fleet API on its
HTTP port, and each `flower-supernode` is a site with its own node config (partition, state
dir, own epsilon budget). Site 2's budget (0.5) is below what the run asks for (1.0 over 2
rounds): its ledger refuses every release that would exceed it. Then the whole federation is
stopped and started again on new ports with the same state dirs; a second run finds site 0's
budget spent (its ledger survived the restart) while a fresh site with the same budget answers.

Every process the test starts (SuperLink, SuperNodes, their SuperExecs, ServerApp and
ClientApp processes) is recorded while it runs and stopped by PID, also when the test fails;
afterwards no process naming the test's tmp folder or ports may remain.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coautogen_fl.config import load_config, save_config
from coautogen_fl.privacy import PrivacyLedger, epsilon_for_noise, noise_multiplier_for_epsilon
from flower_processes import (
    BIN,
    FlowerProcess,
    ProcessWatch,
    alive,
    flower_env,
    node_id_of,
    processes_naming,
    start_superlink,
    start_supernode,
    tail,
    write_connection,
)
from simulations.launcher import app_dir, free_port, parse_status

pytestmark = pytest.mark.flower

CONNECTION = "deploy"
EPSILON, DELTA, ROUNDS = 1.0, 1e-5, 2
SMALL_BUDGET = 0.5  # site 2's own budget, below the run's epsilon
NUM_SITES = 3
TINY = ["feedback.candidates_per_label=4", "feedback.volume_per_label=10", "downstream.epochs=1",
        "federation.num_hospitals=3", f"privacy.epsilon={EPSILON}", "federation.timeout_s=150"]
# Each message starts a fresh `flwr-clientapp` process (~4 s of imports on an idle CPU): a run
# takes ~30-40 s on 2 idle cores, several times that on a loaded machine.
RUN_TIMEOUT_S = 240.0
EXIT_GRACE_S = 15.0


@dataclass
class Federation:
    """One SuperLink and its SuperNodes on loopback, all recorded by ``watch``."""

    root: Path
    watch: ProcessWatch
    env: dict
    cwd: Path
    name: str
    link_port: int = field(default_factory=free_port)
    superlink: FlowerProcess | None = None
    nodes: dict[int, FlowerProcess] = field(default_factory=dict)  # partition id -> SuperNode
    node_ids: dict[int, int] = field(default_factory=dict)  # partition id -> Flower node id
    stopped: list[tuple[int, int]] = field(default_factory=list)

    def start(self, sites: dict[int, tuple[Path, float]]) -> None:
        """Start the SuperLink, then one SuperNode per site: partition id -> (state dir, budget)."""
        self.watch.add_marker(f"127.0.0.1:{self.link_port}")
        write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, f"127.0.0.1:{self.link_port}")
        self.superlink = start_superlink(self.link_port, self.env, self.cwd, self.root / f"{self.name}-superlink.log", self.watch)
        for pid, (state_dir, budget) in sites.items():
            port = free_port()
            self.watch.add_marker(f"127.0.0.1:{port}")
            config = f'partition-id={pid} num-partitions={NUM_SITES} state-dir="{state_dir}" site-epsilon={budget}'
            log = self.root / f"{self.name}-site{pid}.log"
            self.nodes[pid] = start_supernode(self.link_port, port, config, self.env, self.cwd, log, self.watch)
        for pid, node in self.nodes.items():  # started together, registered in parallel
            self.node_ids[pid] = node_id_of(node)

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink; each with its whole process tree, by PID."""
        for node in self.nodes.values():
            self.stopped += node.stop()
        if self.superlink is not None:
            self.stopped += self.superlink.stop()

    def logs(self) -> str:
        parts = [f"--- {p.name} ({p.log.name})\n{tail(p.output(), 40)}" for p in [self.superlink, *self.nodes.values()] if p]
        return "\n".join(parts)


def write_run_config(root: Path, name: str, rounds: int) -> Path:
    cfg = load_config(overrides=[*TINY, f"feedback.rounds={rounds}", f"tracking.run_dir={root / name}"])
    return save_config(cfg, root / f"{name}.yaml")


def flwr_run(federation: Federation, config_file: Path) -> tuple[int, str, str]:
    """`flwr run APP deploy --stream`; returns (run id, final status, output)."""
    command = [str(BIN / "flwr"), "run", str(app_dir()), CONNECTION, "--stream",
               "--run-config", f'config-file="{config_file}"']
    try:
        result = subprocess.run(command, env=federation.env, cwd=federation.cwd, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT_S)
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"`flwr run` did not finish within {RUN_TIMEOUT_S:.0f} s:\n{tail(output)}\n{federation.logs()}")
    match = re.search(r"run (?:ID|id)[:\s]+(\d+)|Successfully started run (\d+)", output)
    assert match, f"`flwr run` started no run (exit {result.returncode}):\n{tail(output)}\n{federation.logs()}"
    run_id = int(match.group(1) or match.group(2))
    listing = subprocess.run([str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                             env=federation.env, cwd=federation.cwd, capture_output=True, text=True, timeout=60)
    return run_id, parse_status(listing.stdout, run_id), output


def ledger_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["entries"] if path.exists() else []


def rounds_within(budget: float, sigma: float, rounds: int = ROUNDS, spent: tuple[float, ...] = ()) -> int:
    """How many of ``rounds`` releases at noise ``sigma`` fit in ``budget`` after ``spent`` (the ledger's rule)."""
    fit = 0
    while fit < rounds and epsilon_for_noise([*spent, *[sigma] * (fit + 1)], DELTA) <= budget * (1 + 1e-6):
        fit += 1
    return fit


def assert_refused(site: dict, rounds: list[int]) -> None:
    assert len(site["refusals"]) == len(rounds), site
    for r, reason in zip(rounds, site["refusals"]):
        assert reason.startswith(f"round {r}:") and "budget" in reason, reason


def test_loopback_deployment_budgets_and_restart(tmp_path):
    started = time.monotonic()
    flwr_home, cwd = tmp_path / "flwr-home", tmp_path / "cwd"
    cwd.mkdir()
    env = flower_env(flwr_home)
    state = {i: tmp_path / f"site{i}" for i in range(NUM_SITES)}
    budgets = {0: EPSILON, 1: EPSILON, 2: SMALL_BUDGET}
    sigma = noise_multiplier_for_epsilon(EPSILON, DELTA, ROUNDS)
    site2_fit = rounds_within(SMALL_BUDGET, sigma)  # 0 here: one round alone costs 0.684

    federations: list[Federation] = []
    with ProcessWatch([str(tmp_path)]) as watch:
        try:
            # ------------------------------------------------------------ run 1
            first = Federation(tmp_path, watch, env, cwd, "fed1")
            federations.append(first)
            first.start({i: (state[i], budgets[i]) for i in range(NUM_SITES)})
            run1, status1, out1 = flwr_run(first, write_run_config(tmp_path, "run1", ROUNDS))
            assert status1 == "finished:completed", f"run {run1}: {status1}\n{tail(out1)}\n{first.logs()}"

            summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
            assert abs(summary["noise_multiplier"] - sigma) < 1e-9
            for pid in (0, 1):
                site = summary["sites"][str(pid)]
                assert abs(site["epsilon_spent"] - EPSILON) < 1e-3 and site["epsilon_spent"] <= EPSILON * (1 + 1e-6)
                assert site["rounds_answered"] == ROUNDS and site["refusals"] == []
            # A site that refuses round 1 never tells the server its partition id: keyed by node.
            key2 = "2"  # named by its (un-noised, uncharged) evaluation reply even when it refused every vote
            assert sorted(summary["sites"]) == sorted(["0", "1", key2])
            site2 = summary["sites"][key2]
            assert site2["rounds_answered"] == site2_fit and site2["epsilon_spent"] <= SMALL_BUDGET * (1 + 1e-6)
            assert_refused(site2, list(range(site2_fit + 1, ROUNDS + 1)))
            assert [(d["round"], d["node"], d["refused"]) for d in summary["dropped_replies"]] == [
                (r, first.node_ids[2], True) for r in range(site2_fit + 1, ROUNDS + 1)
            ]
            assert summary["num_synthetic"] == 100 and summary["accuracy_federated"] is not None

            # Each site's ledger holds exactly its accepted releases.
            for pid in (0, 1):
                entries = ledger_entries(state[pid] / "privacy_ledger.json")
                assert [(e["round"], e["run_id"]) for e in entries] == [(1, str(run1)), (2, str(run1))]
                assert all(abs(e["noise_multiplier"] - sigma) < 1e-9 for e in entries)
            entries2 = ledger_entries(state[2] / "privacy_ledger.json")
            assert [e["round"] for e in entries2] == list(range(1, site2_fit + 1))
            assert PrivacyLedger(state[2] / "privacy_ledger.json", SMALL_BUDGET, DELTA).spent_epsilon() <= SMALL_BUDGET * (1 + 1e-6)
            before = {pid: ledger_entries(state[pid] / "privacy_ledger.json") for pid in range(NUM_SITES)}

            # ------------------------------------------------------------ restart everything
            first.stop()
            assert first.stopped and not [key for key in first.stopped if alive(key)]
            for pid in range(NUM_SITES):  # the ledgers survive their SuperNodes
                ledger = PrivacyLedger(state[pid] / "privacy_ledger.json", budgets[pid], DELTA)
                assert ledger.rounds_charged == len(before[pid])
                expected = epsilon_for_noise([sigma] * len(before[pid]), DELTA)
                assert abs(ledger.spent_epsilon() - expected) < 1e-9
            assert abs(PrivacyLedger(state[0] / "privacy_ledger.json", EPSILON, DELTA).remaining_epsilon()) < 1e-3

            # ------------------------------------------------------------ run 2
            # Site 0 and site 2 come back with their old state dirs; site 1 is replaced by a
            # fresh site (new state dir, same budget): the control that answers. One round
            # (noise calibrated for epsilon 1 in one release) keeps the test short.
            fresh = tmp_path / "site1-fresh"
            second = Federation(tmp_path, watch, env, cwd, "fed2")
            federations.append(second)
            second.start({0: (state[0], EPSILON), 1: (fresh, EPSILON), 2: (state[2], SMALL_BUDGET)})
            run2, status2, out2 = flwr_run(second, write_run_config(tmp_path, "run2", 1))
            assert status2 == "finished:completed", f"run {run2}: {status2}\n{tail(out2)}\n{second.logs()}"

            summary2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
            sigma2 = noise_multiplier_for_epsilon(EPSILON, DELTA, 1)
            assert abs(summary2["noise_multiplier"] - sigma2) < 1e-9
            spent0 = tuple(e["noise_multiplier"] for e in before[0])
            spent2 = tuple(e["noise_multiplier"] for e in before[2])
            assert rounds_within(EPSILON, sigma2, 1) == 1  # what a fresh site with budget 1.0 can answer
            assert rounds_within(EPSILON, sigma2, 1, spent0) == 0 and rounds_within(SMALL_BUDGET, sigma2, 1, spent2) == 0
            key0, key2 = "0", "2"  # named by their evaluation replies
            assert sorted(summary2["sites"]) == sorted(["1", key0, key2])
            assert summary2["sites"]["1"]["rounds_answered"] == 1 and summary2["sites"]["1"]["refusals"] == []
            assert abs(summary2["sites"]["1"]["epsilon_spent"] - EPSILON) < 1e-3
            for key in (key0, key2):  # both refuse round 1: site 0's ledger survived the restart
                assert summary2["sites"][key]["rounds_answered"] == 0
                assert_refused(summary2["sites"][key], [1])
            assert ledger_entries(state[0] / "privacy_ledger.json") == before[0]  # nothing charged, nothing released
            assert ledger_entries(state[2] / "privacy_ledger.json") == before[2]
            assert [(e["round"], e["run_id"]) for e in ledger_entries(fresh / "privacy_ledger.json")] == [(1, str(run2))]
        finally:
            for federation in reversed(federations):
                federation.stop()
            leftovers = watch.wait_all_gone(EXIT_GRACE_S)
            watch.kill_leftovers()
        seen = " ".join(watch.seen.values())

    assert not leftovers, f"processes still running {EXIT_GRACE_S:.0f} s after they were stopped: {leftovers}"
    # The watch saw the whole deployment tree, and none of it is left.
    for binary in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"):
        assert binary in seen, f"{binary} never seen: {sorted(set(watch.seen.values()))}"
    assert processes_naming(watch.markers) == []
    print(f"deployment test: {time.monotonic() - started:.1f} s")
