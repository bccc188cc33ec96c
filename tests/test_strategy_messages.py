"""Message-level tests of CoAutoGenStrategy, without any Flower process.

The strategy is built from a small config with ``build_strategy``; a fake Grid stands in for
Flower's. Replies are built the way a ClientApp builds them (``Message(..., reply_to=msg)``),
so their ``src_node_id`` is the node the request was addressed to.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from coautogen_fl import protocol as P
from coautogen_fl.config import flatten, load_config, to_dict
from coautogen_fl.downstream import build_classifier
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from coautogen_fl.store import read_index
from coautogen_fl.tracking import read_metrics
from strategies.server_app import build_strategy, run_summary

NODES = [11, 12, 13]
NUM_CLASSES = 10
SMALL = [
    "feedback.rounds=2",
    "feedback.candidates_per_label=3",
    "feedback.volume_per_label=5",
    "downstream.epochs=1",
    "federation.num_hospitals=3",
]
POOL = 3 * NUM_CLASSES  # candidates_per_label x classes
DIM = 14 * 14  # the pixels embedder at its default pixel_size


class FakeGrid:
    """The part of a Grid the strategy's configure_* methods use."""

    def __init__(self, nodes=NODES) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages read the run/node/task identity of the process, as inside a ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def small_config(*overrides: str):
    return load_config(overrides=[*SMALL, *overrides])


@pytest.fixture
def strategy(tmp_path):
    return build_strategy(small_config(), tmp_path)


def vote_reply(msg: Message, votes, num_examples=100, epsilon_spent=0.5, partition_id=0) -> Message:
    """A site's TRAIN reply, built like clients.client_app.train builds it."""
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: num_examples,
            P.EPSILON_SPENT: float(epsilon_spent),
            P.PARTITION_ID: partition_id,
            P.NOISE_MULTIPLIER: 1.0,
        }
    )
    votes = ArrayRecord({P.VOTES: Array(np.asarray(votes, dtype=np.float64))})
    return Message(content=RecordDict({P.VOTES: votes, P.METRICS: metrics}), reply_to=msg)


def eval_reply(msg: Message, accuracy, num_examples, partition_id=0) -> Message:
    metrics = MetricRecord({P.ACCURACY: float(accuracy), P.NUM_EXAMPLES: int(num_examples), P.PARTITION_ID: partition_id})
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)


def train_messages(strategy, server_round, grid=None):
    return list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid or FakeGrid()))


def by_node(messages):
    return {m.metadata.dst_node_id: m for m in messages}


def integer_votes(seed, size=POOL, total=60):
    """A plausible clean vote vector: ``total`` private samples, one vote each."""
    rng = np.random.default_rng(seed)
    return np.bincount(rng.integers(0, size, total), minlength=size).astype(np.float64)


# ---------------------------------------------------------------------------------- configure_train
def test_configure_train_sends_the_pool_to_every_node(strategy):
    messages = train_messages(strategy, 1)
    assert [m.metadata.dst_node_id for m in messages] == NODES
    expected_sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 2)
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
        assert config["rater"] == "PE" and config["k"] == 1
        assert config["privacy-mode"] == "local" and config["privacy-unit"] == "image"
        assert config["delta"] == pytest.approx(1e-5, rel=1e-15)
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
    assert config[P.NOISE_MULTIPLIER] == pytest.approx(noise_multiplier_for_epsilon(4.0, 1e-5, 3), rel=1e-12)


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
        vote_reply(messages[node], votes[node], num_examples=60, epsilon_spent=0.1 * i, partition_id=i)
        for i, node in enumerate(NODES)
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
    assert {n: (s.partition_id, s.rounds_answered) for n, s in strategy.sites.items()} == {11: (0, 1), 12: (1, 1), 13: (2, 1)}
    assert strategy.sites[13].epsilon_spent == pytest.approx(0.2)
    logged = read_metrics(tmp_path)
    assert len(logged) == 1 and logged[0]["round"] == 1 and logged[0]["votes_received"] == 3
    assert logged[0]["epsilon_spent_max"] == pytest.approx(0.2)


def test_local_noise_within_the_bound_is_accepted(strategy):
    """A noised reply of an honest site (std = noise multiplier) passes validation."""
    messages = by_node(train_messages(strategy, 1))
    rng = np.random.default_rng(0)
    noisy = integer_votes(1) + rng.normal(0.0, strategy.noise_multiplier, POOL)
    total, valid = strategy.collect_votes(1, [vote_reply(messages[11], noisy, num_examples=60)])
    assert valid == 1 and strategy.dropped == []
    np.testing.assert_allclose(total, noisy)


MALFORMED = {
    # node: (how the reply is broken, a fragment of the recorded reason)
    12: ("wrong shape", "shape"),
    13: ("nan", "NaN"),
    14: ("inf", "NaN or infinite"),
    15: ("absurd magnitude", "impossible"),
    16: ("missing votes record", "lacks"),
    17: ("missing metrics record", "lacks"),
    18: ("missing votes array", "lacks the 'votes' array"),
    19: ("missing num-examples", "num-examples"),
    20: ("negative num-examples", "num-examples"),
}


def malformed_reply(msg: Message, kind: str) -> Message:
    good = integer_votes(3)
    metrics = MetricRecord({P.NUM_EXAMPLES: 60, P.EPSILON_SPENT: 0.3, P.PARTITION_ID: 5})
    if kind == "wrong shape":
        return vote_reply(msg, good[:-1], 60)
    if kind == "nan":
        bad = good.copy()
        bad[4] = np.nan
        return vote_reply(msg, bad, 60)
    if kind == "inf":
        bad = good.copy()
        bad[0] = np.inf
        return vote_reply(msg, bad, 60)
    if kind == "absurd magnitude":
        return vote_reply(msg, np.full(POOL, 1e9), 60)
    if kind == "missing votes record":
        return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)
    if kind == "missing metrics record":
        return Message(content=RecordDict({P.VOTES: ArrayRecord({P.VOTES: Array(good)})}), reply_to=msg)
    if kind == "missing votes array":
        content = RecordDict({P.VOTES: ArrayRecord({"scores": Array(good)}), P.METRICS: metrics})
        return Message(content=content, reply_to=msg)
    if kind == "missing num-examples":
        content = RecordDict({P.VOTES: ArrayRecord({P.VOTES: Array(good)}), P.METRICS: MetricRecord({P.EPSILON_SPENT: 0.3})})
        return Message(content=content, reply_to=msg)
    if kind == "negative num-examples":
        return vote_reply(msg, good, num_examples=-3)
    raise AssertionError(kind)


def test_malformed_replies_are_dropped_with_a_reason(strategy, tmp_path):
    nodes = [11, *MALFORMED]
    messages = by_node(train_messages(strategy, 1, FakeGrid(nodes)))
    good = integer_votes(11)
    replies = [vote_reply(messages[11], good, num_examples=60, partition_id=0)]
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
    assert set(strategy.sites) == {11}


def test_round_with_no_valid_reply_falls_back_and_does_not_crash(strategy, tmp_path):
    messages = by_node(train_messages(strategy, 1))
    replies = [malformed_reply(messages[n], "nan") for n in NODES]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["votes_received"] == 0 and metrics["dropped"] == 3
    assert read_metrics(tmp_path)[0]["fallback_labels"] == list(range(NUM_CLASSES))
    index = read_index(tmp_path / "rounds" / "round_001")
    assert [e["votes"] for e in index] == [0.0] * POOL
    assert len(strategy.evolution.pool) == POOL  # uniform parents, the next round can go on
    assert len(train_messages(strategy, 2)) == 3


def test_budget_refusal_is_recorded_in_the_site_record(tmp_path):
    s = build_strategy(small_config("feedback.rounds=3"), tmp_path)
    messages = by_node(train_messages(s, 1))
    s.aggregate_train(1, [vote_reply(messages[n], integer_votes(n), 60, 0.4, i) for i, n in enumerate(NODES)])

    messages = by_node(train_messages(s, 2))
    refusal = Message(Error(code=P.ERROR_BUDGET_EXCEEDED, reason="privacy budget exceeded: round 2"), reply_to=messages[12])
    bad_request = Message(Error(code=P.ERROR_BAD_REQUEST, reason="ValueError: embedding dimensions differ"), reply_to=messages[13])
    assert refusal.metadata.src_node_id == 12 and refusal.has_error()
    replies = [vote_reply(messages[11], integer_votes(1), 60, 0.8, 0), refusal, bad_request]

    _, metrics = s.aggregate_train(2, replies)  # must not raise

    assert metrics["votes_received"] == 1 and metrics["dropped"] == 2
    dropped = {d["node"]: d for d in s.dropped}
    assert dropped[12] == {"round": 2, "node": 12, "refused": True, "reason": "privacy budget exceeded: round 2"}
    assert dropped[13]["refused"] is False and "embedding dimensions" in dropped[13]["reason"]
    assert s.sites[12].refusals == ["round 2: privacy budget exceeded: round 2"]
    assert s.sites[12].rounds_answered == 1 and s.sites[12].epsilon_spent == pytest.approx(0.4)
    assert s.sites[13].refusals == []  # a bad request is not a budget refusal
    assert s.sites[11].rounds_answered == 2 and s.sites[11].epsilon_spent == pytest.approx(0.8)

    summary = run_summary(s.cfg, s, tmp_path, 1.0)
    assert summary["sites"]["1"]["refusals"] == ["round 2: privacy budget exceeded: round 2"]
    assert summary["sites"]["0"]["refusals"] == [] and summary["sites"]["2"]["refusals"] == []
    assert [d["node"] for d in summary["dropped_replies"] if d["refused"]] == [12]
    assert summary["epsilon_spent_max"] == pytest.approx(0.8)


def test_summary_keeps_every_refusing_site_apart(strategy, tmp_path):
    messages = by_node(train_messages(strategy, 1))
    replies = [Message(Error(code=P.ERROR_BUDGET_EXCEEDED, reason=f"site {n} refuses"), reply_to=messages[n]) for n in NODES]
    strategy.aggregate_train(1, replies)
    assert len(strategy.sites) == 3
    summary = run_summary(strategy.cfg, strategy, tmp_path, 1.0)
    assert len(summary["sites"]) == 3


# ---------------------------------------------------------------------------------- central mode
def test_central_mode_adds_the_noise_once_on_the_server(tmp_path):
    s = build_strategy(small_config("privacy.mode=central"), tmp_path)
    messages = by_node(train_messages(s, 1))
    assert messages[11].content.config_records[P.CONFIG]["privacy-mode"] == "central"
    votes = {n: integer_votes(n) for n in NODES}
    # Clean votes: the server validates them with zero noise slack.
    noisy = votes[13] + np.random.default_rng(1).normal(0.0, s.noise_multiplier, POOL)
    replies = [vote_reply(messages[11], votes[11], 60), vote_reply(messages[12], votes[12], 60), vote_reply(messages[13], noisy * 3, 60)]
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
    total, valid = s.collect_votes(1, [vote_reply(messages[11], a, 10), vote_reply(messages[12], b, 10)])
    assert valid == 2
    expected = np.zeros(POOL)
    expected[:2] = [0.6, 0.8]
    expected[5] = 0.5
    np.testing.assert_allclose(total, expected)


# ---------------------------------------------------------------------------------- last round
def test_last_round_builds_the_dataset_and_the_model_goes_to_every_node(tmp_path):
    s = build_strategy(small_config("federation.fraction_train=0.67"), tmp_path)
    grid = FakeGrid()
    for server_round in (1, 2):
        messages = train_messages(s, server_round, grid)
        assert len(messages) == 2  # a sample of the three nodes
        assert list(s.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)) == []  # nothing yet
        replies = [vote_reply(m, integer_votes(m.metadata.dst_node_id), 60, 0.5 * server_round, i) for i, m in enumerate(messages)]
        arrays, metrics = s.aggregate_train(server_round, replies)
        assert metrics["votes_received"] == 2
        if server_round == 1:
            assert arrays is None
            assert not (tmp_path / "synthetic").exists()

    assert isinstance(arrays, ArrayRecord) and arrays is s.final.model_arrays
    model = build_classifier("cnn", NUM_CLASSES, 1, 28)
    assert set(arrays) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert arrays[name].numpy().shape == tuple(tensor.shape)

    final = tmp_path / "synthetic"
    pngs = sorted(final.rglob("*.png"))
    assert len(pngs) == 5 * NUM_CLASSES == s.final.num_synthetic
    assert sorted(p.name for p in final.iterdir() if p.is_dir()) == [str(i) for i in range(NUM_CLASSES)]
    index = read_index(final)
    assert np.bincount([e["label"] for e in index], minlength=NUM_CLASSES).tolist() == [5] * NUM_CLASSES
    assert all(e["round"] == 2 for e in index)
    assert (tmp_path / "rounds" / "round_002" / "index.jsonl").is_file()
    assert 0.0 <= s.final.accuracy_real_test <= 1.0
    assert len(read_metrics(tmp_path)) == 2

    evaluations = list(s.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in evaluations] == NODES  # every node, not only the sampled ones
    for m in evaluations:
        assert m.metadata.message_type == MessageType.EVALUATE
        config = m.content.config_records[P.CONFIG]
        assert dict(config) == {
            "model": "cnn", "num-classes": NUM_CLASSES, "channels": 1, "image-size": 28,
            P.EVALUATION_NOISE: 0.0, "round": 2,  # privacy.evaluation=clear: no noise, no charge
        }
        sent = m.content.array_records[P.ARRAYS]
        for name in arrays:
            np.testing.assert_array_equal(sent[name].numpy(), arrays[name].numpy())


# ---------------------------------------------------------------------------------- aggregate_evaluate
def evaluate_messages(nodes):
    return {n: Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes}


def test_aggregate_evaluate_is_count_weighted_and_drops_invalid_replies(strategy):
    m = evaluate_messages([11, 12, 13, 14, 15, 16])
    replies = [
        eval_reply(m[11], 0.5, 10, 0),
        eval_reply(m[12], 1.0, 30, 1),
        eval_reply(m[13], 1.5, 20, 2),  # impossible accuracy
        eval_reply(m[14], -0.1, 20, 3),  # impossible accuracy
        Message(Error(code=P.ERROR_NO_DATA, reason="no test images"), reply_to=m[15]),
        Message(content=RecordDict(), reply_to=m[16]),  # no metrics record
    ]
    result = strategy.aggregate_evaluate(2, replies)
    assert result[P.ACCURACY] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert result[P.NUM_EXAMPLES] == 40
    assert strategy.federated_accuracy == pytest.approx(0.875)
    dropped = {d["node"]: d["reason"] for d in strategy.dropped}
    assert set(dropped) == {13, 14, 15, 16}
    assert "1.5" in dropped[13] and "no test images" in dropped[15] and "no metrics record" in dropped[16]
    assert all(r.startswith("evaluation:") for r in dropped.values())


def test_aggregate_evaluate_with_nothing_valid_returns_none(strategy):
    m = evaluate_messages([11, 12])
    assert strategy.aggregate_evaluate(2, [eval_reply(m[11], float("nan"), 10), eval_reply(m[12], 0.7, 0)]) is None
    assert strategy.federated_accuracy is None
    assert strategy.aggregate_evaluate(2, []) is None


# ---------------------------------------------------------------------------------- Gen framework
class RecordingGrid(FakeGrid):
    """A Grid whose send_and_receive records what it was given and answers EVALUATE."""

    def __init__(self, nodes=NODES) -> None:
        super().__init__(nodes)
        self.sent: list[list[Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        return [eval_reply(m, 0.25, 8) for m in messages if m.metadata.message_type == MessageType.EVALUATE]


def test_gen_framework_sends_no_train_message_and_builds_the_dataset(tmp_path):
    s = build_strategy(small_config("feedback.framework=Gen"), tmp_path)
    assert s.noise_multiplier == 0.0 and s.rounds == 1
    grid = RecordingGrid()
    result = s.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)

    train_batch, evaluate_batch = grid.sent
    assert train_batch == []  # no site is asked anything private
    assert [m.metadata.dst_node_id for m in evaluate_batch] == NODES
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in evaluate_batch)
    assert result.arrays is s.final.model_arrays and len(result.arrays) > 0
    assert result.train_metrics_clientapp[1]["num-synthetic"] == 5 * NUM_CLASSES
    assert len(list((tmp_path / "synthetic").rglob("*.png"))) == 5 * NUM_CLASSES
    assert not (tmp_path / "rounds").exists()
    assert s.federated_accuracy == pytest.approx(0.25)
    summary = run_summary(s.cfg, s, tmp_path, 1.0)
    assert summary["rounds"] == 0 and summary["num_synthetic"] == 50
    # sites appear through their evaluation replies, having spent nothing
    assert all(site["epsilon_spent"] == 0.0 and site["rounds_answered"] == 0 for site in summary["sites"].values())
    assert summary["epsilon_spent_max"] == 0.0


# ---------------------------------------------------------------------------------- in-process federation
class InProcessGrid(FakeGrid):
    """Delivers each Message to the real ClientApp handlers, one Context per node."""

    def __init__(self, cfg, tmp_path, nodes=NODES) -> None:
        super().__init__(nodes)
        run_config = {**flatten(to_dict(cfg)), "config-file": ""}
        self.contexts = {
            node: Context(
                run_id=4242,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": len(nodes), "state-dir": str(tmp_path / f"site{i}")},
                state=RecordDict(),
                run_config=run_config,
            )
            for i, node in enumerate(nodes)
        }

    def send_and_receive(self, messages, *, timeout=None):
        from clients import client_app

        replies = []
        for m in messages:
            handler = client_app.train if m.metadata.message_type == MessageType.TRAIN else client_app.evaluate
            replies.append(handler(m, self.contexts[m.metadata.dst_node_id]))
        return replies


def test_feedback_run_with_in_process_sites(tmp_path, monkeypatch):
    from clients import client_app

    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config()
    s = build_strategy(cfg, tmp_path / "run")
    grid = InProcessGrid(cfg, tmp_path)
    s.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)

    assert s.dropped == []
    assert {site.partition_id for site in s.sites.values()} == {0, 1, 2}
    for site in s.sites.values():
        assert site.rounds_answered == 2 and site.refusals == []
        assert site.epsilon_spent == pytest.approx(1.0, abs=1e-6)
        assert site.epsilon_spent <= 1.0 * (1 + 1e-6)
    assert 0.0 <= s.federated_accuracy <= 1.0
    for i in range(3):
        ledger = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2]
    summary = run_summary(cfg, s, tmp_path / "run", 1.0)
    assert summary["epsilon_spent_max"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(summary["sites"]) == ["0", "1", "2"]


def test_aggregate_evaluate_survives_a_list_valued_metric(strategy):
    m = evaluate_messages([11, 12])
    odd = Message(content=RecordDict({P.METRICS: MetricRecord({P.ACCURACY: [0.5], P.NUM_EXAMPLES: 10})}), reply_to=m[11])
    result = strategy.aggregate_evaluate(2, [odd, eval_reply(m[12], 0.5, 10)])
    assert result[P.ACCURACY] == pytest.approx(0.5) and [d["node"] for d in strategy.dropped] == [11]


def test_noised_evaluation_is_planned_into_the_noise_and_aggregated_from_noised_counts(tmp_path):
    s = build_strategy(small_config("privacy.evaluation=noised"), tmp_path)
    cfg = s.cfg
    # the rounds and the evaluation release share the budget: T + 1 releases at one sigma
    assert s.noise_multiplier == pytest.approx(noise_multiplier_for_epsilon(cfg.privacy.epsilon, cfg.privacy.delta, cfg.feedback.rounds + 1))
    m = evaluate_messages([11, 12, 13])
    metrics = [
        {P.CORRECT: 30.4, P.NUM_EXAMPLES: 41.0, P.PARTITION_ID: 0, P.EPSILON_SPENT: 1.0},
        {P.CORRECT: 9.7, P.NUM_EXAMPLES: 19.2, P.PARTITION_ID: 1, P.EPSILON_SPENT: 1.0},
        {P.CORRECT: float("nan"), P.NUM_EXAMPLES: 10.0, P.PARTITION_ID: 2, P.EPSILON_SPENT: 1.0},
    ]
    replies = [Message(content=RecordDict({P.METRICS: MetricRecord(x)}), reply_to=m[n]) for n, x in zip([11, 12, 13], metrics)]
    result = s.aggregate_evaluate(2, replies)
    assert result[P.ACCURACY] == pytest.approx((30.4 + 9.7) / (41.0 + 19.2))
    assert [d["node"] for d in s.dropped] == [13]
    assert s.sites[11].epsilon_spent == pytest.approx(1.0)
