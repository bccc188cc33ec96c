"""Message-level tests of CoAutoGenStrategy, without any Flower process.

The strategy is built from a small config with ``build_strategy``; a fake Grid stands in for
Flower's. Replies are built the way a ClientApp builds them (``Message(..., reply_to=msg)``),
so their ``src_node_id`` is the node the request was addressed to.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from coautogen_fl import protocol as P
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from coautogen_fl.store import read_index
from coautogen_fl.tracking import read_metrics
from strategies.server_app import build_strategy, run_summary
from strategies.strategy import RoundFailed

from strategy_helpers import (
    DIM,
    NODES,
    NUM_CLASSES,
    POOL,
    FakeGrid,
    by_node,
    integer_votes,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name; `strategy` is in conftest.py)
    train_messages,
    vote_reply,
)


# ---------------------------------------------------------------------------------- configure_train
def test_configure_train_sends_the_pool_to_every_node(strategy):
    messages = train_messages(strategy, 1)
    assert [m.metadata.dst_node_id for m in messages] == NODES
    expected_sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 2 + 1)  # 2 rounds + the noised evaluation
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN
        assert m.metadata.src_node_id == SUPERLINK_NODE_ID
        candidates = m.content.array_records[P.CANDIDATES]
        embeddings = candidates[P.EMBEDDINGS].numpy()
        labels = candidates[P.LABELS].numpy()
        assert embeddings.dtype == np.float16 and embeddings.shape == (POOL, DIM)
        assert np.all(np.isfinite(embeddings))
        assert labels.dtype == np.int64 and labels.shape == (POOL,)
        np.testing.assert_array_equal(np.bincount(labels, minlength=NUM_CLASSES), [3] * NUM_CLASSES)
        config = m.content.config_records[P.CONFIG]
        assert config["round"] == 1
        assert config["rater"] == "PE" and config["k"] == 5  # the schema default
        assert config["privacy-mode"] == "local" and config["privacy-unit"] == "image"
        assert "delta" not in config  # a site measures its spend at its own delta
        assert config[P.NOISE_MULTIPLIER] == pytest.approx(expected_sigma, rel=1e-12)
    assert strategy.noise_multiplier == pytest.approx(expected_sigma, rel=1e-12)
    # Every site votes on the same pool, embedded once.
    first = messages[0].content.array_records[P.CANDIDATES][P.EMBEDDINGS].numpy()
    for m in messages[1:]:
        np.testing.assert_array_equal(m.content.array_records[P.CANDIDATES][P.EMBEDDINGS].numpy(), first)
    assert len(strategy.evolution.pool) == POOL


def test_noise_multiplier_follows_epsilon_and_rounds(tmp_path):
    s = build_strategy(small_config("privacy.epsilon=4", "feedback.rounds=3"), tmp_path)
    config = train_messages(s, 1)[0].content.config_records[P.CONFIG]
    assert config[P.NOISE_MULTIPLIER] == pytest.approx(noise_multiplier_for_epsilon(4.0, 1e-5, 3 + 1), rel=1e-12)
    clear = build_strategy(
        small_config("privacy.epsilon=4", "feedback.rounds=3", "privacy.evaluation=clear"), tmp_path / "clear"
    )
    assert clear.noise_multiplier == pytest.approx(noise_multiplier_for_epsilon(4.0, 1e-5, 3), rel=1e-12)


def test_fraction_train_samples_nodes_without_mangling_64bit_ids(tmp_path):
    s = build_strategy(small_config("federation.fraction_train=0.5"), tmp_path)
    nodes = [2**64 - 1, 2**63 + 5, 7, 123456789012345678]
    messages = train_messages(s, 1, FakeGrid(nodes))
    sent = [m.metadata.dst_node_id for m in messages]
    assert len(sent) == 2 and set(sent) <= set(nodes)


# ---------------------------------------------------------------------------------- aggregate_train
def test_valid_replies_are_summed_and_the_round_is_stored(strategy, tmp_path):
    messages = by_node(train_messages(strategy, 1))
    votes = {node: integer_votes(node) for node in NODES}
    replies = [
        vote_reply(messages[node], votes[node], epsilon_spent=0.1 * i, partition_id=i) for i, node in enumerate(NODES)
    ]
    assert [r.metadata.src_node_id for r in replies] == NODES  # reply_to sets the sender
    voted_ids = [c.candidate_id for c in strategy.evolution.pool]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is None  # not the last round
    assert metrics["replies"] == 3 and metrics["votes_received"] == 3 and metrics["dropped"] == 0
    assert metrics["votes_total"] == pytest.approx(180.0)
    assert strategy.dropped == []
    expected = sum(votes.values())
    index = read_index(tmp_path / "rounds" / "round_001")
    assert [e["id"] for e in index] == voted_ids
    np.testing.assert_allclose([e["votes"] for e in index], expected)
    for entry in index:
        assert (tmp_path / "rounds" / "round_001" / entry["file"]).is_file()
    # The next pool is bred from the voted one.
    assert len(strategy.evolution.pool) == POOL
    assert all(c.round == 1 for c in strategy.evolution.pool)
    # distribution mode (default): the votes refit the generator's distribution, the next
    # pool is drawn fresh from it; candidates mode keeps parent links (tested in test_evolution)
    assert not strategy.evolution.generator.distribution.is_prior
    assert set(voted_ids).isdisjoint(c.candidate_id for c in strategy.evolution.pool)
    # What the server knows of each site comes from its own metrics.
    assert {n: (s.partition_id, s.rounds_answered) for n, s in strategy.sites.items()} == {
        11: (0, 1),
        12: (1, 1),
        13: (2, 1),
    }
    assert strategy.sites[13].epsilon_spent == pytest.approx(0.2)
    logged = read_metrics(tmp_path)
    assert len(logged) == 1 and logged[0]["round"] == 1 and logged[0]["votes_received"] == 3
    assert logged[0]["epsilon_spent_max"] == pytest.approx(0.2)


def test_local_noise_within_the_bound_is_accepted(strategy):
    """A noised reply of an honest site (std = noise multiplier) passes validation."""
    messages = by_node(train_messages(strategy, 1))
    rng = np.random.default_rng(0)
    noisy = integer_votes(1) + rng.normal(0.0, strategy.noise_multiplier, POOL)
    total, valid = strategy.collect_votes(1, [vote_reply(messages[11], noisy)])
    assert valid == 1 and strategy.dropped == []
    np.testing.assert_allclose(total, noisy)


MALFORMED = {
    # node: (how the reply is broken, a fragment of the recorded reason)
    12: ("wrong shape", "shape"),
    13: ("nan", "NaN"),
    14: ("inf", "NaN or infinite"),
    15: ("absurd magnitude", "more than any site may cast"),
    16: ("missing votes record", "lacks"),
    17: ("missing metrics record", "lacks"),
    18: ("missing votes array", "lacks 'votes'"),
    19: ("missing epsilon-budget", "epsilon-budget"),
    20: ("negative epsilon-spent", "epsilon-spent"),
}


def malformed_reply(msg: Message, kind: str) -> Message:
    good = integer_votes(3)
    metrics = MetricRecord({P.EPSILON_SPENT: 0.3, P.EPSILON_BUDGET: 1.0, P.PARTITION_ID: 5, P.NOISE_MULTIPLIER: 1.0})
    if kind == "wrong shape":
        return vote_reply(msg, good[:-1])
    if kind == "nan":
        bad = good.copy()
        bad[4] = np.nan
        return vote_reply(msg, bad)
    if kind == "inf":
        bad = good.copy()
        bad[0] = np.inf
        return vote_reply(msg, bad)
    if kind == "absurd magnitude":
        return vote_reply(msg, np.full(POOL, 1e9))
    if kind == "missing votes record":
        return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)
    if kind == "missing metrics record":
        return Message(content=RecordDict({P.VOTES: ArrayRecord({P.VOTES: Array(good)})}), reply_to=msg)
    if kind == "missing votes array":
        content = RecordDict({P.VOTES: ArrayRecord({"scores": Array(good)}), P.METRICS: metrics})
        return Message(content=content, reply_to=msg)
    if kind == "missing epsilon-budget":
        content = RecordDict(
            {P.VOTES: ArrayRecord({P.VOTES: Array(good)}), P.METRICS: MetricRecord({P.EPSILON_SPENT: 0.3})}
        )
        return Message(content=content, reply_to=msg)
    if kind == "negative epsilon-spent":
        return vote_reply(msg, good, epsilon_spent=-0.1)
    raise AssertionError(kind)


def test_malformed_replies_are_dropped_with_a_reason(tmp_path):
    strategy = build_strategy(small_config("federation.min_sites=1"), tmp_path)  # one valid reply is enough here
    nodes = [11, *MALFORMED]
    messages = by_node(train_messages(strategy, 1, FakeGrid(nodes)))
    good = integer_votes(11)
    replies = [vote_reply(messages[11], good, partition_id=0)]
    replies += [malformed_reply(messages[node], kind) for node, (kind, _) in MALFORMED.items()]

    arrays, metrics = strategy.aggregate_train(1, replies)  # must not raise

    assert arrays is None
    assert metrics["replies"] == len(nodes) and metrics["votes_received"] == 1
    assert metrics["dropped"] == len(MALFORMED)
    dropped = {d["node"]: d for d in strategy.dropped}
    assert set(dropped) == set(MALFORMED)
    for node, (kind, fragment) in MALFORMED.items():
        assert dropped[node]["round"] == 1 and dropped[node]["refused"] is False, kind
        assert fragment in dropped[node]["reason"], (kind, dropped[node]["reason"])
    # Only the valid reply was summed; dropped sites are not counted as answering.
    np.testing.assert_allclose([e["votes"] for e in read_index(tmp_path / "rounds" / "round_001")], good)
    assert {n for n, site in strategy.sites.items() if site.rounds_answered} == {11}
    assert all(strategy.sites[n].status == "failed" for n in MALFORMED)


@pytest.mark.parametrize("valid", [0, 1])
def test_a_round_without_enough_valid_votes_stops_the_run(strategy, tmp_path, valid):
    """Issue 9: fewer valid vote replies than federation.min_sites (default: more than half of
    the sites asked) stops the run with a one-line reason; no round without private signal is
    stored or evolved from, and no site is asked again."""
    messages = by_node(train_messages(strategy, 1))
    replies = [
        vote_reply(messages[n], integer_votes(n)) if i < valid else malformed_reply(messages[n], "nan")
        for i, n in enumerate(NODES)
    ]
    with pytest.raises(
        RoundFailed, match=rf"round 1: valid votes from {valid} of 3 sites, fewer than the 2 the run needs"
    ):
        strategy.aggregate_train(1, replies)
    assert not (tmp_path / "rounds").exists() and read_metrics(tmp_path) == []
    summary = run_summary(strategy.cfg, strategy, tmp_path, 1.0, failure="round 1: ...")
    assert summary["status"] == "failed" and summary["num_hospitals"] == valid and summary["num_hospitals_planned"] == 3
    assert sorted(site["status"] for site in summary["sites"].values()) == sorted(
        ["answered"] * valid + ["failed"] * (3 - valid)
    )


def test_a_site_that_sends_nothing_is_named_in_the_summary(tmp_path):
    """A site killed mid-round sends no reply: it is a failure of that site, by node id."""
    s = build_strategy(small_config("federation.min_sites=2"), tmp_path)
    messages = by_node(train_messages(s, 1))
    s.aggregate_train(
        1, [vote_reply(messages[11], integer_votes(1), 0.5, 0), vote_reply(messages[12], integer_votes(2), 0.5, 1)]
    )
    summary = run_summary(s.cfg, s, tmp_path, 1.0)
    lost = summary["sites"]["node-13"]
    assert lost["status"] == "failed" and lost["node_id"] == 13 and lost["partition_id"] is None
    assert lost["failures"] == ["round 1: no reply (the node was lost, stopped or timed out)"]
    assert summary["dropped_replies"] == [
        {
            "round": 1,
            "node": 13,
            "site": "node-13",
            "refused": False,
            "reason": "no reply (the node was lost, stopped or timed out)",
        }
    ]
    assert summary["num_hospitals"] == 2 and summary["sites"]["0"]["status"] == "answered"


def test_budget_refusal_is_recorded_in_the_site_record(tmp_path):
    s = build_strategy(small_config("feedback.rounds=3", "federation.min_sites=1"), tmp_path)
    messages = by_node(train_messages(s, 1))
    s.aggregate_train(1, [vote_reply(messages[n], integer_votes(n), 0.4, i) for i, n in enumerate(NODES)])

    messages = by_node(train_messages(s, 2))
    refusal = Message(
        Error(code=P.ERROR_BUDGET_EXCEEDED, reason=P.ERROR_REASONS[P.ERROR_BUDGET_EXCEEDED]), reply_to=messages[12]
    )
    bad_request = Message(
        Error(code=P.ERROR_BAD_REQUEST, reason="a site may send anything here"), reply_to=messages[13]
    )
    refused = f"{P.ERROR_REASONS[P.ERROR_BUDGET_EXCEEDED]} (code {P.ERROR_BUDGET_EXCEEDED})"
    assert refusal.metadata.src_node_id == 12 and refusal.has_error()
    replies = [vote_reply(messages[11], integer_votes(1), 0.8, 0), refusal, bad_request]

    _, metrics = s.aggregate_train(2, replies)  # must not raise

    assert metrics["votes_received"] == 1 and metrics["dropped"] == 2
    dropped = {d["node"]: d for d in s.dropped}
    assert dropped[12] == {"round": 2, "node": 12, "site": "1", "refused": True, "reason": refused}
    # The server records the protocol's line for the code, never the text a site sent.
    assert dropped[13]["refused"] is False and dropped[13]["reason"].startswith(P.ERROR_REASONS[P.ERROR_BAD_REQUEST])
    assert s.sites[12].refusals == [f"round 2: {refused}"]
    assert s.sites[12].rounds_answered == 1 and s.sites[12].epsilon_spent == pytest.approx(0.4)
    assert s.sites[13].refusals == [] and len(s.sites[13].failures) == 1  # a bad request is not a refusal
    assert s.sites[11].rounds_answered == 2 and s.sites[11].epsilon_spent == pytest.approx(0.8)

    summary = run_summary(s.cfg, s, tmp_path, 1.0)
    assert summary["sites"]["1"]["refusals"] == [f"round 2: {refused}"]
    assert summary["sites"]["0"]["refusals"] == [] and summary["sites"]["2"]["refusals"] == []
    assert [d["node"] for d in summary["dropped_replies"] if d["refused"]] == [12]
    assert summary["epsilon_spent_max"] == pytest.approx(0.8)


def test_summary_keeps_every_refusing_site_apart(strategy, tmp_path):
    messages = by_node(train_messages(strategy, 1))
    replies = [
        Message(Error(code=P.ERROR_BUDGET_EXCEEDED, reason=f"site {n} refuses"), reply_to=messages[n]) for n in NODES
    ]
    with pytest.raises(RoundFailed):  # nobody answered: no private signal, no "completed" run
        strategy.aggregate_train(1, replies)
    assert len(strategy.sites) == 3
    summary = run_summary(strategy.cfg, strategy, tmp_path, 1.0, failure="round 1")
    assert len(summary["sites"]) == 3 and {s["status"] for s in summary["sites"].values()} == {"refused"}


# ---------------------------------------------------------------------------------- central mode
def test_central_mode_adds_the_noise_once_on_the_server(tmp_path):
    s = build_strategy(small_config("privacy.mode=central", "federation.max_site_images=100"), tmp_path)
    messages = by_node(train_messages(s, 1))
    assert messages[11].content.config_records[P.CONFIG]["privacy-mode"] == "central"
    votes = {n: integer_votes(n) for n in NODES}
    # Clean votes: the server validates them with zero noise slack.
    noisy = votes[13] + np.random.default_rng(1).normal(0.0, s.noise_multiplier, POOL)
    replies = [
        vote_reply(messages[11], votes[11]),
        vote_reply(messages[12], votes[12]),
        vote_reply(messages[13], noisy * 3),
    ]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["votes_received"] == 2 and [d["node"] for d in s.dropped] == [13]
    assert metrics["aggregate_noise_std"] == pytest.approx(s.noise_multiplier)
    stored = np.array([e["votes"] for e in read_index(tmp_path / "rounds" / "round_001")])
    clean = votes[11] + votes[12]
    assert not np.allclose(stored, clean)  # the server added Gaussian noise to the sum
    residual = stored - clean
    assert abs(residual.mean()) < 4 * s.noise_multiplier / np.sqrt(POOL)
    assert 0.5 * s.noise_multiplier < residual.std() < 1.6 * s.noise_multiplier


def test_central_site_unit_normalises_each_site_vector(tmp_path):
    s = build_strategy(small_config("privacy.mode=central", "privacy.unit=site"), tmp_path)
    messages = by_node(train_messages(s, 1))
    a = np.zeros(POOL)
    a[:2] = [3.0, 4.0]  # norm 5 -> scaled to norm 1
    b = np.zeros(POOL)
    b[5] = 0.5  # norm <= 1 -> kept
    total, valid = s.collect_votes(1, [vote_reply(messages[11], a), vote_reply(messages[12], b)])
    assert valid == 2
    expected = np.zeros(POOL)
    expected[:2] = [0.6, 0.8]
    expected[5] = 0.5
    np.testing.assert_allclose(total, expected)


def test_an_error_reply_flower_makes_for_a_lost_node_names_that_node(tmp_path):
    """Flower answers for a node that died with its own error (code 5, sent from the SuperLink's
    id): the strategy names the node the request went to, not the SuperLink."""
    from flwr.common.constant import ErrorCode

    s = build_strategy(small_config("federation.min_sites=2"), tmp_path)
    messages = train_messages(s, 1)
    for i, m in enumerate(messages):  # what the Grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"msg-{i}"
    by = by_node(messages)
    lost = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=by[13])
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's id
    assert lost.metadata.src_node_id == 1 and lost.metadata.reply_to_message_id == "msg-2"
    s.aggregate_train(
        1, [vote_reply(by[11], integer_votes(1), 0.5, 0), vote_reply(by[12], integer_votes(2), 0.5, 1), lost]
    )
    assert sorted(s.sites) == [11, 12, 13] and s.sites[13].status == "failed"
    assert s.sites[13].failures == ["round 1: failed: the node was lost (Flower: node unavailable) (code 5)"]
    assert [d["node"] for d in s.dropped] == [13]  # once: not also as a missing reply
