"""What the server knows of each site it asked: the strategy's record behind summary.json's "sites",
and the error that stops a run when too few of them count."""

from __future__ import annotations

from dataclasses import dataclass, field


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
