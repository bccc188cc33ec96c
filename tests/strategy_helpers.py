"""Shared pieces of the Message-level strategy tests: a fake Grid, a small config, replies
built the way a ClientApp builds them (``Message(..., reply_to=msg)``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients.wire import to_content
from coautogen_fl import protocol as P
from coautogen_fl.config import flatten, load_config, save_config, to_dict
from strategies.server_app import build_strategy, resume_strategy

NODES = [11, 12, 13]
NUM_CLASSES = 10
SMALL = [
    "feedback.rounds=2",
    "feedback.candidates_per_label=3",
    "feedback.volume_per_label=5",
    "downstream.epochs=1",
    "federation.num_hospitals=3",
]
#: Short DP-SGD schedules for -tt real/mix tests: 2 rounds of 2 local steps at rate 0.5.
TINY_DPSGD = [
    "downstream.dp_rounds=2",
    "downstream.dp_local_steps=2",
    "downstream.dp_sample_rate=0.5",
    "downstream.mix_synthetic_steps=3",
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


def small_strategy(tmp_path):
    """The strategy built from the small config (the `strategy` fixture in conftest.py)."""
    return build_strategy(small_config(), tmp_path)


def vote_reply(
    msg: Message, votes, epsilon_spent=0.5, partition_id=0, epsilon_budget=1.0, class_errors=None
) -> Message:
    """A site's TRAIN reply, built like clients.client_app.train builds it."""
    reply = P.VoteReply(
        np.asarray(votes, dtype=np.float64),
        float(epsilon_spent),
        float(epsilon_budget),
        partition_id,
        1.0,
        class_errors=class_errors,
    )
    return Message(content=to_content(reply.to_parts()), reply_to=msg)


def eval_reply(msg: Message, accuracy, num_examples, partition_id=0) -> Message:
    """A site's clear EVALUATE reply (a site whose node config allows clear evaluation)."""
    reply = P.EvaluationReply(accuracy * num_examples, num_examples, 0.0, 1.0, partition_id, float(accuracy))
    return Message(content=to_content(reply.to_parts()), reply_to=msg)


def train_messages(strategy, server_round, grid=None):
    return list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid or FakeGrid()))


def by_node(messages):
    return {m.metadata.dst_node_id: m for m in messages}


def integer_votes(seed, size=POOL, total=60):
    """A plausible clean vote vector: ``total`` private samples, one vote each."""
    rng = np.random.default_rng(seed)
    return np.bincount(rng.integers(0, size, total), minlength=size).astype(np.float64)


class InProcessGrid(FakeGrid):
    """Delivers each Message to the real ClientApp handlers, one Context per node."""

    def __init__(self, cfg, tmp_path, nodes=NODES) -> None:
        super().__init__(nodes)
        run_config = {**flatten(to_dict(cfg)), "config-file": ""}
        self.contexts = {
            node: Context(
                run_id=4242,
                node_id=node,
                node_config={
                    "partition-id": i,
                    "num-partitions": len(nodes),
                    "state-dir": str(tmp_path / f"site{i}"),
                    "site-epsilon": cfg.privacy.epsilon,
                    "site-delta": cfg.privacy.delta,
                    "trust-server": cfg.privacy.mode == "central",
                    "allow-clear-evaluation": cfg.privacy.evaluation == "clear",
                },
                state=RecordDict(),
                run_config=run_config,
            )
            for i, node in enumerate(nodes)
        }

    def send_and_receive(self, messages, *, timeout=None):
        from clients import client_app

        replies = []
        for m in messages:
            handlers = {MessageType.TRAIN: client_app.train, P.TRAIN_DPSGD: client_app.train_dpsgd}
            handler = handlers.get(m.metadata.message_type, client_app.evaluate)
            replies.append(handler(m, self.contexts[m.metadata.dst_node_id]))
        return replies


class Crash(BaseException):
    """The server process dies (not an Exception: nothing may catch it on the way out)."""


class CrashingGrid(InProcessGrid):
    """Delivers messages; at the ``crash_call``-th batch of ``message_type`` the sites answer (and
    pay) but the server dies before it sees a single reply."""

    def __init__(self, cfg, tmp_path, crash_call: int, message_type: str = MessageType.TRAIN) -> None:
        super().__init__(cfg, tmp_path)
        self.crash_call, self.message_type, self.calls = crash_call, message_type, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == self.message_type:
            self.calls += 1
            if self.calls == self.crash_call:
                raise Crash()
        return replies


def crashed_run(tmp_path, overrides, crash_call: int, message_type: str = MessageType.TRAIN):
    """Run ``small_config(*overrides)`` in ``tmp_path/run`` (its config.yaml saved) until the server
    dies at the ``crash_call``-th batch of ``message_type``, after the sites paid; (config, strategy)."""
    from clients import client_app

    client_app._SITES.clear()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = small_config(*overrides, f"tracking.run_dir={run_dir}")
    save_config(cfg, run_dir / "config.yaml")
    crashed = build_strategy(cfg, run_dir)
    crashed.run_key = "run-under-test"
    grid = CrashingGrid(cfg, tmp_path, crash_call, message_type)
    with pytest.raises(Crash):
        crashed.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=crashed.total_rounds, timeout=10)
    return cfg, crashed


def resumed_run(tmp_path, overrides):
    """The sites restart and the server resumes ``tmp_path/run`` from its checkpoint (not started)."""
    from clients import client_app

    client_app._SITES.clear()
    run_dir = tmp_path / "run"
    return resume_strategy(small_config(*overrides, f"tracking.run_dir={run_dir}", "tracking.resume=true"), run_dir)


def sent_fields(reply: Message) -> set[tuple[str, str]]:
    """(record, key) of everything a reply carries, in every record kind."""
    content = reply.content
    records = [*content.array_records.items(), *content.config_records.items(), *content.metric_records.items()]
    return {(name, key) for name, record in records for key in record}


def declared_fields(kind: str) -> set[tuple[str, str]]:
    """(record, key) of every field protocol.SITE_REPLY_FIELDS declares for ``kind``."""
    return {(f.record, f.key) for f in P.SITE_REPLY_FIELDS[kind]}


class SecureGrid(InProcessGrid):
    """Delivers each Message through the real ClientApp (its mods too: SecAgg+), as a copy, the
    way a wire would. ``lost`` maps a node to the SecAgg+ stages at which it no longer answers
    (it dropped out); ``replies`` keeps (node, stage, reply) of everything delivered back."""

    def __init__(self, cfg, tmp_path, nodes=NODES, lost=None, **node_extra) -> None:
        super().__init__(cfg, tmp_path, nodes)
        for context in self.contexts.values():
            context.node_config.update(node_extra)
        self.lost = lost or {}
        self.replies: list[tuple[int, str, Message]] = []
        self.app = None  # the ClientApp that answers; None: clients.client_app.app

    @property
    def run(self):
        from types import SimpleNamespace

        return SimpleNamespace(run_id=4242)

    def send_and_receive(self, messages, *, timeout=None):
        import copy

        from clients import client_app

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            stage = str(m.content.config_records.get(P.SECAGG_CONFIGS, {}).get("stage", ""))
            if stage in self.lost.get(node, ()):
                continue
            delivered = Message(
                content=copy.deepcopy(m.content),
                dst_node_id=node,
                message_type=m.metadata.message_type,
                group_id=m.metadata.group_id,
            )
            reply = (self.app or client_app.app)(delivered, self.contexts[node])
            self.replies.append((node, stage, reply))
            replies.append(reply)
        return replies
