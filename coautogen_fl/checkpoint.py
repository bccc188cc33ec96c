"""The server's checkpoint: what a crashed run needs to continue without asking anyone twice.

After every finished voting round the server writes ``<run_dir>/checkpoint.json`` atomically:
the run key the sites' ledgers know the run by, the plan (noise multiplier, rounds), and for
each finished round the summed noised votes the evolution advanced with (and ``-f Active``'s
summed noised class errors), their noise std and the ids of the candidates they were cast on;
plus the server's record of every site (spend, refusals, failures) and its node-sampling state.

The pool, the generator's refit distribution and the selection randomness are not pickled:
they are a deterministic function of the config (all non-DP randomness is seeded) and of the
votes, so a resumed run rebuilds them by replaying the finished rounds through the same code
and checks that every replayed pool has exactly the candidate ids that were voted on. A
generator that cannot reproduce its pool (an online API, a non-deterministic GPU kernel) is
refused with a clear error rather than silently continuing with other candidates. The votes
themselves are released values: replaying them costs no privacy.

A ``-tt real`` or ``mix`` run adds its DP-SGD rounds (:class:`TrainingRecord`): how many
finished and their metrics. The global weights after each (and the starting model, before the
first) are in ``training/round-NNNN.npz``, the pooled modes' optimiser state beside them: a
resumed run sends the sites exactly the weights the crashed run would have sent, so a site that
already paid for that round replays its stored release instead of charging again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_VERSION = 1
#: Why a finished run is not resumed: its final stage would ask the sites again.
RESUME_COMPLETED = (
    "{run_dir} is a completed run (summary.json status completed): there is nothing to resume, and "
    "running its final stage again would ask the sites again. Start a new run"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the run being resumed."""


@dataclass
class RoundRecord:
    """One finished voting round."""

    round: int
    votes: list[float]  # the summed noised votes, one per candidate, as the evolution used them
    noise_std: float
    candidate_ids: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)  # the round's metrics.jsonl line
    class_errors: list[float] | None = None  # -f Active: the summed noised class errors the round released


@dataclass
class TrainingRecord:
    """The DP-SGD rounds (``-tt real``/``mix``) finished so far."""

    done: int  # rounds finished; 0 = the starting model is saved and round 1 may have been asked
    history: list[dict[str, Any]] = field(default_factory=list)  # each finished round's metrics
    accuracy_synthetic: float | None = None  # mix: the synthetic-data model's central accuracy


@dataclass
class Checkpoint:
    """Everything a resumed run cannot rebuild from its config."""

    run_key: str
    noise_multiplier: float
    rounds: int
    completed: list[RoundRecord] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    sampled: dict[str, list[int]] = field(default_factory=dict)
    planned_sites: int = 0
    node_rng_state: list[Any] = field(default_factory=list)
    training: TrainingRecord | None = None
    version: int = CHECKPOINT_VERSION

    @property
    def completed_rounds(self) -> int:
        return len(self.completed)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``checkpoint.json`` atomically (a crash leaves the previous one intact)."""
        return write_text_atomic(Path(run_dir) / CHECKPOINT_FILE, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path) -> "Checkpoint":
        """The checkpoint of ``run_dir``; :class:`CheckpointError` naming the fix otherwise."""
        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(
                f"nothing to resume in {run_dir}: no {CHECKPOINT_FILE} (the run finished no voting round and "
                "started no DP-SGD round). Start a new run instead"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {CHECKPOINT_VERSION}")
            data["completed"] = [RoundRecord(**r) for r in data["completed"]]
            if data.get("training") is not None:
                data["training"] = TrainingRecord(**data["training"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(
                f"{path} is unreadable ({exc}); restore it from a backup or start a new run"
            ) from None


def check_resumable(run_dir: str | Path) -> None:
    """Raise :class:`CheckpointError` if ``run_dir`` holds a completed run (its summary.json says so)."""
    path = Path(run_dir) / "summary.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return  # no summary (the run crashed before writing one) or an unreadable one: resumable
    if status == "completed":
        raise CheckpointError(RESUME_COMPLETED.format(run_dir=run_dir))
