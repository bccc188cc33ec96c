"""A site's own, persisted record of the privacy it has spent.

A site never trusts the server's schedule: before it releases noised votes it charges the
release to this ledger, which refuses anything that would exceed the site's budget. The
ledger lives in a JSON file under the site's state directory and survives restarts; it is
written atomically so a crash can never leave a half-written (or silently empty) record.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import write_text_atomic
from .accountant import (
    PrivacyError,
    _check_int,
    _check_kind,
    _check_noise,
    epsilon_for_releases,
    validate_epsilon_delta,
)

LEDGER_VERSION = 1
# Calibrated schedules land exactly on the budget up to float rounding in the root finders.
BUDGET_RTOL = 1e-6


def _check_rate(sample_rate: float) -> float:
    q = float(sample_rate)
    if not 0.0 < q <= 1.0:  # rejects nan
        raise PrivacyError(f"sample_rate must satisfy 0 < sample_rate <= 1 (got {sample_rate!r}); use 1.0 for a vote")
    return q


class BudgetExceededError(RuntimeError):
    """A charge would exceed the site's epsilon budget; nothing was recorded.

    Attributes
    ----------
    requested : float
        Total epsilon the site would have spent after the refused charge.
    spent : float
        Epsilon already spent (unchanged).
    budget : float
        The site's epsilon budget.
    """

    def __init__(self, message: str, requested: float, spent: float, budget: float) -> None:
        super().__init__(message)
        self.requested, self.spent, self.budget = requested, spent, budget


class LedgerCorruptError(RuntimeError):
    """The ledger file exists but cannot be read; it is never reset automatically."""


@dataclass(frozen=True)
class LedgerEntry:
    """One charged release: its noise multiplier, round, run id and UTC ISO timestamp.

    A DP-SGD release (``-tt real`` / ``mix``) also has its Poisson ``sample_rate`` < 1 and its
    number of ``steps``; a vote or evaluation release is one full-participation Gaussian
    (sample rate 1, one step), and is written without those two keys, as before they existed.
    A distributed discrete Gaussian sum through secure aggregation has ``kind="ddg"`` and its
    equivalent noise multiplier (:func:`~coautogen_fl.privacy.distributed.ddg_noise_multiplier`);
    ``kind`` is written only when it is not ``"gaussian"``.
    """

    noise_multiplier: float
    round: int
    run_id: str
    timestamp: str
    sample_rate: float = 1.0
    steps: int = 1
    kind: str = "gaussian"

    @property
    def release(self) -> tuple[float, float, int, str]:
        """``(noise_multiplier, sample_rate, steps, kind)``, as :func:`epsilon_for_releases` takes it."""
        return (self.noise_multiplier, self.sample_rate, self.steps, self.kind)

    def to_json(self) -> dict:
        """The entry in the file: a Gaussian release keeps the four keys of ledger files of old."""
        data = asdict(self)
        if self.sample_rate == 1.0 and self.steps == 1:
            del data["sample_rate"], data["steps"]
        if self.kind == "gaussian":
            del data["kind"]
        return data


class PrivacyLedger:
    """Persistent (epsilon, delta) budget of one site, composed exactly with Gaussian DP.

    Parameters
    ----------
    path : str or os.PathLike
        JSON file of the ledger. Loaded if it exists; otherwise the ledger starts empty and
        the file (and its directory) is created on the first charge.
    epsilon_budget : float
        Maximum total epsilon the site will ever spend through this ledger, > 0.
    delta : float
        Delta at which all spending is measured, 0 < delta < 1. Fixed for the life of the
        file: an existing ledger created with another delta is refused.

    Raises
    ------
    PrivacyError
        On invalid budget/delta, or if the file was created with a different delta.
    LedgerCorruptError
        If the file exists but is not a valid ledger.
    """

    def __init__(self, path: str | os.PathLike, epsilon_budget: float, delta: float) -> None:
        validate_epsilon_delta(epsilon_budget, delta)
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self._entries: list[LedgerEntry] = []
        if self.path.exists():
            self._load()

    def _corrupt(self, reason: str) -> LedgerCorruptError:
        return LedgerCorruptError(
            f"privacy ledger {str(self.path)!r} is corrupt ({reason}). It is NOT reset "
            "automatically because the site's privacy depends on it: restore it from a "
            "backup, or, if this site's data has never been used, delete the file or use a "
            "new state dir."
        )

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"cannot read JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise self._corrupt("expected an object with an 'entries' list")
        stored_delta = data.get("delta")
        if not isinstance(stored_delta, (int, float)) or not 0 < stored_delta < 1:
            raise self._corrupt(f"invalid delta {stored_delta!r}")
        if not math.isclose(stored_delta, self.delta, rel_tol=1e-12):
            # Spending measured at one delta cannot be re-read at another: that would let
            # a site re-spend budget by switching delta.
            raise PrivacyError(
                f"privacy ledger {str(self.path)!r} was created with delta={stored_delta!r} "
                f"but privacy.delta={self.delta!r} was given; keep privacy.delta="
                f"{stored_delta!r} for this site, or use a new state dir for a new ledger"
            )
        entries = []
        for i, raw in enumerate(data["entries"]):
            try:
                entry = LedgerEntry(
                    noise_multiplier=_check_noise(raw["noise_multiplier"]),
                    round=_check_int(raw["round"], "round", 0, "fix the entry"),
                    run_id=str(raw["run_id"]),
                    timestamp=str(raw["timestamp"]),
                    sample_rate=_check_rate(raw.get("sample_rate", 1.0)),
                    steps=_check_int(raw.get("steps", 1), "steps", 1, "fix the entry"),
                    kind=_check_kind(raw.get("kind", "gaussian")),
                )
                if entry.kind == "ddg" and entry.sample_rate != 1.0:
                    raise ValueError("a 'ddg' entry must have sample_rate 1.0")
            except (TypeError, KeyError, ValueError) as exc:
                raise self._corrupt(f"entry {i} is invalid: {exc!r}") from exc
            entries.append(entry)
        self._entries = entries

    @property
    def entries(self) -> list[LedgerEntry]:
        """All charged releases, oldest first (a copy)."""
        return list(self._entries)

    @property
    def rounds_charged(self) -> int:
        """Number of releases charged so far (across all runs)."""
        return len(self._entries)

    def spent_epsilon(self) -> float:
        """Epsilon spent so far at the ledger's delta: exact GDP composition while every release is
        a full-participation Gaussian, opacus PRV over all of them once a DP-SGD release is in, opacus
        RDP over all of them once a distributed discrete Gaussian (``kind="ddg"``) release is in."""
        return epsilon_for_releases([e.release for e in self._entries], self.delta)

    def remaining_epsilon(self) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.epsilon_budget - self.spent_epsilon())

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 1, kind: str = "gaussian"
    ) -> float:
        """Total epsilon that would be spent after one more release (defaults: one Gaussian release)."""
        extra = (
            _check_noise(noise_multiplier),
            _check_rate(sample_rate),
            _check_int(steps, "steps", 1, "pass >= 1"),
            _check_kind(kind),
        )
        return epsilon_for_releases([e.release for e in self._entries] + [extra], self.delta)

    def has_charge(self, run_id: str, round: int) -> bool:
        """Whether a release of ``round`` of run ``run_id`` is already charged (read from the file)."""
        with self._exclusive_lock():
            return any(e.run_id == str(run_id) and e.round == int(round) for e in self._entries)

    def charge(
        self,
        noise_multiplier: float,
        round: int,
        run_id: str = "",
        sample_rate: float = 1.0,
        steps: int = 1,
        kind: str = "gaussian",
    ) -> float:
        """Record one release, or refuse it if it would exceed the budget.

        Parameters
        ----------
        noise_multiplier : float
            Noise multiplier of the release about to be made, > 0.
        round : int
            Round number reported by the server (for the record only; the budget check
            never trusts it).
        run_id : str (default: "")
            Identifier of the run requesting the release.
        sample_rate : float (default: 1.0)
            Poisson sampling probability of a DP-SGD release (public); 1.0 for a vote/evaluation.
        steps : int (default: 1)
            DP-SGD steps of the release; 1 for a vote/evaluation.
        kind : str (default: "gaussian")
            ``"gaussian"``, or ``"ddg"`` for a distributed discrete Gaussian sum through secure
            aggregation, charged at its equivalent noise multiplier
            (:func:`~coautogen_fl.privacy.distributed.ddg_noise_multiplier`) with sample rate 1.

        Returns
        -------
        float
            Total epsilon spent after this charge.

        Raises
        ------
        BudgetExceededError
            If the new total exceeds ``epsilon_budget * (1 + 1e-6)``; nothing is written.
        PrivacyError
            On an invalid argument (e.g. an unknown kind, or a ``"ddg"`` release with sample_rate < 1).
        """
        round = _check_int(round, "round", 0, "pass the server's round number")
        _check_noise(noise_multiplier)  # bad arguments touch nothing, not even the lock file
        _check_rate(sample_rate)
        steps = _check_int(steps, "steps", 1, "pass the number of DP-SGD steps (1 for a vote)")
        kind = _check_kind(kind)
        if kind == "ddg" and float(sample_rate) != 1.0:
            raise PrivacyError(
                f"sample_rate of a 'ddg' release must be 1.0 (got {sample_rate!r}); a secure-aggregation "
                "sum is charged as one full-participation release"
            )
        with self._exclusive_lock():
            return self._charge_locked(noise_multiplier, round, run_id, float(sample_rate), steps, kind)

    @contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<ledger>.lock`` and re-read the file under it.

        The file, not this object, is the record: several processes (simulation workers, a
        restarted site) may serve the same site, and a stale in-memory copy must never be
        written back over charges another process made.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._entries = []
                if self.path.exists():
                    self._load()
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _charge_locked(
        self, noise_multiplier: float, round: int, run_id: str, sample_rate: float, steps: int, kind: str
    ) -> float:
        new_total = self.epsilon_after(noise_multiplier, sample_rate, steps, kind)
        if new_total > self.epsilon_budget * (1.0 + BUDGET_RTOL):
            spent = self.spent_epsilon()  # only for the message: a PRV composition is not free
            raise BudgetExceededError(
                f"privacy budget exceeded: round {round} (run {run_id!r}) at noise_multiplier "
                f"{float(noise_multiplier):g} ({kind}) would bring this site's epsilon to "
                f"{new_total:.6g} (requested), above its budget {self.epsilon_budget:.6g} "
                f"(already spent {spent:.6g} over {self.rounds_charged} releases, delta "
                f"{self.delta:g}); the release was refused and nothing was recorded",
                requested=new_total,
                spent=spent,
                budget=self.epsilon_budget,
            )
        entry = LedgerEntry(
            noise_multiplier=float(noise_multiplier),
            round=round,
            run_id=str(run_id),
            timestamp=datetime.now(timezone.utc).isoformat(),
            sample_rate=sample_rate,
            steps=steps,
            kind=kind,
        )
        # Persist first: if the write fails, memory must not claim a charge the file lacks.
        self._write(self._entries + [entry])
        self._entries.append(entry)
        return new_total

    def _write(self, entries: list[LedgerEntry]) -> None:
        data = {
            "version": LEDGER_VERSION,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,  # informational; the caller's value rules
            "entries": [e.to_json() for e in entries],
        }
        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")
