"""Central-mode DP-SGD (-tt real/mix with privacy.mode=central): each round one pooled DP-SGD step,
the sites' clean clipped gradient sums to a trusted server that noises their sum once."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from clients import client_app
from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.downstream import build_classifier
from coautogen_fl.dpsgd import clipped_gradient_sum
from coautogen_fl.privacy import PrivacyLedger
from strategies.server_app import build_strategy
from strategies.sites import RoundFailed

from strategy_helpers import (
    TINY_DPSGD,
    InProcessGrid,
    sent_fields,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

TINY = ["feedback.task_type=real", "privacy.mode=central", *TINY_DPSGD]


def norm(grads: dict) -> float:
    return float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in grads.values())))


def test_one_example_moves_the_clipped_gradient_sum_by_at_most_the_clip():
    rng = np.random.default_rng(0)
    model = build_classifier("cnn", 10, 1, 28, seed=0)
    images, labels = rng.random((12, 28, 28)).astype(np.float32), rng.integers(0, 10, 12)
    full = clipped_gradient_sum(model, images, labels, 1.0, 0.5)  # rate 1: every example joins
    assert norm(full) > 0.5  # several examples' gradients, each clipped to 0.5
    for drop in range(0, 12, 3):
        keep = np.arange(12) != drop
        fewer = clipped_gradient_sum(model, images[keep], labels[keep], 1.0, 0.5)
        assert norm({k: full[k] - fewer[k] for k in full}) <= 0.5 + 1e-4
    assert norm(clipped_gradient_sum(model, images[:0], labels[:0], 1.0, 0.5)) == 0.0  # empty batch: zeros


def test_central_rounds_are_one_step_each_through_the_handlers(tmp_path):
    client_app._SITES.clear()
    cfg = small_config(*TINY)
    s = build_strategy(cfg, tmp_path / "run")
    assert s.training.central and s.total_rounds == 4  # 2 rounds x 2 steps: one gradient sum per step
    s.start(grid=InProcessGrid(cfg, tmp_path), initial_arrays=ArrayRecord(), num_rounds=s.total_rounds, timeout=10)
    assert s.final.accuracy_real_test is not None
    assert [h["updates_received"] for h in s.training.history] == [3, 3, 3, 3]
    for i in range(3):
        ledger = PrivacyLedger(tmp_path / f"site{i}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        steps = [e for e in ledger.entries if e.sample_rate < 1]
        assert [(e.round, e.steps, e.sample_rate) for e in steps] == [(r, 1, 0.5) for r in (1, 2, 3, 4)]
        assert ledger.spent_epsilon() <= cfg.privacy.epsilon + 1e-9


def test_a_site_that_does_not_trust_the_server_refuses_and_the_reply_is_declared(tmp_path):
    client_app._SITES.clear()
    cfg = small_config(*TINY)
    s = build_strategy(cfg, tmp_path / "run")
    grid = InProcessGrid(cfg, tmp_path)
    request = s.training.configure(s, 1, grid)[0]
    reply = grid.send_and_receive([request])[0]
    assert sent_fields(reply) <= {(f.record, f.key) for f in P.SITE_REPLY_FIELDS[P.TRAIN_DPSGD_CENTRAL]} | {
        (P.GRADIENTS, k) for k in P.TrainReply.from_parts(from_content(reply.content)).weights
    }
    parsed = P.TrainReply.from_parts(from_content(reply.content))
    assert parsed.gradients and set(parsed.weights) == {
        n for n, _ in build_classifier("cnn", 10, 1, 28).named_parameters()
    }
    node = request.metadata.dst_node_id
    grid.contexts[node].node_config["trust-server"] = False
    client_app._SITES.clear()
    refused = grid.send_and_receive([s.training.configure(s, 2, grid)[0]])[0]
    assert refused.has_error() and refused.error.code == P.ERROR_NOT_ALLOWED


def test_the_server_drops_weights_in_a_central_round(tmp_path):
    cfg = small_config(*TINY)
    s = build_strategy(cfg, tmp_path / "run")
    request = s.training.configure(s, 1, InProcessGrid(cfg, tmp_path))[0]
    weights = dict(s.training.weights)
    reply = P.TrainReply(weights, 0.1, 1.0, 0, s.training.noise_multiplier)  # weights, not a gradient sum
    from flwr.app import Message

    msg = Message(content=to_content(reply.to_parts()), reply_to=request)
    assert s.training._collect(s, 1, [msg]) == []
    assert any("got weights" in d["reason"] for d in s.dropped)
    with pytest.raises(RoundFailed):
        s.training.aggregate(s, 1, [msg])  # too few valid sums: the round fails, nothing is averaged
