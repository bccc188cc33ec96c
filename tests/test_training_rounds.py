"""-tt real and -tt mix in process: the strategy's DP-SGD rounds through the real ClientApp
handlers (strategy_helpers.InProcessGrid), the TrainRequest/TrainReply wire records, and what
the sites' ledgers hold afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

from clients import client_app
from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.privacy import PrivacyLedger
from strategies.server_app import build_strategy

from strategy_helpers import (
    TINY_DPSGD,
    InProcessGrid,
    sent_fields,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

TINY = TINY_DPSGD


def ledgers(cfg, tmp_path, sites=3):
    return [
        PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        for i in range(sites)
    ]


def run(cfg, tmp_path):
    client_app._SITES.clear()
    s = build_strategy(cfg, tmp_path / "run")
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.total_rounds, timeout=10)
    return s


def test_train_request_and_reply_round_trip():
    weights = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "0.bias": np.zeros(2, np.float32)}
    request = P.TrainRequest(3, "cnn", 10, 1, 28, 4.5, 0.25, 5, 1.0, 1e-2, "adam", weights, "run-7")
    back = P.TrainRequest.from_parts(from_content(to_content(request.to_parts())))
    assert (back.round, back.noise_multiplier, back.sample_rate, back.steps, back.optimizer, back.run_key) == (
        3,
        4.5,
        0.25,
        5,
        "adam",
        "run-7",
    )
    assert all(np.array_equal(back.weights[k], weights[k]) for k in weights)
    assert back.fingerprint() == request.fingerprint()
    reply = P.TrainReply(weights, 0.4, 1.0, 2, 4.5, "north")
    back = P.TrainReply.from_parts(from_content(to_content(reply.to_parts())))
    assert (back.epsilon_spent, back.partition_id, back.site_label) == (0.4, 2, "north")
    with pytest.raises(P.ReplyError, match="keys"):
        P.validate_weights({"0.weight": weights["0.weight"]}, weights)
    with pytest.raises(P.ReplyError, match="NaN"):
        P.validate_weights({**weights, "0.bias": np.array([np.nan, 0], np.float32)}, weights)


def test_real_trains_through_the_sites_and_charges_one_ledger(tmp_path):
    cfg = small_config("feedback.task_type=real", *TINY)
    s = run(cfg, tmp_path)
    assert s.rounds == 0 and s.total_rounds == 2
    assert s.final.accuracy_real_test is not None and s.federated_accuracy is not None
    assert sorted(p.name for p in (tmp_path / "run" / "training").iterdir()) == [
        "round-0000.npz",
        "round-0001.npz",
        "round-0002.npz",
    ]
    for ledger in ledgers(cfg, tmp_path):
        # Two DP-SGD rounds (rate 0.5, 2 steps) and the noised evaluation, composed within the budget.
        assert [(e.round, e.sample_rate, e.steps) for e in ledger.entries] == [(1, 0.5, 2), (2, 0.5, 2), (3, 1.0, 1)]
        assert ledger.entries[0].noise_multiplier == s.training.noise_multiplier
        assert 0.99 * cfg.privacy.epsilon <= ledger.spent_epsilon() <= cfg.privacy.epsilon * (1 + 1e-6)
    assert {site.rounds_answered for site in s.sites.values()} == {2}


def test_mix_votes_then_trains_and_the_ledger_holds_both(tmp_path):
    cfg = small_config("feedback.task_type=mix", *TINY)
    s = run(cfg, tmp_path)
    assert (s.rounds, s.total_rounds) == (2, 4)
    summary = s.training.summary()
    assert summary["accuracy_synthetic_pretrained"] is not None and len(summary["history"]) == 2
    for ledger in ledgers(cfg, tmp_path):
        rates = [(e.round, e.sample_rate) for e in ledger.entries]
        assert rates == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5), (5, 1.0)]  # votes, DP-SGD, evaluation
        assert ledger.spent_epsilon() <= cfg.privacy.epsilon * (1 + 1e-6)
    # The votes kept (1 - share) of epsilon on their own: the split is the documented 0.5.
    from coautogen_fl.privacy import epsilon_for_noise

    assert epsilon_for_noise([s.noise_multiplier] * 3, cfg.privacy.delta) == pytest.approx(
        0.5 * cfg.privacy.epsilon, rel=1e-6
    )


def test_a_site_replays_a_repeated_request_and_refuses_over_budget(tmp_path):
    cfg = small_config("feedback.task_type=real", *TINY)
    client_app._SITES.clear()
    s = build_strategy(cfg, tmp_path / "run")
    grid = InProcessGrid(cfg, tmp_path)
    messages = s.configure_train(1, ArrayRecord(), None, grid)
    first = grid.send_and_receive(messages)
    again = grid.send_and_receive(messages)  # the same request of the same run: replayed, not charged
    for a, b in zip(first, again):
        assert not a.has_error() and sent_fields(a) == sent_fields(b)
        wa, wb = (P.TrainReply.from_parts(from_content(m.content)).weights for m in (a, b))
        assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert all(len(ledger.entries) == 1 for ledger in ledgers(cfg, tmp_path))
    # Declared on the wire: every field of a reply is in SITE_REPLY_FIELDS["train.dpsgd"].
    for reply in first:
        assert all(P.declared_field(P.TRAIN_DPSGD, record, key) for record, key in sent_fields(reply))
    # A request that would spend more than the budget is refused with the budget code; nothing charged.
    greedy = P.TrainRequest.from_parts(from_content(messages[0].content))
    greedy = P.TrainRequest(**{**greedy.__dict__, "round": 2, "noise_multiplier": 0.3})
    reply = grid.send_and_receive(
        [
            Message(
                content=to_content(greedy.to_parts()),
                dst_node_id=messages[0].metadata.dst_node_id,
                message_type=P.TRAIN_DPSGD,
            )
        ]
    )[0]
    assert reply.has_error() and reply.error.code == P.ERROR_BUDGET_EXCEEDED
    # A model opacus cannot train per example (BatchNorm) is a bad request, refused before the charge.
    from coautogen_fl.downstream import build_classifier, state_dict_to_numpy

    resnet = state_dict_to_numpy(build_classifier("resnet18", 10, 1, 28))
    batchnorm = P.TrainRequest(
        **{**greedy.__dict__, "round": 3, "noise_multiplier": 50.0, "model": "resnet18", "weights": resnet}
    )
    reply = grid.send_and_receive(
        [
            Message(
                content=to_content(batchnorm.to_parts()),
                dst_node_id=messages[0].metadata.dst_node_id,
                message_type=P.TRAIN_DPSGD,
            )
        ]
    )[0]
    assert reply.has_error() and reply.error.code == P.ERROR_BAD_REQUEST
    assert len(ledgers(cfg, tmp_path)[0].entries) == 1


def test_an_undeclared_field_is_not_covered_by_the_weights_wildcard():
    assert P.declared_field(P.TRAIN_DPSGD, P.WEIGHTS, "anything.weight").release == P.Release.CHARGED
    assert P.declared_field(P.TRAIN_DPSGD, P.METRICS, P.NUM_EXAMPLES) is None
    assert P.declared_field("train", P.WEIGHTS, "0.weight") is None
