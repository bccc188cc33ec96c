"""Message-level tests of CoAutoGenStrategy after the last round: the final dataset, the
downstream model, federated evaluation (clear and noised), the Gen framework and an in-process
federation of real ClientApp handlers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from clients.wire import to_content
from coautogen_fl import protocol as P
from coautogen_fl.downstream import build_classifier
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from coautogen_fl.store import read_index
from coautogen_fl.tracking import read_metrics
from strategies.server_app import build_strategy, run_summary

from strategy_helpers import (
    NODES,
    NUM_CLASSES,
    FakeGrid,
    InProcessGrid,
    eval_reply,
    integer_votes,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name; `strategy` is in conftest.py)
    train_messages,
    vote_reply,
)


# ---------------------------------------------------------------------------------- last round
def test_last_round_builds_the_dataset_and_the_model_goes_to_every_node(tmp_path):
    s = build_strategy(small_config("federation.fraction_train=0.67"), tmp_path)
    grid = FakeGrid()
    for server_round in (1, 2):
        messages = train_messages(s, server_round, grid)
        assert len(messages) == 2  # a sample of the three nodes
        assert list(s.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)) == []  # nothing yet
        replies = [
            vote_reply(m, integer_votes(m.metadata.dst_node_id), 0.5 * server_round, i) for i, m in enumerate(messages)
        ]
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
            "model": "cnn",
            "num-classes": NUM_CLASSES,
            "channels": 1,
            "image-size": 28,
            P.EVALUATION_NOISE: s.noise_multiplier,
            "round": 3,  # noised and charged: release T + 1
            P.RUN_KEY: s.run_key,
        }
        sent = m.content.array_records[P.WEIGHTS]
        for name in arrays:
            np.testing.assert_array_equal(sent[name].numpy(), arrays[name].numpy())


# ---------------------------------------------------------------------------------- aggregate_evaluate
def evaluate_messages(nodes):
    return {n: Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes}


def test_aggregate_evaluate_is_count_weighted_and_drops_invalid_replies(tmp_path):
    strategy = build_strategy(small_config("privacy.evaluation=clear"), tmp_path)  # sites that consented
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
    assert "1.5" in dropped[13] and P.ERROR_REASONS[P.ERROR_NO_DATA] in dropped[15] and "lacks" in dropped[16]
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
    # no votes: the only release is the noised evaluation, which gets the whole budget
    assert s.noise_multiplier == pytest.approx(noise_multiplier_for_epsilon(1.0, 1e-5, 1)) and s.rounds == 1
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
        assert [e["round"] for e in ledger["entries"]] == [1, 2, 3]  # two vote rounds, the noised evaluation
    summary = run_summary(cfg, s, tmp_path / "run", 1.0)
    assert summary["epsilon_spent_max"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(summary["sites"]) == ["0", "1", "2"]


def test_aggregate_evaluate_survives_a_list_valued_metric(strategy):
    m = evaluate_messages([11, 12])
    odd = Message(
        content=RecordDict({P.METRICS: MetricRecord({P.ACCURACY: [0.5], P.NUM_EXAMPLES: 10})}), reply_to=m[11]
    )
    result = strategy.aggregate_evaluate(2, [odd, eval_reply(m[12], 0.5, 10)])
    assert result[P.ACCURACY] == pytest.approx(0.5) and [d["node"] for d in strategy.dropped] == [11]


def test_noised_evaluation_is_planned_into_the_noise_and_aggregated_from_noised_counts(tmp_path):
    s = build_strategy(small_config(), tmp_path)  # privacy.evaluation=noised is the default
    cfg = s.cfg
    # the rounds and the evaluation release share the budget: T + 1 releases at one sigma
    assert s.noise_multiplier == pytest.approx(
        noise_multiplier_for_epsilon(cfg.privacy.epsilon, cfg.privacy.delta, cfg.feedback.rounds + 1)
    )
    m = evaluate_messages([11, 12, 13])
    metrics = [
        P.EvaluationReply(30.4, 41.0, 1.0, 1.0, 0),
        P.EvaluationReply(9.7, 19.2, 1.0, 1.0, 1),
        P.EvaluationReply(float("nan"), 10.0, 1.0, 1.0, 2),
    ]
    replies = [Message(content=to_content(x.to_parts()), reply_to=m[n]) for n, x in zip([11, 12, 13], metrics)]
    result = s.aggregate_evaluate(2, replies)
    assert result[P.ACCURACY] == pytest.approx((30.4 + 9.7) / (41.0 + 19.2))
    assert [d["node"] for d in s.dropped] == [13]
    assert s.sites[11].epsilon_spent == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory):
    from tiny_diffusers import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.mark.parametrize("task_mode", ["I2I", "T2I"])
def test_feedback_run_with_a_diffusers_generator(tmp_path, monkeypatch, tiny_pipeline_folder, task_mode):
    """The whole Feedback loop with real ClientApp handlers and a (tiny, random-weight)
    Stable Diffusion pipeline loaded from a local folder through the real loading path."""
    from clients import client_app

    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(
        f"generator.name={tiny_pipeline_folder}",
        "generator.steps=2",
        "generator.batch_size=10",
        "feedback.evolve=candidates",
        f"feedback.task_mode={task_mode}",
        "data.image_size=32",
    )
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.rounds, timeout=10)
    assert s.dropped == [] and all(site.rounds_answered == 2 for site in s.sites.values())
    final = json.loads((tmp_path / "run" / "synthetic" / "index.jsonl").read_text().splitlines()[0])
    genotype = final["genotype"]
    assert (
        final["parent"] is not None
        and genotype["prompt"] == "a photo of " + ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"][final["label"]]
    )
    assert genotype["mode"] == ("i2i" if task_mode == "I2I" else "t2i")
    assert len(list((tmp_path / "run" / "synthetic").rglob("*.png"))) == 5 * NUM_CLASSES
    assert 0.0 <= s.federated_accuracy <= 1.0


def test_refused_evaluation_is_recorded_at_its_release(strategy):
    """A site declining the noised evaluation (release T + 1 in its ledger) is a refusal, named
    with the protocol's line for its code; a site refusing clean votes for lack of trust, too."""
    m = evaluate_messages([11, 12])
    replies = [
        Message(Error(code=P.ERROR_BUDGET_EXCEEDED, reason="anything"), reply_to=m[11]),
        Message(Error(code=P.ERROR_NOT_ALLOWED, reason="anything"), reply_to=m[12]),
    ]
    assert strategy.aggregate_evaluate(2, replies) is None
    line = f"evaluation: {P.ERROR_REASONS[P.ERROR_BUDGET_EXCEEDED]} (code {P.ERROR_BUDGET_EXCEEDED})"
    assert strategy.dropped[0] == {"round": 3, "node": 11, "site": "node-11", "refused": True, "reason": line}
    assert strategy.sites[11].refusals == [f"round 3: {line}"]
    assert strategy.dropped[1]["refused"] is True and strategy.sites[12].refusals[0].startswith(
        "round 3: evaluation: refused"
    )


@pytest.mark.parametrize("evolve", ["distribution", "candidates"])
def test_final_volume_is_decoupled_from_the_pool_voted_on(tmp_path, evolve):
    # -vpl 2 alone with a pool of 3 per class: 2 per class come out, drawn after the last vote
    s = build_strategy(small_config("feedback.volume_per_label=2", f"feedback.evolve={evolve}"), tmp_path)
    grid = FakeGrid()
    for server_round in (1, 2):
        messages = train_messages(s, server_round, grid)
        assert len(s.evolution.pool) == 3 * NUM_CLASSES  # the voted pool keeps its own size
        replies = [vote_reply(m, integer_votes(m.metadata.dst_node_id), 0.5, i) for i, m in enumerate(messages)]
        s.aggregate_train(server_round, replies)
    index = read_index(tmp_path / "synthetic")
    assert np.bincount([e["label"] for e in index], minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert s.final.num_synthetic == 2 * NUM_CLASSES
