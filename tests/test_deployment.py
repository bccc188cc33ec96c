"""A real Flower deployment on loopback: one SuperLink, SuperNodes with their own terms, `flwr run`.

No simulation engine: `flower-superlink` without `--simulation` serves the Fleet API on its
HTTP port, and each `flower-supernode` is a site whose privacy terms come from its own node
config (partition, ``state-dir``, ``site-epsilon``; no ``trust-server``, so local mode only).
Every release a site makes is charged to its ledger: the vote of each round and the noised
evaluation after the last one (``privacy.evaluation=noised``, the default; the server plans
rounds + 1 releases at one noise multiplier).

Run 1: sites 0 and 1 (budget 1.0) answer all three releases and spend exactly 1.0; site 2's
budget (0.6) holds one release (0.548) but not two (0.801): it answers round 1 and refuses
round 2 and the evaluation. Then the whole federation is stopped and started again on new
ports with the same state dirs; run 2 finds site 0's budget spent (its ledger survived the
restart) and site 2's nearly so, while a fresh site with the same budget answers.

Run 3 is the attack of issue 8 ("a server can set a site's terms"): a run config of
{central mode, epsilon 50, delta 0.2, a new run_dir} against the same sites, plus a fresh site
with its whole budget left and a SuperNode whose node config sets data and state but no
``site-epsilon``. Every site refuses every request: the vote (clean votes to an untrusted
server: ERROR_NOT_ALLOWED; no terms: ERROR_SITE_TERMS) and the evaluation (the attacker's noise
costs 36.5 at the site's own delta 1e-5). Every ledger is byte-identical, nothing was created
under the attacker's run dir, and no error reason names a path.

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

from coautogen_fl import protocol as P
from coautogen_fl.config import load_config, save_config
from coautogen_fl.privacy import (
    PrivacyLedger,
    epsilon_for_noise,
    noise_multiplier_for_epsilon,
)
from simulations.launcher import app_dir, free_port, parse_status

from flower_processes import (
    BIN,
    FlowerProcess,
    ProcessWatch,
    alive,
    flower_env,
    node_id_of,
    processes_naming,
    run_id_of,
    site_config,
    start_superlink,
    start_supernode,
    tail,
    write_connection,
)

pytestmark = pytest.mark.flower

CONNECTION = "deploy"
EPSILON, DELTA, ROUNDS = 1.0, 1e-5, 2
SMALL_BUDGET = 0.6  # site 2's own budget: one release at the run's noise fits, two do not
NUM_SITES = 3
TINY = [
    "feedback.candidates_per_label=4",
    "feedback.volume_per_label=10",
    "downstream.epochs=1",
    "federation.num_hospitals=3",
    f"privacy.epsilon={EPSILON}",
    "federation.timeout_s=150",
]
# The attack of issue 8: what a server puts in the run config to get clean votes under a fresh budget.
ATTACK = {"privacy.mode": '"central"', "privacy.epsilon": "50.0", "privacy.delta": "0.2"}
LEDGER, KEY = "privacy_ledger.json", "site_secret.key"
# Each message starts a fresh `flwr-clientapp` process (~4 s of imports on an idle CPU): a run
# takes ~30-40 s on 2 idle cores, several times that on a loaded machine.
RUN_TIMEOUT_S = 240.0
EXIT_GRACE_S = 15.0
ABSOLUTE_PATH = re.compile(r"(?:^|[\s'\"(=:])(?:/|~/)[\w.-]+")


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
    nodes: dict[int | str, FlowerProcess] = field(default_factory=dict)  # site key (partition id) -> SuperNode
    node_ids: dict[int | str, int] = field(default_factory=dict)  # site key -> Flower node id
    stopped: list[tuple[int, int]] = field(default_factory=list)

    def start(self, sites: dict[int, tuple[Path, float]]) -> None:
        """Start the SuperLink, then one SuperNode per site: partition id -> (state dir, budget)."""
        self.watch.add_marker(f"127.0.0.1:{self.link_port}")
        write_connection(Path(self.env["FLWR_HOME"]), CONNECTION, f"127.0.0.1:{self.link_port}")
        self.superlink = start_superlink(
            self.link_port, self.env, self.cwd, self.root / f"{self.name}-superlink.log", self.watch
        )
        self.add_nodes(
            {pid: site_config(pid, NUM_SITES, state_dir, budget) for pid, (state_dir, budget) in sites.items()}
        )

    def add_nodes(self, configs: dict[int | str, str]) -> None:
        """Start one SuperNode per node config (key -> config) and wait until all registered."""
        assert self.superlink is not None
        for key, config in configs.items():
            port = free_port()
            self.watch.add_marker(f"127.0.0.1:{port}")
            log = self.root / f"{self.name}-site{key}.log"
            self.nodes[key] = start_supernode(self.link_port, port, config, self.env, self.cwd, log, self.watch)
        for key in configs:  # started together, registered in parallel
            self.node_ids[key] = node_id_of(self.nodes[key])

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink; each with its whole process tree, by PID."""
        for node in self.nodes.values():
            self.stopped += node.stop()
        if self.superlink is not None:
            self.stopped += self.superlink.stop()

    def logs(self) -> str:
        parts = [
            f"--- {p.name} ({p.log.name})\n{tail(p.output(), 40)}" for p in [self.superlink, *self.nodes.values()] if p
        ]
        return "\n".join(parts)


def write_run_config(root: Path, name: str, rounds: int, run_dir: Path | None = None) -> Path:
    run_dir = root / name if run_dir is None else run_dir
    cfg = load_config(overrides=[*TINY, f"feedback.rounds={rounds}", f"tracking.run_dir={run_dir}"])
    return save_config(cfg, root / f"{name}.yaml")


def flwr_run(federation: Federation, config_file: Path, extra: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`flwr run APP deploy --stream` with ``config-file`` and ``extra`` run-config keys
    (values in TOML syntax); returns (run id, final status, output)."""
    run_config = " ".join([f'config-file="{config_file}"', *(f"{k}={v}" for k, v in (extra or {}).items())])
    command = [str(BIN / "flwr"), "run", str(app_dir()), CONNECTION, "--stream", "--run-config", run_config]
    try:
        result = subprocess.run(
            command, env=federation.env, cwd=federation.cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"`flwr run` did not finish within {RUN_TIMEOUT_S:.0f} s:\n{tail(output)}\n{federation.logs()}")
    run_id = run_id_of(output)
    assert run_id is not None, (
        f"`flwr run` started no run (exit {result.returncode}):\n{tail(output)}\n{federation.logs()}"
    )
    listing = subprocess.run(
        [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=federation.env,
        cwd=federation.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return run_id, parse_status(listing.stdout, run_id), output


def ledger_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text())["entries"] if path.exists() else []


def releases_within(budget: float, sigma: float, releases: int, spent: tuple[float, ...] = ()) -> int:
    """How many of ``releases`` releases at noise ``sigma`` fit in ``budget`` after ``spent``
    (the ledger's rule, at the site's delta; a refused release charges nothing)."""
    fit = 0
    while fit < releases and epsilon_for_noise([*spent, *[sigma] * (fit + 1)], DELTA) <= budget * (1 + 1e-6):
        fit += 1
    return fit


def refusal(code: int, release: int, evaluation: bool = False) -> str:
    """One line of a site's ``refusals`` in summary.json: the release (its ledger round) and the
    protocol's generic line for the code."""
    return f"round {release}: {'evaluation: ' if evaluation else ''}{P.ERROR_REASONS[code]} (code {code})"


def budget_refusals(refused_rounds: list[int], evaluation_round: int | None) -> list[str]:
    """A site's ``refusals``: each refused vote round, then the evaluation (release ``evaluation_round``)."""
    lines = [refusal(P.ERROR_BUDGET_EXCEEDED, r) for r in refused_rounds]
    return lines + ([refusal(P.ERROR_BUDGET_EXCEEDED, evaluation_round, True)] if evaluation_round else [])


def site_key(answered: bool, pid: int, node_id: int) -> str:
    """A site's key in summary.json: its partition id once it answered, else its node id."""
    return str(pid) if answered else f"node-{node_id}"


def assert_no_paths(summary: dict, *paths: Path) -> None:
    """Error replies carry a code and a generic line only: no reason names a file or folder."""
    reasons = [d["reason"] for d in summary["dropped_replies"]]
    reasons += [r for site in summary["sites"].values() for r in site["refusals"]]
    for reason in reasons:
        assert not ABSOLUTE_PATH.search(reason), reason
        assert not any(str(p) in reason for p in (*paths, Path.home())), reason
        assert LEDGER not in reason and KEY not in reason, reason


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes); {} when it does not exist."""
    return (
        {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        if folder.exists()
        else {}
    )


def test_loopback_deployment_budgets_restart_and_attack(tmp_path):
    started = time.monotonic()
    flwr_home, cwd = tmp_path / "flwr-home", tmp_path / "cwd"
    cwd.mkdir()
    env = flower_env(flwr_home)
    state = {i: tmp_path / f"site{i}" for i in range(NUM_SITES)}
    budgets = {0: EPSILON, 1: EPSILON, 2: SMALL_BUDGET}
    releases = ROUNDS + 1  # the votes of each round, then the noised evaluation
    sigma = noise_multiplier_for_epsilon(EPSILON, DELTA, releases)
    site2_fit = releases_within(SMALL_BUDGET, sigma, releases)
    # One release at sigma costs 0.548, two 0.801: site 2 answers round 1 and refuses the rest.
    assert site2_fit == 1 and releases_within(EPSILON, sigma, releases) == releases

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
            assert summary["privacy_evaluation"] == "noised"
            assert abs(summary["noise_multiplier"] - sigma) < 1e-9
            for pid in (0, 1):  # all three releases: the whole budget
                site = summary["sites"][str(pid)]
                assert abs(site["epsilon_spent"] - EPSILON) < 1e-3 and site["epsilon_spent"] <= EPSILON * (1 + 1e-6)
                assert site["epsilon_budget"] == EPSILON
                assert site["rounds_answered"] == ROUNDS and site["refusals"] == []
            votes2 = min(site2_fit, ROUNDS)
            evaluated2 = site2_fit > ROUNDS
            # A site that refuses every release never tells the server its partition id or budget.
            key2 = site_key(site2_fit > 0, 2, first.node_ids[2])
            assert sorted(summary["sites"]) == sorted(["0", "1", key2])
            site2 = summary["sites"][key2]
            assert site2["rounds_answered"] == votes2
            assert abs(site2["epsilon_spent"] - epsilon_for_noise([sigma] * site2_fit, DELTA)) < 1e-9  # 0.548
            assert site2["epsilon_spent"] <= SMALL_BUDGET * (1 + 1e-6)
            assert site2["epsilon_budget"] == (SMALL_BUDGET if site2_fit else None)  # its own budget, as it reported it
            assert site2["refusals"] == budget_refusals(
                list(range(votes2 + 1, ROUNDS + 1)), None if evaluated2 else ROUNDS + 1
            )
            # Refused votes and a refused evaluation are dropped as refused, at the release they were asked for.
            assert [(d["round"], d["node"], d["refused"]) for d in summary["dropped_replies"]] == [
                *[(r, first.node_ids[2], True) for r in range(votes2 + 1, ROUNDS + 1)],
                *([] if evaluated2 else [(ROUNDS + 1, first.node_ids[2], True)]),
            ]
            assert summary["num_synthetic"] == 100 and summary["accuracy_federated"] is not None
            assert_no_paths(summary, tmp_path)
            # The server's spend lines measure each site against the budget it reported itself.
            line2 = (
                f"site {key2} (node {first.node_ids[2]}): answered, "
                f"epsilon {site2['epsilon_spent']:.3f} of {SMALL_BUDGET:g}, delta"
            )
            assert line2 in out1, tail(out1)

            # Each site's ledger holds exactly its accepted releases, the evaluation as round ROUNDS + 1.
            for pid in (0, 1):
                entries = ledger_entries(state[pid] / LEDGER)
                assert [(e["round"], e["run_id"]) for e in entries] == [(r, str(run1)) for r in range(1, releases + 1)]
                assert all(abs(e["noise_multiplier"] - sigma) < 1e-9 for e in entries)
            entries2 = ledger_entries(state[2] / LEDGER)
            assert [e["round"] for e in entries2] == list(range(1, site2_fit + 1))
            assert PrivacyLedger(state[2] / LEDGER, SMALL_BUDGET, DELTA).spent_epsilon() <= SMALL_BUDGET * (1 + 1e-6)
            before = {pid: ledger_entries(state[pid] / LEDGER) for pid in range(NUM_SITES)}

            # ------------------------------------------------------------ restart everything
            first.stop()
            assert first.stopped and not [key for key in first.stopped if alive(key)]
            for pid in range(NUM_SITES):  # the ledgers survive their SuperNodes
                ledger = PrivacyLedger(state[pid] / LEDGER, budgets[pid], DELTA)
                assert ledger.rounds_charged == len(before[pid])
                expected = epsilon_for_noise([sigma] * len(before[pid]), DELTA)
                assert abs(ledger.spent_epsilon() - expected) < 1e-9
            assert abs(PrivacyLedger(state[0] / LEDGER, EPSILON, DELTA).remaining_epsilon()) < 1e-3

            # ------------------------------------------------------------ run 2
            # Site 0 and site 2 come back with their old state dirs; site 1 is replaced by a
            # fresh site (new state dir, same budget): the control that answers. One round
            # (noise calibrated for epsilon 1 over one vote and the evaluation) keeps it short.
            fresh = tmp_path / "site1-fresh"
            second = Federation(tmp_path, watch, env, cwd, "fed2")
            federations.append(second)
            second.start({0: (state[0], EPSILON), 1: (fresh, EPSILON), 2: (state[2], SMALL_BUDGET)})
            # One site of three answers: below the default min_sites (more than half), so this run
            # says explicitly that one valid reply per round is enough for it.
            run2, status2, out2 = flwr_run(second, write_run_config(tmp_path, "run2", 1), {"federation.min_sites": "1"})
            assert status2 == "finished:completed", f"run {run2}: {status2}\n{tail(out2)}\n{second.logs()}"

            summary2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
            sigma2 = noise_multiplier_for_epsilon(EPSILON, DELTA, 2)
            assert abs(summary2["noise_multiplier"] - sigma2) < 1e-9
            spent0 = tuple(e["noise_multiplier"] for e in before[0])
            spent2 = tuple(e["noise_multiplier"] for e in before[2])
            assert releases_within(EPSILON, sigma2, 2) == 2  # what a fresh site with budget 1.0 can answer
            assert (
                releases_within(EPSILON, sigma2, 2, spent0) == 0
                and releases_within(SMALL_BUDGET, sigma2, 2, spent2) == 0
            )
            key0, key2 = (site_key(False, pid, second.node_ids[pid]) for pid in (0, 2))  # they never answer
            assert sorted(summary2["sites"]) == sorted(["1", key0, key2])
            assert summary2["sites"]["1"]["rounds_answered"] == 1 and summary2["sites"]["1"]["refusals"] == []
            assert abs(summary2["sites"]["1"]["epsilon_spent"] - EPSILON) < 1e-3
            for key in (key0, key2):  # both refuse round 1 and the evaluation: site 0's ledger survived the restart
                assert summary2["sites"][key]["rounds_answered"] == 0 and summary2["sites"][key]["epsilon_spent"] == 0.0
                assert summary2["sites"][key]["refusals"] == budget_refusals([1], 2)
            assert_no_paths(summary2, tmp_path)
            assert ledger_entries(state[0] / LEDGER) == before[0]  # nothing charged, nothing released
            assert ledger_entries(state[2] / LEDGER) == before[2]
            assert [(e["round"], e["run_id"]) for e in ledger_entries(fresh / LEDGER)] == [
                (1, str(run2)),
                (2, str(run2)),
            ]

            # ------------------------------------------------------------ run 3: the attack (issue 8)
            # Two more SuperNodes join the same federation: a fresh site with its whole budget
            # (it would have something to spend) and one with data and state but no site-epsilon.
            untouched, no_terms = tmp_path / "site-untouched", tmp_path / "site-no-terms"
            second.add_nodes(
                {
                    "untouched": site_config(1, NUM_SITES, untouched, EPSILON),
                    "no-terms": site_config(2, NUM_SITES, no_terms, None),
                }
            )
            sites3 = {0: state[0], 1: fresh, 2: state[2], "untouched": untouched, "no-terms": no_terms}
            ledgers_before = {key: snapshot(folder) for key, folder in sites3.items()}
            attacker = tmp_path / "attacker" / "run"
            assert not attacker.parent.exists()
            # The file only makes the run tiny; the attack's four keys come as run-config keys.
            base = write_run_config(tmp_path, "run3-base", 1, run_dir=tmp_path / "run3-unused")
            run3, status3, out3 = flwr_run(second, base, {**ATTACK, "tracking.run_dir": f'"{attacker}"'})
            # No site answers: the run stops after round 1 as failed (issue 9: never "completed"
            # without private signal), and no evaluation is asked.
            assert status3 == "finished:failed", f"run {run3}: {status3}\n{tail(out3)}\n{second.logs()}"

            summary3 = json.loads((attacker / "summary.json").read_text())  # the server took the attacker's config
            assert summary3["status"] == "failed" and "valid votes from 0 of 5 sites" in summary3["reason"]
            assert (summary3["privacy_mode"], summary3["epsilon"], summary3["delta"]) == ("central", 50.0, 0.2)
            sigma3 = noise_multiplier_for_epsilon(50.0, 0.2, 2)
            assert abs(summary3["noise_multiplier"] - sigma3) < 1e-9
            # At a site's own delta the attacker's noise costs far more than any budget here.
            assert epsilon_for_noise([sigma3], DELTA) > 30 * EPSILON
            nodes3 = {key: second.node_ids[key] for key in sites3}

            def expected_refusals(key: str) -> list[str]:
                # A site with terms refuses clean votes to a server it does not trust (ERROR_NOT_ALLOWED);
                # the site without terms refuses with ERROR_SITE_TERMS.
                return [refusal(P.ERROR_SITE_TERMS if key == "no-terms" else P.ERROR_NOT_ALLOWED, 1)]

            expected_drops = sorted(
                (int(line.split(":")[0].split()[1]), node, True, line.split(": ", 1)[1])
                for key, node in nodes3.items()
                for line in expected_refusals(key)
            )
            drops = sorted((d["round"], d["node"], d["refused"], d["reason"]) for d in summary3["dropped_replies"])
            assert drops == expected_drops, drops
            # No site answered anything, so none is known by partition id, and none was charged.
            assert sorted(summary3["sites"]) == sorted(f"node-{node}" for node in nodes3.values())
            for key, node in nodes3.items():
                site = summary3["sites"][f"node-{node}"]
                assert (
                    site["rounds_answered"] == 0 and site["epsilon_spent"] == 0.0 and site["epsilon_budget"] is None
                ), (key, site)
                assert site["refusals"] == expected_refusals(key), (key, site)
            assert summary3["epsilon_spent_max"] == 0.0 and summary3["accuracy_federated"] is None
            assert_no_paths(summary3, tmp_path, attacker)
            # Nor does the server print the attacker's epsilon as any site's budget.
            spend3 = re.findall(r"site (node-\d+) \(node \d+\): refused, epsilon ([\d.]+) of ([^,]+), delta", out3)
            assert sorted(name for name, _, _ in spend3) == sorted(summary3["sites"]), tail(out3)
            assert all(float(spent) == 0.0 and not budget.startswith("50") for _, spent, budget in spend3), spend3
            # Every ledger is byte-identical (or still absent); the site without terms made nothing.
            for key, folder in sites3.items():
                after = snapshot(folder)
                assert after.get(LEDGER) == ledgers_before[key].get(LEDGER), key
                assert (key == "untouched") or after.get(KEY) == ledgers_before[key].get(KEY), key
            assert not (untouched / LEDGER).exists() and (untouched / KEY).exists()  # its own key, in its own state dir
            assert snapshot(no_terms) == {}
            # Nothing of any site's state under the attacker's run dir (a simulated site's default).
            created = [p.relative_to(attacker) for p in attacker.rglob("*")]
            assert not [p for p in created if p.name.startswith((LEDGER, KEY, f".{KEY}")) or "sites" in p.parts], (
                created
            )
            assert not (tmp_path / "run3-unused").exists()
            # The details stay in the sites' own logs.
            assert "trust-server" in second.nodes[0].output() and "site-epsilon" in second.nodes["no-terms"].output()
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
