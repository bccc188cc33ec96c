"""A site's privacy terms, read from its own node config: the trust root of a deployment.

Nothing the server sends (the run config, a request) can raise a site's budget, change its
delta, make it trust the server, allow clear evaluation or move its ledger. Only in a
simulation, where one operator runs every site and Flower's simulation engine gives each node
nothing but ``partition-id`` and ``num-partitions``, does the run config stand in for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from coautogen_fl.config import RunConfig
from coautogen_fl.data import DataFolderError
from coautogen_fl.rundir import default_site_state_dir

#: The node config Flower's simulation engine gives every simulated node, and nothing more.
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})
#: The keys a site may set (others are refused, so a typo never silently weakens a term).
SITE_NODE_KEYS = SIMULATION_NODE_KEYS | {
    "data-path",
    "site-name",
    "state-dir",
    "site-epsilon",
    "site-delta",
    "trust-server",
    "allow-clear-evaluation",
    "secagg-trust-sites",
}
SITE_DEFAULT_DELTA = 1e-5
#: A deployed site's ledger and key when its node config names no state-dir: fixed, per user.
SITE_DEFAULT_STATE_DIR = Path("~/.local/state/coautogen-fl/site")


class SiteTermsError(ValueError):
    """The node config does not set the site's terms; the message names the key and the fix."""


class DataPathError(DataFolderError):
    """A deployed site's ``data-path`` is missing, empty, or names no ImageFolder with images: a
    configuration error of its operator, reported in one line naming the node config key (the
    server only sees ``protocol.ERROR_DATA_PATH``)."""


#: How a site's node config names its ImageFolder (in the messages of :class:`DataPathError`).
DATA_PATH_KEY = "node config data-path"
_DATA_PATH_FIX = (
    'set data-path="/abs/path/to/ImageFolder" (laid out as <class_name>/*.png) in the SuperNode\'s --node-config'
)


def site_data_path(node_config: Mapping[str, Any], operator_run: bool) -> Path | None:
    """The site's ImageFolder (node config ``data-path``), or None for a share of the bundled
    data (``partition-id`` and ``num-partitions``; in a simulation, the run's ``data.name``).

    Raises :class:`DataPathError` when ``data-path`` is set but empty, or when a deployed site
    names neither a ``data-path`` nor a partition: it would otherwise vote with data it does
    not hold. Whether the folder exists and holds images is checked when it is loaded.
    """
    if "data-path" in node_config:
        text = str(node_config["data-path"]).strip()
        if not text:
            raise DataPathError(f"node config data-path is empty; {_DATA_PATH_FIX}")
        return Path(text).expanduser()
    if not operator_run and "num-partitions" not in node_config:
        raise DataPathError(
            f"node config sets no data-path; {_DATA_PATH_FIX} "
            "(or partition-id and num-partitions for a share of the bundled digits)"
        )
    return None


def _flag(value: Any, key: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise SiteTermsError(f"node config {key}={value!r} is not a boolean; use {key}=true or {key}=false")


def _number(node_config: Mapping[str, Any], key: str, default: float | None) -> float:
    if key not in node_config:
        if default is None:
            raise SiteTermsError(
                f"this site's node config sets no privacy budget: add {key}=<epsilon> to the SuperNode's "
                "--node-config (e.g. site-epsilon=1.0); the site refuses to vote until it does"
            )
        return default
    try:
        value = float(node_config[key])
    except (TypeError, ValueError):
        raise SiteTermsError(f"node config {key}={node_config[key]!r} is not a number") from None
    if not value > 0:
        raise SiteTermsError(f"node config {key}={value!r} must be > 0")
    return value


def _count(node_config: Mapping[str, Any], key: str, default: int) -> int:
    value = node_config.get(key, default)
    try:
        number = int(str(value))
    except ValueError:
        raise SiteTermsError(f"node config {key}={value!r} is not a whole number; e.g. {key}=3") from None
    if number < 1:
        raise SiteTermsError(f"node config {key}={number} must be >= 1 (1: this site adds all the noise itself)")
    return number


@dataclass(frozen=True)
class SiteTerms:
    """What a site agrees to.

    Attributes
    ----------
    epsilon_budget : float
        Its total budget over all runs (``site-epsilon``; required in a deployment).
    delta : float
        The delta its ledger measures spending at (``site-delta``, default 1e-5).
    trusts_server : bool
        Whether it sends clean votes when a run asks for central mode (``trust-server``,
        default false).
    allow_clear_evaluation : bool
        Whether it releases its test accuracy without noise (``allow-clear-evaluation``,
        default false).
    state_dir : Path
        Where its ledger and secret key live (``state-dir``, default
        ``~/.local/state/coautogen-fl/site``: the same for every run).
    operator_run : bool
        True in a simulation, where the run config stood in for all of the above.
    secagg_trust_sites : int
        In a secure-aggregation round, the most sites whose noise this site counts on being in
        the sum (``secagg-trust-sites``, default 1: it adds the full noise itself, as in local
        mode). It adds the share for ``min(this, the round's threshold)`` sites. 0 in a
        simulation: the round's threshold.
    """

    epsilon_budget: float
    delta: float
    trusts_server: bool
    allow_clear_evaluation: bool
    state_dir: Path
    operator_run: bool
    secagg_trust_sites: int = 0

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], cfg: RunConfig, run_id: int | str, partition_id: int
    ) -> "SiteTerms":
        """The site's terms: from its node config, or from the run config in a simulation."""
        unknown = sorted(set(node_config) - SITE_NODE_KEYS)
        if unknown:
            raise SiteTermsError(
                f"unknown node config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(SITE_NODE_KEYS))}"
            )
        if set(node_config) <= SIMULATION_NODE_KEYS:
            p = cfg.privacy
            return cls(
                p.epsilon,
                p.delta,
                p.mode == "central",
                p.evaluation == "clear",
                default_site_state_dir(cfg, run_id, partition_id),
                operator_run=True,
            )
        state_dir = Path(str(node_config.get("state-dir") or SITE_DEFAULT_STATE_DIR)).expanduser()
        return cls(
            epsilon_budget=_number(node_config, "site-epsilon", None),
            delta=_number(node_config, "site-delta", SITE_DEFAULT_DELTA),
            trusts_server=_flag(node_config.get("trust-server", False), "trust-server"),
            allow_clear_evaluation=_flag(node_config.get("allow-clear-evaluation", False), "allow-clear-evaluation"),
            state_dir=state_dir,
            operator_run=False,
            secagg_trust_sites=_count(node_config, "secagg-trust-sites", 1),
        )

    def secagg_summands(self, threshold: int) -> int:
        """How many sites' noise this site counts on in a secure sum of threshold ``threshold``."""
        return min(threshold, self.secagg_trust_sites) if self.secagg_trust_sites else threshold
