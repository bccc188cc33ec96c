"""Issue 8, findings 3-5 and 7, each as the attack that used to work:

- a malicious run config {central, epsilon 50, delta 0.2, a new run_dir} cannot set a deployed
  site's terms (budget, delta, trust, ledger place);
- the evaluation oracle (constant-predictor "models" asking for exact per-class test counts)
  meets noised, charged releases and runs out of budget;
- the central-mode noise cannot be regenerated from the configured seed;
- error replies carry a code and a generic line, no paths or sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from clients.terms import SITE_DEFAULT_DELTA, SiteTerms, SiteTermsError
from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.config import flatten, load_config, to_dict
from coautogen_fl.downstream import build_classifier, state_dict_to_numpy
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from strategies.server_app import build_strategy

from strategy_helpers import FakeGrid, integer_votes, small_config, train_messages, vote_reply

SMALL = [
    "feedback.rounds=2",
    "feedback.candidates_per_label=3",
    "feedback.volume_per_label=5",
    "federation.num_hospitals=3",
]
ATTACK = ["privacy.mode=central", "privacy.epsilon=50", "privacy.delta=0.2"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 9)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def run_config(*overrides: str) -> dict:
    return {**flatten(to_dict(load_config(overrides=[*SMALL, *overrides]))), "config-file": ""}


def deployed_site(tmp_path: Path, run_overrides=(), **node) -> Context:
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "state-dir": str(tmp_path / "site"),
        "site-epsilon": 1.0,
        **node,
    }
    return Context(
        run_id=9, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config(*run_overrides)
    )


def request_from(strategy, tmp_path) -> Message:
    """The strategy's own round-1 TRAIN message, addressed to node 5."""
    return train_messages(strategy, 1, FakeGrid([5]))[0]


# ------------------------------------------------------------------ finding 4: the site's terms
def test_a_malicious_run_config_cannot_set_a_deployed_sites_terms(tmp_path):
    attacker_dir = tmp_path / "attacker"
    overrides = [*ATTACK, f"tracking.run_dir={attacker_dir}"]
    context = deployed_site(tmp_path, overrides)
    terms = SiteTerms.from_node_config(context.node_config, load_config(overrides=overrides), 9, 0)
    assert (terms.epsilon_budget, terms.delta, terms.trusts_server, terms.allow_clear_evaluation) == (
        1.0,
        SITE_DEFAULT_DELTA,
        False,
        False,
    )
    assert terms.state_dir == tmp_path / "site" and not terms.operator_run

    server = build_strategy(small_config(*overrides), tmp_path / "server")
    central = client_app.train(request_from(server, tmp_path), context)
    assert central.has_error() and central.error.code == P.ERROR_NOT_ALLOWED  # no clean votes to an untrusted server
    # The same server asking for local votes at its epsilon-50 noise: far past the site's budget.
    local = build_strategy(small_config("privacy.epsilon=50", "privacy.delta=0.2"), tmp_path / "server2")
    refused = client_app.train(request_from(local, tmp_path), context)
    assert refused.has_error() and refused.error.code == P.ERROR_BUDGET_EXCEEDED
    ledger = tmp_path / "site" / "privacy_ledger.json"
    assert not ledger.exists()  # nothing charged, nothing released
    assert not any(p.name in ("privacy_ledger.json", "site_secret.key") for p in attacker_dir.rglob("*"))


def test_a_deployed_site_without_a_budget_refuses_naming_site_epsilon(tmp_path):
    context = Context(
        run_id=9,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "s")},
        state=RecordDict(),
        run_config=run_config(),
    )
    with pytest.raises(SiteTermsError, match="site-epsilon"):
        SiteTerms.from_node_config(context.node_config, load_config(), 9, 0)
    reply = client_app.train(request_from(build_strategy(small_config(), tmp_path / "srv"), tmp_path), context)
    assert reply.has_error() and reply.error.code == P.ERROR_SITE_TERMS
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_SITE_TERMS] and "site-epsilon" in reply.error.reason
    assert not (tmp_path / "s").exists()  # refused before touching anything


def test_a_deployed_sites_ledger_has_a_fixed_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for run_id, run_dir in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        cfg = load_config(overrides=[f"tracking.run_dir={run_dir}"])
        terms = SiteTerms.from_node_config({"data-path": "/x", "site-epsilon": 2}, cfg, run_id, 0)
        assert terms.state_dir == tmp_path / "home" / ".local" / "state" / "coautogen-fl" / "site"


def test_in_a_simulation_the_run_config_stands_in(tmp_path):
    cfg = load_config(overrides=[*ATTACK, f"tracking.run_dir={tmp_path}", "privacy.evaluation=clear"])
    terms = SiteTerms.from_node_config({"partition-id": 1, "num-partitions": 3}, cfg, 9, 1)
    assert terms.operator_run and (terms.epsilon_budget, terms.delta, terms.trusts_server) == (50.0, 0.2, True)
    assert terms.allow_clear_evaluation and terms.state_dir == tmp_path / "sites" / "site-1"


@pytest.mark.parametrize(
    "node, fragment",
    [
        ({"site-epsilom": 1.0}, "unknown node config key(s) site-epsilom"),
        ({"site-epsilon": -1}, "site-epsilon=-1.0 must be > 0"),
        ({"site-epsilon": 1, "trust-server": "maybe"}, "trust-server='maybe' is not a boolean"),
    ],
)
def test_node_config_mistakes_are_named(node, fragment):
    with pytest.raises(SiteTermsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        SiteTerms.from_node_config({"partition-id": 0, **node}, load_config(), 1, 0)


# ------------------------------------------------------------------ finding 5: the evaluation oracle
def constant_predictor(label: int, num_classes: int = 10) -> dict:
    """A "model" that predicts ``label`` for every image: its accuracy is the count of that class."""
    model = build_classifier("cnn", num_classes, 1, 28)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias[label] = 1.0
    return state_dict_to_numpy(model)


def ask(context, label: int, sigma: float, server_round: int) -> Message:
    request = P.EvaluationRequest(server_round, "cnn", 10, 1, 28, sigma, constant_predictor(label))
    message = Message(content=to_content(request.to_parts()), dst_node_id=5, message_type=MessageType.EVALUATE)
    return client_app.evaluate(message, context)


@pytest.mark.parametrize("rounds", ["fixed", "counting up"])
def test_the_evaluation_oracle_meets_noised_charged_releases(tmp_path, rounds):
    """Ten constant-predictor "models" to read off the per-class test counts: the first one
    gets a noised, charged release; asking the same release round again about another model
    is refused outright, and a server counting rounds up runs the site out of budget."""
    context = deployed_site(tmp_path)
    sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 3)  # what the server plans: 2 rounds + 1 evaluation
    answered, codes = [], []
    for label in range(10):
        reply = ask(context, label, sigma, 3 if rounds == "fixed" else 3 + label)
        if reply.has_error():
            codes.append(reply.error.code)
        else:
            answered.append(P.EvaluationReply.from_parts(from_content(reply.content)))
    site = client_app.get_site(context)
    if rounds == "fixed":
        assert len(answered) == 1 and codes == [P.ERROR_NOT_ALLOWED] * 9  # one release per round of a run
    else:
        assert len(answered) == 3 and codes == [P.ERROR_BUDGET_EXCEEDED] * 7  # the budget ends the queries
    assert len(site.ledger.entries) == len(answered)
    exact = np.bincount(site.data.test.labels, minlength=10)[: len(answered)]
    got = np.array([r.correct for r in answered])
    assert all(r.accuracy is None for r in answered)
    assert not np.array_equal(got, exact) and np.all(np.abs(got - exact) < 8 * sigma * np.sqrt(2))
    # A clear request is not an uncharged way around it.
    reply = ask(context, 0, 0.0, 20)
    assert reply.has_error() and reply.error.code == P.ERROR_NOT_ALLOWED


# ------------------------------------------------------------------ finding 3: seeded central noise
def test_central_noise_cannot_be_regenerated_from_the_seed(tmp_path):
    s = build_strategy(small_config("privacy.mode=central", "generator.seed=123"), tmp_path)
    messages = train_messages(s, 1)
    clean = sum(integer_votes(m.metadata.dst_node_id) for m in messages)
    noised = s.noise_aggregate(clean)
    # The old attack: regenerate the server's noise from the seed in config.yaml and subtract.
    for guess in (np.random.default_rng(123 + 7919), np.random.default_rng(123)):
        recovered = noised - guess.normal(0.0, s.noise_multiplier * s.sensitivity, clean.shape)
        assert np.abs(recovered - clean).max() > 1.0
    assert not np.array_equal(noised, s.noise_aggregate(clean))  # fresh noise every time
    again = build_strategy(small_config("privacy.mode=central", "generator.seed=123"), tmp_path / "again")
    assert not np.array_equal(noised, again.noise_aggregate(clean))


# ------------------------------------------------------------------ finding 6: the site unit
def test_site_unit_is_calibrated_for_replacement(tmp_path):
    s = build_strategy(small_config("privacy.unit=site"), tmp_path)
    assert s.sensitivity == pytest.approx(np.sqrt(2))
    messages = train_messages(s, 1)
    _, metrics = s.aggregate_train(1, [vote_reply(m, integer_votes(i) / 100) for i, m in enumerate(messages)])
    assert metrics["aggregate_noise_std"] == pytest.approx(np.sqrt(3) * s.noise_multiplier * np.sqrt(2))


def test_sites_with_only_a_data_path_are_never_one_site(tmp_path):
    """Two deployed sites with a data-path and no partition-id answer with partition id -1: the
    server names them by node id and never folds one into the other."""
    from strategy_helpers import integer_votes, train_messages, vote_reply

    s = build_strategy(small_config("federation.min_sites=1"), tmp_path)
    messages = train_messages(s, 1)
    s.aggregate_train(1, [vote_reply(m, integer_votes(i), 0.3, partition_id=-1) for i, m in enumerate(messages)])
    assert sorted(s.sites) == sorted(m.metadata.dst_node_id for m in messages)
    assert all(site.rounds_answered == 1 and site.name.startswith("node-") for site in s.sites.values())


def test_a_site_named_in_its_node_config_is_named_so_in_the_summary(tmp_path):
    """A deployed site with a data-path and no partition id is named by its node config's
    site-name (public, declared), or by its node id."""
    from strategies.server_app import run_summary

    context = deployed_site(tmp_path, **{"site-name": "st-marys"})
    s = build_strategy(small_config("federation.min_sites=1"), tmp_path / "srv")
    reply = client_app.train(request_from(s, tmp_path), context)
    assert reply.content.config_records[P.SITE][P.SITE_LABEL] == "st-marys"
    s.aggregate_train(1, [reply])
    summary = run_summary(s.cfg, s, tmp_path, 1.0)
    assert list(summary["sites"]) == ["st-marys"]
    assert summary["sites"]["st-marys"]["site_name"] == "st-marys" and summary["sites"]["st-marys"]["node_id"] == 5
