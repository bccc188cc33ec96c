"""A Flower client mod that records everything a site sends, for the site's own audit.

Set ``COAUTOGEN_WIRE_LOG=/abs/path/wire.jsonl`` in the SuperNode's environment and every reply
this ClientApp sends is appended to that file, one JSON line per reply: its message type, the
error code and reason of an error reply, or each record's keys with their values (arrays as
dtype, shape and values). A privacy officer can then check the log against
:data:`coautogen_fl.protocol.SITE_REPLY_FIELDS`; ``tests/test_wire.py`` does exactly that.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Callable

from flwr.app import Context, Message

WIRE_LOG_ENV = "COAUTOGEN_WIRE_LOG"


def reply_fields(reply: Message) -> dict[str, Any]:
    """What a reply carries, as plain JSON values."""
    entry: dict[str, Any] = {"message_type": reply.metadata.message_type}
    if reply.has_error():
        entry["error"] = {"code": int(reply.error.code), "reason": str(reply.error.reason)}
        return entry
    content = reply.content
    entry["arrays"] = {
        name: {
            k: {"dtype": str(a.numpy().dtype), "shape": list(a.numpy().shape), "values": a.numpy().tolist()}
            for k, a in rec.items()
        }
        for name, rec in content.array_records.items()
    }
    entry["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
    entry["configs"] = {name: {k: _plain(v) for k, v in rec.items()} for name, rec in content.config_records.items()}
    return entry


def _plain(value: Any) -> Any:
    """A config value as JSON: bytes (SecAgg+'s keys, shares, masked vectors) as hex."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def make_wire_log_mod(path: str) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """A mod appending every outgoing reply to ``path`` (JSON lines, locked appends)."""

    def wire_log_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        line = json.dumps({"node_config": {k: str(v) for k, v in context.node_config.items()}, **reply_fields(reply)})
        with open(path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # several simulated sites may share one log
            fh.write(line + "\n")
        return reply

    return wire_log_mod


def wire_log_mods() -> list:
    """The mods the ClientApp installs: the wire log when ``COAUTOGEN_WIRE_LOG`` is set."""
    path = os.environ.get(WIRE_LOG_ENV, "")
    return [make_wire_log_mod(path)] if path else []
