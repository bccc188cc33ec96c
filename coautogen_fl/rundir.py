"""Where a run's files go, and where a simulated site keeps its privacy ledger."""

from __future__ import annotations

import time
from pathlib import Path

from .config import RunConfig


def resolve_run_dir(cfg: RunConfig, run_id: int | str = "") -> Path:
    """``tracking.run_dir`` if set, else ``<out_dir>/<run_name>`` (a timestamped name by default).

    Always absolute: the ServerApp and ClientApps run in other working directories.
    """
    t = cfg.tracking
    if t.run_dir:
        return Path(t.run_dir).expanduser().resolve()
    name = t.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.feedback.framework.lower()}" + (f"-{run_id}" if run_id else "")
    return (Path(t.out_dir).expanduser() / name).resolve()


def default_site_state_dir(cfg: RunConfig, run_id: int | str, partition_id: int) -> Path:
    """A simulated site's state dir when its node config names none.

    Under the run directory when it is known (a simulation is a fresh set of hospitals), else
    under the user's cache keyed by the Flower run id. Real sites set ``state-dir`` in their
    node config so that their ledger persists across runs.
    """
    if cfg.tracking.run_dir:
        return Path(cfg.tracking.run_dir).expanduser().resolve() / "sites" / f"site-{partition_id}"
    return Path.home() / ".cache" / "coautogen-fl" / "state" / f"run-{run_id}" / f"site-{partition_id}"
