"""One site's private state, built once per process and reused across rounds: its terms, its
data partition (roles keyed by its secret), the embeddings of its voters, and its ledger.
"""

from __future__ import annotations

import math
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.common import log

from coautogen_fl import protocol as P
from coautogen_fl.config import RunConfig
from coautogen_fl.data import (
    DataFolderError,
    FolderReport,
    ImageSet,
    SitePartition,
    load_image_folder,
    load_pool_and_test,
    site_partition,
    split_site,
)
from coautogen_fl.device import resolve_device
from coautogen_fl.downstream import build_classifier, class_errors, load_numpy_state_dict
from coautogen_fl.embedding import build_embedder
from coautogen_fl.privacy import GaussianMechanism, PrivacyError, PrivacyLedger
from coautogen_fl.privacy.discrete_gaussian import discrete_gaussian
from coautogen_fl.privacy.release_store import ReleaseStore
from coautogen_fl.privacy.site_key import site_secret
from coautogen_fl.rater import SIGNED_RATERS, build_rater, normalise_site_vector, vote_sensitivity
from coautogen_fl.secure_votes import SecureVoteEncoding

from .secagg import SecAggSetup
from .site_training import SiteTraining
from .terms import DATA_PATH_KEY, DataPathError, SiteTerms, site_data_path

#: One site-test image moves both the correct count and the test count by 1.
EVALUATION_SENSITIVITY = math.sqrt(2.0)
#: Shared folders (a simulation's data.name) whose report this process has logged already.
_REPORTED_FOLDERS: set[Path] = set()


def log_data_report(report: FolderReport | None, source: str) -> None:
    """The data check, in one log record: every unreadable file skipped, every class with fewer
    than 2 images, stray and nested files. For the site's operator only: none of it leaves the
    site, and the site votes as usual (whether one class is small depends on the data)."""
    if report is None:
        return
    lines = report.lines()
    total = sum(report.class_counts.values())
    head = f"data check of {source}={report.root}: {total} readable images in {len(report.class_counts)} classes"
    if report.problems():
        log(WARNING, "%s; the site votes as usual, but fix the folder:\n  %s", head, "\n  ".join(lines))
    elif lines:
        log(INFO, "%s\n  %s", head, "\n  ".join(lines))
    else:
        log(INFO, "%s", head)


#: One embedder per (embedder config, device) in this process: every site a simulation process
#: serves uses the same copy (on a GPU: one copy per actor, whatever the number of sites).
_EMBEDDERS: dict[tuple, Any] = {}


def shared_embedder(cfg: RunConfig) -> Any:
    """This process's embedder for ``cfg.embedder`` on ``cfg.device``, built on first use."""
    device = resolve_device(cfg.device, cfg.device_id)
    key = (repr(cfg.embedder), str(device))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = build_embedder(cfg.embedder, device)
    return _EMBEDDERS[key]


class Site(SiteTraining):
    """A site: its terms, private data, voter embeddings (computed once), its own ledger.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration (data shape, embedder). Its privacy settings stand in for the
        site's terms only in a simulation (see :class:`clients.terms.SiteTerms`).
    node_config : mapping
        The SuperNode's own settings: ``partition-id`` and ``num-partitions`` (simulation) or
        ``data-path`` (a real site's ImageFolder), and the site's terms ``site-epsilon``,
        ``site-delta``, ``trust-server``, ``allow-clear-evaluation``, ``state-dir``.
    run_id : int or str
        The Flower run id (names a simulated site's default state dir).
    """

    def __init__(self, cfg: RunConfig, node_config: Mapping[str, Any], run_id: int | str = "") -> None:
        self.cfg = cfg
        # The site's public name on the wire: its partition id, or -1 for a site with only a
        # data-path (the server then names it by node id; two such sites must never merge).
        self.partition_id = int(node_config.get("partition-id", -1))
        self.label = str(node_config.get("site-name", ""))  # public: how the server's summary names this site
        self.terms = SiteTerms.from_node_config(node_config, cfg, run_id, self.partition_id)
        folder = site_data_path(node_config, self.terms.operator_run)
        # The folder is loaded before the ledger and the secret key are touched: a site whose
        # data-path is missing or empty fails here, at start-up.
        images = self._load_folder(folder, cfg) if folder is not None else None
        self.ledger = PrivacyLedger(
            self.terms.state_dir / "privacy_ledger.json", self.terms.epsilon_budget, self.terms.delta
        )
        self.data = self._load_data(cfg, node_config, images, site_secret(self.terms.state_dir))
        self.releases = ReleaseStore(self.terms.state_dir / "releases")
        self.embedder = shared_embedder(cfg)
        self.embeddings = self.embedder.embed(self.data.train.images) if len(self.data.train) else np.zeros((0, 1))

    @staticmethod
    def _load_folder(folder: Path, cfg: RunConfig) -> ImageSet:
        """The site's own ImageFolder, its data check logged once (this site is built once per process)."""
        try:
            images = load_image_folder(
                folder, cfg.data.image_size, cfg.data.channels, cfg.data.on_bad_image, DATA_PATH_KEY
            )
        except DataFolderError as exc:
            raise DataPathError(str(exc)) from None
        log_data_report(images.report, DATA_PATH_KEY)
        return images

    def _load_data(
        self, cfg: RunConfig, node_config: Mapping[str, Any], images: ImageSet | None, key: bytes
    ) -> SitePartition:
        if images is not None:
            site = split_site(images, cfg.data, key, self.partition_id)
            site.report = images.report
            return site
        num_partitions = int(node_config.get("num-partitions", cfg.federation.num_hospitals))
        # A deployed site without data-path holds a share of the bundled digits, never a folder
        # the run config names: the server must not choose what a site reads from its disk.
        data_cfg = cfg.data if self.terms.operator_run else replace(cfg.data, name="digits")
        pool, _ = load_pool_and_test(data_cfg)
        if pool.report is not None and pool.report.root not in _REPORTED_FOLDERS:
            _REPORTED_FOLDERS.add(pool.report.root)  # one shared folder: logged once per process
            log_data_report(pool.report, "data.name")
        return site_partition(pool, self.partition_id, num_partitions, data_cfg, key)

    def _stored(self, run_key: str, kind: str, round: int, fingerprint: str) -> dict[str, Any] | None:
        """The release this site already made for this very request (a resumed run), if any."""
        return self.releases.lookup(run_key, kind, round, fingerprint)

    def _charge(
        self,
        run_key: str,
        kind: str,
        round: int,
        fingerprint: str,
        noise_multiplier: float,
        sample_rate: float = 1.0,
        steps: int = 1,
        ledger_kind: str = "gaussian",
    ) -> float:
        """Charge the ledger for the release of this request (``kind``: the release store's kind),
        once; returns the epsilon spent. A charge recorded for this very request whose release
        never left the site (a crash before the release was stored) pays for it: nothing more."""
        terms = {
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "kind": ledger_kind,
        }
        if self.releases.paid(run_key, kind, round, fingerprint, terms, charged=self.ledger.has_charge(run_key, round)):
            return self.ledger.spent_epsilon()
        self.releases.intend(run_key, kind, round, fingerprint, terms)
        return self.ledger.charge(noise_multiplier, round, run_key, sample_rate, steps, kind=ledger_kind)

    def vote(self, request: P.VoteRequest, run_id: str = "") -> P.VoteReply:
        """:meth:`_vote` under the site's release lock."""
        with self.releases.exclusive():
            return self._vote(request, run_id)

    def _vote(self, request: P.VoteRequest, run_id: str = "") -> P.VoteReply:
        """Clean votes, the ledger charge, then (local mode) the noise, in that order.

        The ledger is charged before anything leaves the site; a charge past the site's
        budget raises ``BudgetExceededError`` and nothing is released. A round of a run this
        site already paid for (``request.run_key``, else the Flower ``run_id``) is answered with
        the stored release if the request is the same, and refused otherwise.
        """
        mode, unit = request.privacy_mode, request.privacy_unit
        if mode not in ("local", "central") or unit not in ("image", "site"):
            # Never guess: an unknown mode could mean "release clean votes".
            raise PrivacyError(
                f"privacy-mode {mode!r} / privacy-unit {unit!r} not understood; expected local|central and image|site "
                "(a secagg vote arrives only inside Flower's SecAgg+ protocol)"
            )
        if mode == "central" and not self.terms.trusts_server:
            raise P.SiteRefusal(
                "the server asked for central mode (clean votes) but this site does not trust it "
                "(node config trust-server)"
            )
        run_key, fingerprint = request.run_key or run_id, request.fingerprint()
        stored = self._stored(run_key, "train", request.round, fingerprint)
        if stored is not None:
            errors = np.asarray(stored["class_errors"], dtype=np.float64) if "class_errors" in stored else None
            return self._vote_reply(
                np.asarray(stored["votes"], dtype=np.float64), self.ledger.spent_epsilon(), request, errors
            )
        votes = self._clean_votes(request)
        errors = self._class_errors(request.probe, unit) if request.probe is not None else None  # before the charge
        sigma = request.noise_multiplier
        # -f Active: votes and class errors are one release; one image moves each by at most the
        # vote sensitivity, so the joint vector by sqrt 2 times it.
        sensitivity = vote_sensitivity(unit, self.cfg.data.real_per_label > 0, request.rater in SIGNED_RATERS) * (
            math.sqrt(2.0) if errors is not None else 1.0
        )
        mechanism = GaussianMechanism(sigma, sensitivity)  # validates sigma before the charge
        spent = self._charge(run_key, "train", request.round, fingerprint, sigma)
        if mode == "local":
            votes = mechanism.apply(votes)
            errors = mechanism.apply(errors) if errors is not None else None
        release = {"votes": votes.tolist(), **({"class_errors": errors.tolist()} if errors is not None else {})}
        self.releases.save(run_key, "train", request.round, fingerprint, release)
        return self._vote_reply(votes, spent, request, errors)

    def _vote_reply(
        self, votes: np.ndarray, spent: float, request: P.VoteRequest, errors: np.ndarray | None = None
    ) -> P.VoteReply:
        """A vote reply: the released votes (and class errors) and the public bookkeeping (spend, budget,
        name, noise echo)."""
        return P.VoteReply(
            votes, spent, self.terms.epsilon_budget, self.partition_id, request.noise_multiplier, self.label, errors
        )

    def _class_errors(self, probe: P.ModelProbe, unit: str) -> np.ndarray:
        """-f Active: the probe model's misclassified voters per class (never sent as is); the
        site unit scales the vector to L2 norm <= 1 like its votes."""
        model = build_classifier(probe.model, probe.num_classes, probe.channels, probe.image_size)
        load_numpy_state_dict(model, probe.weights)  # a malformed model fails before the charge
        labels = self.data.train.labels
        if len(labels) and int(labels.max()) >= probe.num_classes:
            raise ValueError(
                f"the probe model has {probe.num_classes} classes, this site's data has label {int(labels.max())}"
            )
        errors = class_errors(model, self.data.train.images, labels, probe.num_classes)
        return normalise_site_vector(errors) if unit == "site" else errors

    def _clean_votes(self, request: P.VoteRequest) -> np.ndarray:
        """The rater's votes of this site's voters on the request's candidates (never sent as is)."""
        rater = build_rater(request.rater, request.k)
        votes = rater.score(
            self.embeddings, self.data.train.labels, request.embeddings.astype(np.float32), request.labels
        )
        return normalise_site_vector(votes) if request.privacy_unit == "site" else votes

    def secure_vote(self, request: P.VoteRequest, setup: SecAggSetup, run_id: str = "") -> P.VoteReply:
        """:meth:`_secure_vote` under the site's release lock."""
        with self.releases.exclusive():
            return self._secure_vote(request, setup, run_id)

    def _secure_vote(self, request: P.VoteRequest, setup: SecAggSetup, run_id: str = "") -> P.VoteReply:
        """Integer votes plus this site's discrete-Gaussian share of the noise (``privacy.mode=secagg``),
        charged first; Flower's SecAgg+ masks them before they leave, and reveals only a sum.

        The share is sized for ``min(the request's sites in the sum, the fewest SecAgg+'s own setup
        allows, the site's own secagg-trust-sites)`` sites: fewer means more noise from this site,
        never less. The ledger charges the distributed discrete Gaussian bound for that many sites.
        """
        unit = request.privacy_unit
        if request.privacy_mode != "secagg" or unit not in ("image", "site") or request.secagg_summands < 2:
            raise PrivacyError(
                f"a SecAgg+ round asked for privacy-mode {request.privacy_mode!r}, unit {unit!r}, sites in the sum "
                f"{request.secagg_summands}; expected secagg, image|site and >= 2 sites"
            )
        capped = self.cfg.data.real_per_label > 0
        encoding = SecureVoteEncoding.plan(
            request.noise_multiplier,
            request.secagg_summands,
            request.k,
            unit,
            vote_sensitivity(unit, capped),
            capped,
            request.secagg_vote_cap,
            len(request.labels),
        )
        setup.check(encoding)
        summands = self.terms.secagg_summands(min(request.secagg_summands, setup.sites_in_sum))
        run_key, fingerprint = request.run_key or run_id, request.fingerprint()
        stored = self._stored(run_key, "train", request.round, fingerprint)
        if stored is not None:
            return self._vote_reply(np.asarray(stored["votes"], dtype=np.int64), self.ledger.spent_epsilon(), request)
        clean = encoding.encode(self._clean_votes(request))
        charge = encoding.charge_multiplier(summands)  # validates the request before the charge
        spent = self._charge(run_key, "train", request.round, fingerprint, charge, ledger_kind="ddg")
        noised = clean + discrete_gaussian(encoding.share_variance(summands), clean.shape)
        # The bound's slack is exceeded with probability <= 2^-64 (secure_votes.SecureVoteEncoding.bound):
        # a no-op but for that, and it keeps SecAgg+'s own clipping from ever acting.
        votes = np.clip(noised, -encoding.bound, encoding.bound)
        self.releases.save(run_key, "train", request.round, fingerprint, {"votes": votes.tolist()})
        return self._vote_reply(votes, spent, request)

    def release_accuracy(
        self, correct: int, count: int, request: P.EvaluationRequest, run_id: str = ""
    ) -> P.EvaluationReply:
        """:meth:`_release_accuracy` under the site's release lock."""
        with self.releases.exclusive():
            return self._release_accuracy(correct, count, request, run_id)

    def _release_accuracy(
        self, correct: int, count: int, request: P.EvaluationRequest, run_id: str = ""
    ) -> P.EvaluationReply:
        """The evaluation release: both counts noised (L2 sensitivity sqrt 2) and charged first,
        or, when the noise multiplier is 0 and only if the site's terms allow it, exact with the
        accuracy. A repeated request of a resumed run gets the stored release."""
        sigma, round, run_key = request.noise_multiplier, request.round, request.run_key or run_id
        if sigma <= 0:
            if not self.terms.allow_clear_evaluation:
                raise P.SiteRefusal(
                    "the server asked for a clear evaluation, which this site's node config does not allow "
                    "(allow-clear-evaluation)"
                )
            accuracy = correct / count if count else 0.0
            return P.EvaluationReply(
                float(correct),
                float(count),
                self.ledger.spent_epsilon(),
                self.terms.epsilon_budget,
                self.partition_id,
                accuracy,
                self.label,
            )
        mechanism = GaussianMechanism(sigma, EVALUATION_SENSITIVITY)
        fingerprint = request.fingerprint()
        stored = self._stored(run_key, "evaluate", round, fingerprint)
        if stored is not None:
            return P.EvaluationReply(
                stored["correct"],
                stored["count"],
                self.ledger.spent_epsilon(),
                self.terms.epsilon_budget,
                self.partition_id,
                site_label=self.label,
            )
        spent = self._charge(run_key, "evaluate", round, fingerprint, sigma)
        noised = mechanism.apply(np.array([correct, count], dtype=np.float64))
        self.releases.save(
            run_key, "evaluate", round, fingerprint, {"correct": float(noised[0]), "count": float(noised[1])}
        )
        return P.EvaluationReply(
            float(noised[0]),
            float(noised[1]),
            spent,
            self.terms.epsilon_budget,
            self.partition_id,
            site_label=self.label,
        )
