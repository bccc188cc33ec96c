"""A site's record of what it released, so that a resumed run is never charged twice.

When a server crashes and its run is resumed, it asks again the round that was in flight. A
site that already paid for that round of that run (same run key, same round) answers with the
release it stored, byte for byte, and charges nothing: sending the same noised values again
reveals nothing new. If the repeated request differs in any way (other candidates, another
noise multiplier), the site refuses: answering would be a second release of the same round.

A release is stored before it leaves the site, and before its ledger charge the site records what
the charge is for (:meth:`ReleaseStore.intend`: the request's fingerprint and the charge's terms).
So a charge without a stored release (a crash between the charge and the store, e.g. during local
DP-SGD) is a charge whose release never left the site: the same request is then answered with a
fresh release under that charge (:meth:`ReleaseStore.paid`), which is the one release it paid for.
A charge without such a record, or recorded for another request or other terms, is refused.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic


class ReleaseMismatchError(PermissionError):
    """This round of this run was already released for a different request (or cannot be replayed)."""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


class ReleaseStore:
    """Stored releases under ``<state dir>/releases/<run key>/<kind>-<round>.json``.

    Parameters
    ----------
    folder : Path
        The site's ``releases`` folder (created on the first save).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """One release at a time for this site, across processes: the look-up, the ledger charge
        and the store are one step, so a late copy of a request (a restarted SuperLink handing out
        a message of the crashed run) and the resumed request cannot interleave."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _path(self, run_key: str, kind: str, round: int) -> Path:
        return self.folder / _safe(run_key) / f"{_safe(kind)}-{int(round):04d}.json"

    def _intent_path(self, run_key: str, kind: str, round: int) -> Path:
        return self._path(run_key, kind, round).with_suffix(".intent.json")

    def _intent(self, run_key: str, kind: str, round: int) -> dict[str, Any] | None:
        path = self._intent_path(run_key, kind, round)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def intend(self, run_key: str, kind: str, round: int, fingerprint: str, terms: dict[str, Any]) -> Path:
        """Record, before the ledger charge, which request and which terms the charge pays for."""
        payload = {"fingerprint": fingerprint, "terms": terms}
        return write_text_atomic(self._intent_path(run_key, kind, round), json.dumps(payload) + "\n")

    def paid(self, run_key: str, kind: str, round: int, fingerprint: str, terms: dict[str, Any], charged: bool) -> bool:
        """Whether the ledger's charge for this round (``charged``) already pays for this very
        request, unreleased: it was recorded (:meth:`intend`) for the same fingerprint and terms, and
        no release was stored (call after :meth:`lookup` found none). False when nothing is charged.

        Raises
        ------
        ReleaseMismatchError
            The round is charged but not recorded as a charge for this request, or recorded under
            other terms (the site's own terms changed since): it cannot tell what the charge paid
            for, and answering would charge twice.
        """
        if not charged:
            return False
        intent = self._intent(run_key, kind, round)
        if intent is None or intent.get("fingerprint") != fingerprint:
            raise ReleaseMismatchError(
                f"round {round} of run {run_key!r} ({kind}) is charged in the ledger "
                "but its release was not stored, and the charge is not recorded as one for this request: "
                "it cannot be replayed, and answering again would charge twice"
            )
        if intent.get("terms") != terms:
            raise ReleaseMismatchError(
                f"round {round} of run {run_key!r} ({kind}) was charged under {intent.get('terms')}, this request "
                f"needs {terms}: the site's terms changed since the charge, and charging again would charge twice"
            )
        return True

    def lookup(self, run_key: str, kind: str, round: int, fingerprint: str) -> dict[str, Any] | None:
        """The stored release for this exact request, or None when the round was never released
        (whether a charge already pays for it is :meth:`paid`'s question).

        Raises
        ------
        ReleaseMismatchError
            The round was released for another request.
        """
        path = self._path(run_key, kind, round)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("fingerprint") != fingerprint:
            raise ReleaseMismatchError(
                f"round {round} of run {run_key!r} ({kind}) was already released for a different request; "
                "a second release of the same round is refused"
            )
        return stored["values"]

    def save(self, run_key: str, kind: str, round: int, fingerprint: str, values: dict[str, Any]) -> Path:
        """Store a release atomically, before it leaves the site."""
        payload = {"run_key": run_key, "kind": kind, "round": int(round), "fingerprint": fingerprint, "values": values}
        path = write_text_atomic(self._path(run_key, kind, round), json.dumps(payload) + "\n")
        self._intent_path(run_key, kind, round).unlink(missing_ok=True)  # the release supersedes it
        return path
