"""The wire check of issue 8: a Flower client mod (clients/wire_log.py) records every reply the
sites send during whole simulated runs, in local and in central mode, and every field is checked
against the declaration in coautogen_fl/protocol/fields.py: a release the site's ledger charged, or a
public value that the test recomputes from public inputs alone (node config, the request, the
noise multipliers charged). Anything undeclared fails the check.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
from flwr.app import ArrayRecord, MessageType
from flwr.clientapp import ClientApp

from clients import client_app
from clients.secagg import make_secagg_mod, secure_vote_fields
from clients.wire_log import make_wire_log_mod
from coautogen_fl import protocol as P
from coautogen_fl.privacy import PrivacyLedger, epsilon_for_noise, epsilon_for_releases
from strategies.server_app import build_strategy

from strategy_helpers import (
    SecureGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)


class WireGrid(SecureGrid):
    """Delivers each Message (a copy) through a ClientApp carrying the wire-log mod, the SecAgg+
    mod and the real handlers."""

    def __init__(self, cfg, tmp_path, log_path) -> None:
        super().__init__(cfg, tmp_path, **{"secagg-trust-sites": 3})
        self.app = ClientApp(mods=[make_wire_log_mod(str(log_path)), make_secagg_mod(client_app.error_reply)])
        self.app.train()(client_app.train)
        self.app.evaluate()(client_app.evaluate)


def wire_problems(entries: list[dict], noise_multiplier: float, secagg: bool = False) -> tuple[list[str], Counter]:
    """Every field of every logged reply that is not declared, or whose public value is not the
    one public inputs give; and the number of charged releases per site. With ``secagg`` the
    spend (an RDP composition of the sites' discrete-Gaussian charges) is left to the caller."""
    problems, charged, sigmas = [], Counter(), defaultdict(list)
    for i, entry in enumerate(entries):
        node = entry["node_config"]
        site = node["partition-id"]
        if "error" in entry:
            code, reason = entry["error"]["code"], entry["error"]["reason"]
            if P.ERROR_REASONS.get(code) != reason:
                problems.append(f"reply {i}: error reason {reason!r} is not the generic line of code {code}")
            continue
        kind = secure_vote_fields(entry["configs"]) if entry["message_type"] == MessageType.TRAIN else "evaluate"
        kind = P.vote_reply_kind(entry["arrays"]) if kind == "train" else kind
        fields = {(rec, key) for rec, values in entry["arrays"].items() for key in values}
        fields |= {(rec, key) for rec, values in entry["metrics"].items() for key in values}
        fields |= {(rec, key) for rec, values in entry["configs"].items() for key in values}
        declared = {(f.record, f.key): f for f in P.SITE_REPLY_FIELDS[kind]}
        problems += [f"reply {i} ({kind}): undeclared field {f}" for f in sorted(fields - set(declared))]
        problems += [f"reply {i} ({kind}): declared field {f} missing" for f in sorted(set(declared) - fields)]
        if any(declared[f].release == P.Release.CHARGED for f in fields & set(declared)):
            charged[site] += 1
            sigmas[site].append(noise_multiplier)
        if kind.startswith("secagg"):  # its spend (an RDP composition) is checked against the ledger
            continue
        metrics = entry["metrics"].get(P.METRICS, {})
        public = {  # what each public field must be, from public inputs alone
            P.PARTITION_ID: int(site),
            P.EPSILON_BUDGET: float(node["site-epsilon"]),
            P.NOISE_MULTIPLIER: noise_multiplier,
            P.EPSILON_SPENT: epsilon_for_noise(sigmas[site], float(node["site-delta"])) if sigmas[site] else 0.0,
        }
        label = entry["configs"].get(P.SITE, {}).get(P.SITE_LABEL)
        if label is not None and label != node.get("site-name", ""):
            problems.append(f"reply {i}: public site-label {label!r} is not the node config's site-name")
        for key, value in metrics.items():
            field = declared.get((P.METRICS, key))
            if (
                field is not None
                and not (secagg and key == P.EPSILON_SPENT)
                and field.release == P.Release.PUBLIC
                and value != pytest.approx(public[key], rel=1e-9)
            ):
                problems.append(f"reply {i}: public {key}={value} is not {public[key]} (public inputs)")
    return problems, charged


@pytest.mark.parametrize("mode", ["local", "central", "active"])
def test_every_field_of_a_whole_run_is_charged_or_public(tmp_path, monkeypatch, mode):
    """``active``: -f Active in local mode, whose second round releases class errors with the votes."""
    monkeypatch.setattr(client_app, "_SITES", {})
    log_path = tmp_path / "wire.jsonl"
    active = ("feedback.framework=Active", "feedback.active_epochs=1") if mode == "active" else ()
    cfg = small_config(f"privacy.mode={'local' if mode == 'active' else mode}", *active)
    s = build_strategy(cfg, tmp_path / "run")
    grid = WireGrid(cfg, tmp_path, log_path)
    s.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)

    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    types = Counter(e["message_type"] for e in entries)
    assert types == {MessageType.TRAIN: 3 * cfg.feedback.rounds, MessageType.EVALUATE: 3}  # every reply recorded
    assert not any("error" in e for e in entries)
    problems, charged = wire_problems(entries, s.noise_multiplier)
    assert problems == []
    errors = [e for e in entries if P.CLASS_ERRORS in e["arrays"].get(P.VOTES, {})]
    assert len(errors) == (3 if mode == "active" else 0)  # round 2 of 2, every site
    # Each charged release is exactly one ledger entry: two vote rounds and the noised evaluation.
    for i in range(3):
        ledger = PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        assert charged[str(i)] == len(ledger.entries) == cfg.feedback.rounds + 1
        assert [e.round for e in ledger.entries] == [1, 2, 3]
    if mode != "central":  # noised at the site, on the public grid
        votes = [v for e in entries if "votes" in e["arrays"] for v in e["arrays"]["votes"]["votes"]["values"]]
        assert all(v * 16 == round(v * 16) for v in votes) and any(v != round(v) for v in votes)


def test_every_field_of_a_secagg_run_is_charged_or_public(tmp_path, monkeypatch):
    """In secagg mode a vote round is SecAgg+'s four stages: keys, encrypted shares and the
    masked vector go out, never a vote in the clear; the masked vector is the charged release."""
    monkeypatch.setattr(client_app, "_SITES", {})
    log_path = tmp_path / "wire.jsonl"
    cfg = small_config("privacy.mode=secagg")
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=WireGrid(cfg, tmp_path, log_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)

    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    kinds = Counter(
        secure_vote_fields(e["configs"]) if e["message_type"] == MessageType.TRAIN else "evaluate" for e in entries
    )
    rounds = cfg.feedback.rounds
    assert kinds == {
        "secagg-setup": 3 * rounds,
        "secagg-share-keys": 3 * rounds,
        "secagg-collect": 3 * rounds,
        "secagg-unmask": 3 * rounds,
        "evaluate": 3,
    }
    problems, charged = wire_problems(entries, s.noise_multiplier, secagg=True)
    assert problems == []
    for i in range(3):
        ledger = PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        assert charged[str(i)] == len(ledger.entries) == rounds + 1
        evaluated = [
            e["metrics"][P.METRICS][P.EPSILON_SPENT]
            for e in entries
            if e["node_config"]["partition-id"] == str(i) and "metrics" in e and P.METRICS in e["metrics"]
        ]
        assert evaluated == [pytest.approx(ledger.spent_epsilon())]
        collected = [
            e
            for e in entries
            if e["node_config"]["partition-id"] == str(i) and secure_vote_fields(e["configs"]) == "secagg-collect"
        ]
        spent = [e["configs"][P.FITRES_METRICS][P.EPSILON_SPENT] for e in collected]
        assert spent == [
            pytest.approx(epsilon_for_releases([x.release for x in ledger.entries[: r + 1]], cfg.privacy.delta))
            for r in range(rounds)
        ]
        assert all(e["configs"][P.FITRES_METRICS][P.NOISE_MULTIPLIER] == s.noise_multiplier for e in collected)
    assert not any(P.VOTES in e["arrays"] for e in entries)  # no vote ever travels in the clear


def test_every_field_of_a_secagg_mix_run_is_charged_or_public(tmp_path, monkeypatch):
    """-tt mix with privacy.mode=secagg: the vote rounds and the DP-SGD rounds are all SecAgg+
    rounds; no vote, weight or gradient ever travels in the clear, and every charge is one ledger entry."""
    monkeypatch.setattr(client_app, "_SITES", {})
    log_path = tmp_path / "wire.jsonl"
    cfg = small_config(
        "privacy.mode=secagg", "feedback.task_type=mix", "downstream.dp_rounds=1", "downstream.dp_local_steps=2"
    )
    s = build_strategy(cfg, tmp_path / "run")
    grid = WireGrid(cfg, tmp_path, log_path)
    s.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=s.total_rounds, timeout=10)

    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    kinds = Counter(
        secure_vote_fields(e["configs"]) if e["message_type"] == MessageType.TRAIN else "evaluate" for e in entries
    )
    secure_rounds = cfg.feedback.rounds + 2  # the votes, then dp_rounds x dp_local_steps DP-SGD sums
    stages = ("secagg-setup", "secagg-share-keys", "secagg-collect", "secagg-unmask")
    assert kinds == {**{stage: 3 * secure_rounds for stage in stages}, "evaluate": 3}
    problems, charged = wire_problems(entries, s.noise_multiplier, secagg=True)
    assert problems == []
    for i in range(3):
        ledger = PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        assert charged[str(i)] == len(ledger.entries) == secure_rounds + 1
        assert [e.kind for e in ledger.entries] == ["ddg"] * secure_rounds + ["gaussian"]
        assert cfg.privacy.epsilon * 0.99 <= ledger.spent_epsilon() <= cfg.privacy.epsilon
    assert not any({P.VOTES, P.WEIGHTS, P.GRADIENTS} & set(e["arrays"]) for e in entries)
    assert [h["updates_received"] for h in s.training.history] == [3, 3]


def test_the_wire_check_flags_what_the_old_replies_carried(tmp_path):
    """The check has teeth: a reply with the site's size (what sites used to send) or a
    detailed error reason fails it."""
    node = {"partition-id": "0", "site-epsilon": "1.0", "site-delta": "1e-05"}
    old = {
        "node_config": node,
        "message_type": MessageType.TRAIN,
        "configs": {P.SITE: {P.SITE_LABEL: ""}},
        "arrays": {P.VOTES: {P.VOTES: {"values": [1.0]}}},
        "metrics": {
            P.METRICS: {
                P.EPSILON_SPENT: 0.5,
                P.EPSILON_BUDGET: 1.0,
                P.PARTITION_ID: 0,
                P.NOISE_MULTIPLIER: 2.0,
                "num-examples": 101,
            }
        },
    }
    detailed = {
        "node_config": node,
        "message_type": MessageType.TRAIN,
        "error": {"code": P.ERROR_NO_DATA, "reason": "cannot read image /data/site0/3/x.png"},
    }
    problems, _ = wire_problems([old, detailed], noise_multiplier=2.0)
    assert any("undeclared field ('metrics', 'num-examples')" in p for p in problems)
    assert any("error reason" in p for p in problems)
    assert any("public epsilon-spent" in p for p in problems)  # 0.5 is not what sigma 2 costs


def test_wire_log_mod_is_installed_from_the_environment(monkeypatch, tmp_path):
    from clients.wire_log import WIRE_LOG_ENV, wire_log_mods

    monkeypatch.delenv(WIRE_LOG_ENV, raising=False)
    assert wire_log_mods() == []
    monkeypatch.setenv(WIRE_LOG_ENV, str(tmp_path / "w.jsonl"))
    assert len(wire_log_mods()) == 1
