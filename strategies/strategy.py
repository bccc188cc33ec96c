"""CoAutoGenStrategy: the frameworks (coautogen_fl/frameworks.py) as a Flower Message-API strategy.

One Flower round is one voting round. ``configure_train`` sends every sampled site the pool's
embeddings; ``aggregate_train`` validates the vote replies, sums them (adding the noise
itself in central mode), thresholds and breeds the next pool; after the last round it writes
the final dataset, trains the downstream model and hands it to ``configure_evaluate``, which
asks every site to evaluate it on its private test split.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.checkpoint import RoundRecord
from coautogen_fl.config import RunConfig
from coautogen_fl.downstream import state_dict_to_numpy
from coautogen_fl.evolution import Evolution
from coautogen_fl.frameworks import FRAMEWORKS
from coautogen_fl.privacy import GaussianMechanism, aggregate_noise_std
from coautogen_fl.rater import SIGNED_RATERS, normalise_site_vector, vote_sensitivity

from .evaluation import evaluation_requests, federated_accuracy
from .outcome import FinalStage
from .resume import checkpoint_of
from .secagg import SecureVotes
from .sites import RoundFailed, SiteBook, SiteRecord
from .training import TrainingRounds

#: Frameworks whose rounds are votes of the sites (the others generate once).
VOTING_FRAMEWORKS = tuple(name for name, f in FRAMEWORKS.items() if f.votes)


class CoAutoGenStrategy(SiteBook, Strategy):
    """Private Evolution across sites (``Feedback``) or one-shot generation (``Gen``).

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    evolution : Evolution
        The pool and its breeding rules.
    final_stage : FinalStage
        Stores rounds, trains and evaluates the downstream model, tracks metrics.
    noise_multiplier : float
        The per-round noise multiplier calibrated for the run's (epsilon, delta); 0 for Gen.
    max_site_images : int
        A public bound on the private images of one site, used only to reject implausible
        vote replies (sites never send their size); 0 = no bound.
    run_key : str (default: "")
        The run's identity in the sites' ledgers: a resumed run keeps it, so a site recognises
        the rounds it already paid for. The first Flower run id by default.
    """

    def __init__(
        self,
        cfg: RunConfig,
        evolution: Evolution,
        final_stage: FinalStage,
        noise_multiplier: float,
        max_site_images: int,
        run_key: str = "",
    ) -> None:
        self.cfg = cfg
        self.run_key = run_key  # what the sites' ledgers know this run by, across resumes
        self.round_offset = 0  # rounds finished before this process (a resumed run)
        self.voting_done = False  # resumed after the last voting round: only the final stage is left
        self.history: list[RoundRecord] = []
        self.evolution = evolution
        self.final = final_stage
        self.noise_multiplier = noise_multiplier
        self.max_site_images = max_site_images
        # L2 sensitivity of one site's votes: what local sites and the central noise calibrate to.
        self.sensitivity = vote_sensitivity(
            cfg.privacy.unit, capped=cfg.data.real_per_label > 0, signed=cfg.feedback.rater in SIGNED_RATERS
        )
        # Vote rounds: -iter for Feedback, one for Gen/GenLLM, none for -tt real (only DP-SGD rounds).
        self.rounds = 0 if cfg.feedback.task_type == "real" else cfg.feedback.rounds if self.is_feedback else 1
        self.training: TrainingRounds | None = None  # -tt real/mix: the DP-SGD rounds after the votes
        capped = cfg.data.real_per_label > 0
        self.secure = (
            SecureVotes(cfg, noise_multiplier, self.sensitivity, capped) if cfg.privacy.mode == "secagg" else None
        )
        self.sites: dict[int, SiteRecord] = {}
        self.dropped: list[dict[str, Any]] = []
        self.federated_accuracy: float | None = None
        self.planned_sites = 0  # the nodes the federation had when the run asked
        self.sampled: dict[int, list[int]] = {}  # round -> nodes asked
        self._outbox: list[Message] = []  # this round's requests: a reply names its request
        self._sent_to: dict[str, int] = {}  # message id -> node, of the sent outbox
        self._node_rng = random.Random(cfg.generator.seed)
        self._round_start = time.time()
        self._probed = False  # this round's request carried -f Active's model
        self._class_errors: np.ndarray | None = None  # -f Active: this round's summed class errors

    # ------------------------------------------------------------------ helpers
    @property
    def is_feedback(self) -> bool:
        return self.cfg.feedback.framework in VOTING_FRAMEWORKS

    @property
    def total_rounds(self) -> int:
        """Flower rounds of the run: the vote rounds, then the DP-SGD rounds (-tt real/mix)."""
        return self.training.last_round if self.training is not None else self.rounds

    def summary(self) -> None:
        """Log the strategy's settings."""
        p = self.cfg.privacy
        log(
            INFO,
            "\t├──> Framework: %s, rater %s, %d round(s)",
            self.cfg.feedback.framework,
            self.cfg.feedback.rater,
            self.rounds,
        )
        log(
            INFO,
            "\t├──> Pool: %d per label, final volume %d per label",
            self.cfg.feedback.candidates_per_label,
            self.cfg.feedback.volume_per_label,
        )
        log(
            INFO,
            "\t└──> Privacy: epsilon %.3g, delta %.3g, mode %s, unit %s, noise multiplier %.4g",
            p.epsilon,
            p.delta,
            p.mode,
            p.unit,
            self.noise_multiplier,
        )

    def _sample_nodes(self, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        count = max(1, int(round(len(nodes) * self.cfg.federation.fraction_train)))
        # random.Random, not numpy: node ids are unsigned 64-bit ints numpy would mangle.
        return sorted(self._node_rng.sample(nodes, min(count, len(nodes))))

    def vote_request(self, server_round: int, embeddings: np.ndarray, labels: np.ndarray) -> P.VoteRequest:
        """The TRAIN request of a round (with SecAgg+'s threshold and the vote cap in secagg mode,
        and -f Active's model once one is trained)."""
        f, p = self.cfg.feedback, self.cfg.privacy
        encoding = self.secure.encoding if self.secure is not None else None
        return P.VoteRequest(
            server_round,
            f.rater,
            f.k,
            float(self.noise_multiplier),
            p.mode,
            p.unit,
            embeddings,
            labels,
            self.run_key,
            secagg_summands=encoding.summands if encoding else 0,
            secagg_vote_cap=encoding.vote_cap if encoding else 0,
            probe=self.probe(),
        )

    def probe(self) -> P.ModelProbe | None:
        """-f Active: the model trained on the last round's data, whose class errors the sites release."""
        active = self.evolution.active
        if active is None or active.model is None:
            return None
        return P.ModelProbe(weights=state_dict_to_numpy(active.model), **self.final.model_spec())

    @property
    def round_sensitivity(self) -> float:
        """L2 sensitivity of one site's release this round: the votes', times sqrt 2 when the
        class errors of -f Active's model travel with them (one release of both)."""
        return self.sensitivity * (np.sqrt(2.0) if self._probed else 1.0)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the pool's embeddings to every sampled site (none in the Gen framework)."""
        server_round += self.round_offset
        self._round_start = time.time()
        if self.training is not None and server_round > self.rounds:
            return self.training.configure(self, server_round, grid)
        if not self.is_feedback or self.voting_done:
            return []
        if not self.evolution.pool:
            self.evolution.start()
        embeddings, labels = self.evolution.payload()
        nodes = self._sample_nodes(grid)
        self.planned_sites = max(self.planned_sites, len(grid.get_node_ids()))
        self.sampled[server_round] = nodes
        for node in nodes:  # every site asked is named in the summary, also if it never answers
            self.sites.setdefault(node, SiteRecord(-1, node))
        log(INFO, "round %d/%d: %d candidates sent to %d sites", server_round, self.rounds, len(labels), len(nodes))
        if self.secure is not None:  # SecAgg+'s four stages run here; Flower's loop then sends nothing
            self.secure.plan(len(nodes), len(labels))
            self.secure.configure(grid, nodes, self.vote_request(server_round, embeddings, labels))
            return []
        request = self.vote_request(server_round, embeddings, labels)
        self._probed = request.probe is not None
        content = to_content(request.to_parts())
        self._outbox, self._sent_to = (
            [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes],
            {},
        )
        return self._outbox

    def _parse_vote_reply(self, msg: Message, noise_std: float) -> P.VoteReply:
        reply = P.VoteReply.from_parts(from_content(msg.content))
        max_clean = self.max_site_images * np.sqrt(self.cfg.feedback.k) if self.max_site_images else np.inf
        P.validate_votes(reply.votes, len(self.evolution.pool), noise_std, max_clean)
        if self._probed != (reply.class_errors is not None):
            raise P.ReplyError(
                "class errors " + ("missing: the request carried a model" if self._probed else "sent unasked")
            )
        if reply.class_errors is not None:
            P.validate_votes(
                reply.class_errors,
                self.evolution.num_classes,
                noise_std,
                float(self.max_site_images or np.inf),
                what="class errors",
            )
        return reply

    def noise_aggregate(self, votes: np.ndarray) -> np.ndarray:
        """Central mode: the Gaussian noise the server adds once to the summed clean votes (and
        -f Active's class errors), from the operating system's entropy (no seed can regenerate it)."""
        mechanism = GaussianMechanism(self.noise_multiplier, self.round_sensitivity)
        if self._class_errors is not None:
            self._class_errors = mechanism.apply(self._class_errors)
        return mechanism.apply(votes)

    def collect_votes(self, server_round: int, replies: Iterable[Message]) -> tuple[np.ndarray, int]:
        """Validate and sum the vote replies; returns (summed votes, number of valid replies)."""
        per_site_std = self.noise_multiplier * self.round_sensitivity if self.cfg.privacy.mode == "local" else 0.0
        total = np.zeros(len(self.evolution.pool), dtype=np.float64)
        errors = np.zeros(self.evolution.num_classes) if self._probed else None
        valid = 0
        for msg in replies:
            if msg.has_error():
                self._site_error(server_round, msg)
                continue
            try:
                reply = self._parse_vote_reply(msg, per_site_std)
            except (P.ReplyError, TypeError, ValueError, KeyError) as exc:
                self._drop(server_round, msg, str(exc))
                continue
            votes, site_errors = reply.votes, reply.class_errors
            if self.cfg.privacy.mode == "central" and self.cfg.privacy.unit == "site":
                votes = normalise_site_vector(votes)  # a site the server trusts may still send more
                site_errors = normalise_site_vector(site_errors) if site_errors is not None else None
            total += votes
            if errors is not None and site_errors is not None:
                errors += site_errors
            valid += 1
            self.note_answer(self.sender(msg), vars(reply))
        self._class_errors = errors
        return total, valid

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the votes, breed the next pool; after the last round build the final dataset."""
        replies = list(replies)
        server_round += self.round_offset
        if self.training is not None and server_round > self.rounds:
            return self.training.aggregate(self, server_round, replies)
        last = server_round == self.rounds
        if self.voting_done:  # resumed after the last round: the replayed final children
            return self.final.finish(self.evolution.pool, server_round), MetricRecord(
                {"num-synthetic": len(self.evolution.pool)}
            )
        if not self.is_feedback:
            final = self.evolution.random_population(self.cfg.feedback.volume_per_label)
            return self.final.finish(final, server_round), MetricRecord({"num-synthetic": len(final)})
        if self.secure is not None:
            votes, valid, noise_std = self.secure.collect(self, server_round)
        else:
            votes, valid = self.collect_votes(server_round, replies)
            self._record_missing(server_round, replies)
            noise_std = aggregate_noise_std(
                self.noise_multiplier, self.round_sensitivity, max(valid, 1), self.cfg.privacy.mode
            )
        if valid < self.min_sites(server_round):
            # Re-asking would charge the sites that did answer a second time: stop instead.
            raise RoundFailed(
                f"round {server_round}: valid votes from {valid} of {len(self.sampled.get(server_round, []))} sites, "
                f"fewer than the {self.min_sites(server_round)} the run needs (federation.min_sites); "
                "nothing more was asked of any site. summary.json names each site and why it did not count"
            )
        if self.cfg.privacy.mode == "central" and valid:
            votes = self.noise_aggregate(votes)
        if self._class_errors is not None and self.evolution.active is not None:
            self.evolution.active.observe_errors(self._class_errors)  # steers the pool bred below
        per_label = self.cfg.feedback.volume_per_label if last else self.cfg.feedback.candidates_per_label
        ids = [c.candidate_id for c in self.evolution.pool]
        outcome = self.evolution.advance(server_round, votes, noise_std, per_label, final=last)
        asked = len(replies) if self.secure is None else len(self.sampled.get(server_round, []))
        metrics = self._round_metrics(server_round, asked, valid, noise_std, outcome)
        errors = self._class_errors.tolist() if self._class_errors is not None else None
        self.history.append(RoundRecord(server_round, votes.tolist(), float(noise_std), ids, metrics, errors))
        checkpoint_of(self).save(self.final.store.run_dir)  # the round is decided: it is never asked again
        self.final.store.write_round(server_round, outcome.voted)
        self.final.log_round(server_round, metrics, outcome.voted)
        arrays = self.final.finish(outcome.children, server_round) if last else None
        return arrays, MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def _round_metrics(
        self, server_round: int, sent: int, valid: int, noise_std: float, outcome: Any
    ) -> dict[str, Any]:
        spends = [s.epsilon_spent for s in self.sites.values()]
        metrics = {
            "replies": sent,
            "votes_received": valid,
            "dropped": sum(1 for d in self.dropped if d["round"] == server_round),
            "noise_multiplier": float(self.noise_multiplier),
            "aggregate_noise_std": float(noise_std),
            "votes_total": float(sum(c.votes or 0.0 for c in outcome.voted)),
            "kept": outcome.kept,
            "fallback_labels": outcome.fallback_labels,
            "degree": outcome.degree,
            "epsilon_spent_max": max(spends) if spends else 0.0,
            "epsilon_spent": {s.name: s.epsilon_spent for s in self.sites.values()},
            "round_time_s": time.time() - self._round_start,
        }
        metrics.update(self.evolution.diagnostics())  # where the votes moved the generator, what its filters kept
        log(
            INFO,
            "round %d/%d: votes from %d of %d sites, %d candidates kept, epsilon spent (max, as the sites report) %.4f",
            server_round,
            self.rounds,
            valid,
            sent,
            outcome.kept,
            metrics["epsilon_spent_max"],
        )
        return metrics

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """After the last round, send the downstream model to every site for evaluation."""
        return evaluation_requests(self, server_round + self.round_offset, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Count-weighted mean of the sites' private test accuracies (see :func:`.evaluation.federated_accuracy`)."""
        return federated_accuracy(self, server_round + self.round_offset, replies)
