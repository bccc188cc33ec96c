"""What the server knows of each site it asked: the strategy's record behind summary.json's "sites",
the bookkeeping of replies that count or do not, and the error that stops a run when too few count."""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common import log
from flwr.common.constant import ErrorCode

from coautogen_fl import protocol as P


class RoundFailed(RuntimeError):
    """Too few sites sent valid votes (or completed SecAgg+) for a round to carry private signal;
    the run stops."""


@dataclass
class SiteRecord:
    """What the server knows of one site: its partition id, its own budget and reported spend,
    and what became of every request it was sent."""

    partition_id: int
    node_id: int = 0
    label: str = ""  # the site's own name (node config site-name), if it set one
    epsilon_spent: float = 0.0
    epsilon_budget: float | None = None
    rounds_answered: int = 0
    evaluations_answered: int = 0
    refusals: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The site's own name if it set one, else its partition id, else ``node-<id>``."""
        if self.label:
            return self.label
        return str(self.partition_id) if self.partition_id >= 0 else f"node-{self.node_id}"

    @property
    def status(self) -> str:
        """answered (at least one request), else refused (on its own terms), failed, or not asked."""
        if self.rounds_answered or self.evaluations_answered:
            return "answered"
        return "refused" if self.refusals else "failed" if self.failures else "not asked"


#: Error replies Flower itself makes, by its code (``flwr.common.constant.ErrorCode``); their text
#: (tracebacks of a ClientApp that raised) is never recorded.
FLOWER_ERRORS = {
    ErrorCode.NODE_UNAVAILABLE: "failed: the node was lost (Flower: node unavailable)",
    ErrorCode.CLIENT_APP_CRASHED: "failed: the site's ClientApp crashed",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "failed: the site's ClientApp raised an exception",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "failed: the site could not load its ClientApp",
    ErrorCode.MESSAGE_UNAVAILABLE: "failed: Flower lost the request",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "failed: Flower lost the reply",
}


class SiteBook:
    """The strategy's bookkeeping of sites (a mixin of :class:`strategies.strategy.CoAutoGenStrategy`):
    which site a reply is about, what it answered, why a reply did not count.

    Uses the strategy's ``cfg``, ``sites`` (node -> :class:`SiteRecord`), ``dropped`` (summary.json's
    dropped replies), ``sampled`` (round -> nodes asked) and ``_outbox`` / ``_sent_to`` (this round's
    requests and their message ids).
    """

    cfg: Any
    sites: dict[int, SiteRecord]
    dropped: list[dict[str, Any]]
    sampled: dict[int, list[int]]
    _outbox: list[Message]
    _sent_to: dict[str, int]

    def sender(self, msg: Message) -> int:
        """The site a reply is about: the node its request went to. An error reply Flower makes
        itself (a lost node) comes from the SuperLink's id, not from the site's."""
        if len(self._sent_to) != len(self._outbox):  # the Grid sets message ids when it sends
            self._sent_to = {
                m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox if m.metadata.message_id
            }
        return self._sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _site(self, msg: Message, partition_id: int = -1, label: str = "") -> SiteRecord:
        return self._site_of(self.sender(msg), partition_id, label)

    def _site_of(self, node: int, partition_id: int = -1, label: str = "") -> SiteRecord:
        record = self.sites.setdefault(node, SiteRecord(-1, node))
        record.label = label or record.label
        if partition_id >= 0 and record.partition_id != partition_id:
            record.partition_id = partition_id
            self._merge_earlier_records(record)
        return record

    def _merge_earlier_records(self, record: SiteRecord) -> None:
        """A resumed simulation gives the same site a new node id: fold the record the crashed
        run kept under the old id into the new one (the partition id names the site)."""
        for node, earlier in list(self.sites.items()):
            if earlier is not record and earlier.partition_id == record.partition_id:
                record.rounds_answered += earlier.rounds_answered
                record.evaluations_answered += earlier.evaluations_answered
                record.epsilon_spent = max(record.epsilon_spent, earlier.epsilon_spent)
                record.epsilon_budget = (
                    record.epsilon_budget if record.epsilon_budget is not None else earlier.epsilon_budget
                )
                record.refusals[:0], record.failures[:0] = earlier.refusals, earlier.failures
                del self.sites[node]

    def _drop(self, server_round: int, msg: Message, reason: str, refused: bool = False) -> None:
        self.note_failure(server_round, self.sender(msg), reason, refused)

    def note_failure(self, server_round: int, node: int, reason: str, refused: bool = False) -> None:
        """Record that ``node`` did not count in ``server_round``, and why (summary and log)."""
        log(
            WARNING,
            "round %d: %s reply of node %d: %s",
            server_round,
            "refused" if refused else "dropped",
            node,
            reason,
        )
        site = self._site_of(node)
        self.dropped.append(
            {"round": server_round, "node": node, "site": site.name, "refused": refused, "reason": reason}
        )
        (site.refusals if refused else site.failures).append(f"round {server_round}: {reason}")

    def _record_missing(self, server_round: int, replies: list[Message]) -> None:
        """Sites asked in this round that sent nothing back (lost, killed, timed out)."""
        answered = {self.sender(msg) for msg in replies}
        for node in self.sampled.get(server_round, []):
            if node not in answered:
                site = self.sites.setdefault(node, SiteRecord(-1, node))
                reason = "no reply (the node was lost, stopped or timed out)"
                log(WARNING, "round %d: node %d (site %s): %s", server_round, node, site.name, reason)
                self.dropped.append(
                    {"round": server_round, "node": node, "site": site.name, "refused": False, "reason": reason}
                )
                site.failures.append(f"round {server_round}: {reason}")

    def min_sites(self, server_round: int) -> int:
        """Valid vote replies a round needs: ``federation.min_sites``, or more than half of the
        sites asked."""
        return self.cfg.federation.min_sites or len(self.sampled.get(server_round, [])) // 2 + 1

    def _site_error(self, server_round: int, msg: Message, what: str = "") -> None:
        """Record an error reply: its code and the generic line the protocol gives it (never the
        text the site sent); a refusal on the site's own terms also goes to the site's record."""
        code = int(msg.error.code)
        reason = P.ERROR_REASONS.get(code) or FLOWER_ERRORS.get(code, "error reply with an unknown code")
        self._drop(server_round, msg, f"{what}{reason} (code {code})", refused=code in P.REFUSAL_CODES)

    def note_answer(self, node: int, bookkeeping: dict[str, Any]) -> None:
        """Record a site's counted vote reply: its public bookkeeping (spend, budget, name)."""
        site = self._site_of(node, bookkeeping["partition_id"], bookkeeping["site_label"])
        site.epsilon_spent = max(site.epsilon_spent, bookkeeping["epsilon_spent"])
        site.epsilon_budget = bookkeeping["epsilon_budget"]
        site.rounds_answered += 1
