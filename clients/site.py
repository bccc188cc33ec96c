"""One site's private state, built once per process and reused across rounds: its data
partition, the embeddings of its private images, and its privacy ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from coautogen_fl import protocol as P
from coautogen_fl.config import RunConfig
from coautogen_fl.data import SitePartition, load_pool_and_test, load_site_from_folder, site_partition
from coautogen_fl.device import resolve_device
from coautogen_fl.embedding import build_embedder
from coautogen_fl.privacy import GaussianMechanism, PrivacyError, PrivacyLedger
from coautogen_fl.rater import build_rater, normalise_site_vector
from coautogen_fl.rundir import default_site_state_dir


@dataclass
class VoteResult:
    votes: np.ndarray
    epsilon_spent: float
    noise_multiplier: float


class Site:
    """A site: private data, its embeddings (computed once), its own ledger.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration (data shape, embedder, privacy defaults).
    node_config : mapping
        The SuperNode's own settings: ``partition-id`` and ``num-partitions`` (simulation) or
        ``data-path`` (a real site's ImageFolder), ``state-dir`` (ledger folder) and
        ``site-epsilon`` (its own budget, default the run's epsilon; the server cannot raise it),
        ``trust-server`` (whether it sends clean votes in central mode; default: the run's mode).
    run_id : int or str
        The Flower run id (names the default state dir).
    """

    def __init__(self, cfg: RunConfig, node_config: Mapping[str, Any], run_id: int | str = "") -> None:
        self.cfg = cfg
        self.partition_id = int(node_config.get("partition-id", 0))
        self.data = self._load_data(cfg, node_config)
        device = resolve_device(cfg.device, cfg.device_id)
        self.embedder = build_embedder(cfg.embedder, device)
        self.embeddings = self.embedder.embed(self.data.train.images) if len(self.data.train) else np.zeros((0, 1))
        state_dir = Path(str(node_config.get("state-dir", "") or default_site_state_dir(cfg, run_id, self.partition_id)))
        budget = float(node_config.get("site-epsilon", cfg.privacy.epsilon))
        # Central mode sends clean votes: only to a server the site trusts. Default: what the
        # run's own config (chosen by whoever launched the simulation) says.
        trust = node_config.get("trust-server", cfg.privacy.mode == "central")
        self.trusts_server = str(trust).lower() in ("1", "true", "yes")
        self.ledger = PrivacyLedger(state_dir.expanduser() / "privacy_ledger.json", budget, cfg.privacy.delta)

    def _load_data(self, cfg: RunConfig, node_config: Mapping[str, Any]) -> SitePartition:
        if node_config.get("data-path"):
            return load_site_from_folder(str(node_config["data-path"]), cfg.data, self.partition_id)
        num_partitions = int(node_config.get("num-partitions", cfg.federation.num_hospitals))
        pool, _ = load_pool_and_test(cfg.data)
        return site_partition(pool, self.partition_id, num_partitions, cfg.data)

    @property
    def num_examples(self) -> int:
        return len(self.data.train)

    def vote(self, embeddings: np.ndarray, labels: np.ndarray, request: Mapping[str, Any]) -> VoteResult:
        """Clean votes, then (local mode) noise, then the ledger charge, in that order.

        The ledger is charged before anything leaves the site; a charge past the site's
        budget raises ``BudgetExceededError`` and nothing is released.
        """
        mode, unit = str(request["privacy-mode"]), str(request["privacy-unit"])
        if mode not in ("local", "central") or unit not in ("image", "site"):
            # Never guess: an unknown mode could mean "release clean votes".
            raise PrivacyError(f"privacy-mode {mode!r} / privacy-unit {unit!r} not understood; expected local|central and image|site")
        if mode == "central" and not self.trusts_server:
            raise PrivacyError("the server asked for central mode (clean votes) but this site's node config says trust-server=false")
        rater = build_rater(str(request["rater"]), int(request["k"]))
        votes = rater.score(self.embeddings, self.data.train.labels, embeddings.astype(np.float32), labels)
        if unit == "site":
            votes = normalise_site_vector(votes)
        sigma = float(request["noise-multiplier"])
        if mode == "local":
            # OS entropy, never a configured seed: the server must not be able to predict the noise.
            votes = GaussianMechanism(sigma, rater.sensitivity).apply(votes, np.random.default_rng())
        spent = self.ledger.charge(sigma, round=int(request["round"]), run_id=str(request.get("run-id", "")))
        return VoteResult(votes, spent, sigma)

    def release_counts(self, correct: float, count: int, sigma: float, round: int, run_id: str = "") -> dict[str, float]:
        """The evaluation release: exact counts when ``sigma`` is 0 (documented as released
        without noise), else both counts noised (L2 sensitivity sqrt(2)) and charged first."""
        if sigma <= 0:
            return {P.CORRECT: float(correct), P.NUM_EXAMPLES: int(count)}
        spent = self.ledger.charge(sigma, round=round, run_id=run_id)
        noised = GaussianMechanism(sigma, float(np.sqrt(2.0))).apply(np.array([correct, count], dtype=np.float64), np.random.default_rng())
        return {P.CORRECT: float(noised[0]), P.NUM_EXAMPLES: float(noised[1]), P.EPSILON_SPENT: spent}
