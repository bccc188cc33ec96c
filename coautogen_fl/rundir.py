"""Where a run's files go, and where a simulated site keeps its privacy ledger."""

from __future__ import annotations

import time
from pathlib import Path

from .config import RunConfig

#: Where relative ``tracking.out_dir`` / ``tracking.run_dir`` land when the ServerApp is started by
#: ``flwr run`` (simulation or deployment): a fixed place, never the SuperLink's working directory.
#: ``coautogen run`` resolves them against the directory it was launched from instead.
RELATIVE_PATHS_BASE = Path("~/coautogen-fl")


def absolute(path: str | Path, base: Path | None = None) -> Path:
    """``path`` made absolute: ``~`` expanded, relative paths under ``base`` (default
    :data:`RELATIVE_PATHS_BASE`)."""
    target = Path(path).expanduser()
    if not target.is_absolute():
        target = (base if base is not None else RELATIVE_PATHS_BASE).expanduser() / target
    return target.resolve()


def resolve_run_dir(cfg: RunConfig, run_id: int | str = "", base: Path | None = None) -> Path:
    """``tracking.run_dir`` if set, else ``<out_dir>/<run_name>`` (a timestamped name by default).

    Always absolute: the ServerApp and ClientApps run in other working directories, so a relative
    path is taken under ``base`` (``coautogen run``: the launching directory; otherwise
    ``~/coautogen-fl``).
    """
    t = cfg.tracking
    if t.run_dir:
        return absolute(t.run_dir, base)
    name = t.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.feedback.framework.lower()}" + (
        f"-{run_id}" if run_id else ""
    )
    return absolute(Path(t.out_dir) / name, base)


def default_site_state_dir(cfg: RunConfig, run_id: int | str, partition_id: int) -> Path:
    """A simulated site's state dir when its node config names none.

    Under the run directory when it is known (a simulation is a fresh set of hospitals), else
    under the user's cache keyed by the Flower run id. Real sites set ``state-dir`` in their
    node config so that their ledger persists across runs.
    """
    if cfg.tracking.run_dir:
        return absolute(cfg.tracking.run_dir) / "sites" / f"site-{partition_id}"
    return Path.home() / ".cache" / "coautogen-fl" / "state" / f"run-{run_id}" / f"site-{partition_id}"
