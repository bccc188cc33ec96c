"""The DP-SGD rounds of ``-tt real`` and ``-tt mix``, run by the strategy after its vote rounds.

Each round the server sends the global weights and the DP-SGD settings (a
:class:`coautogen_fl.protocol.TrainRequest`, message type ``train.dpsgd``) to the sampled sites;
each site charges its ledger, runs its DP-SGD steps on its private voter images and replies with
its new weights. The server averages them with equal weights (sites send no example counts),
in ``mix`` runs ``downstream.mix_synthetic_steps`` Adam steps on the synthetic dataset the
votes built (post-processing: no privacy cost), and writes the global weights of the round to
``training/round-NNNN.npz``. After the last round the model goes through the FinalStage
evaluation like a synthetic-data model (central test, the sites' noised evaluation).

Crash safety: the starting model is saved as the round before the first (``round-NNNN.npz`` of
``first_round - 1``) before any site is asked, and every finished round updates the run's
``checkpoint.json`` (:class:`coautogen_fl.checkpoint.TrainingRecord`) after its weights (and, in
the pooled modes, the optimiser's state) are on disk. :meth:`TrainingRounds.restore` continues
from there with the very weights the crashed run held, so the sites replay what they already
released for a round instead of charging it again.
"""

from __future__ import annotations

import pickle
import time
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.atomic import write_atomic
from coautogen_fl.checkpoint import CheckpointError, TrainingRecord
from coautogen_fl.config import RunConfig
from coautogen_fl.downstream import build_classifier, evaluate_classifier, load_numpy_state_dict, state_dict_to_numpy
from coautogen_fl.dpsgd import public_steps
from coautogen_fl.privacy import GaussianMechanism
from coautogen_fl.secure_gradients import SecureGradientEncoding, unflatten
from coautogen_fl.secure_votes import SecAggShape

from .resume import checkpoint_of
from .secagg import RevealedSum, SecureRound, account_revealed
from .sites import RoundFailed, SiteRecord

if TYPE_CHECKING:
    from .strategy import CoAutoGenStrategy


class TrainingRounds:
    """Federated DP-SGD rounds after ``first_round - 1`` vote rounds.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (``downstream.dp_*``, ``downstream.mix_synthetic_steps``).
    noise_multiplier : float
        Each round's DP-SGD noise, calibrated by :func:`coautogen_fl.privacy.split.plan_noise`.
    first_round : int
        The strategy round of the first DP-SGD round (the vote rounds + 1; 1 for ``real``).
    run_dir : Path
        Where ``training/round-NNNN.npz`` checkpoints of the global weights go.
    """

    def __init__(self, cfg: RunConfig, noise_multiplier: float, first_round: int, run_dir: Path) -> None:
        self.cfg = cfg
        self.noise_multiplier = float(noise_multiplier)
        self.first_round = int(first_round)
        #: privacy.mode=central: every round is one DP-SGD step on the sum of the sites' clipped
        #: gradients, noised once by the server (pooled DP-SGD); the same (noise, rate) steps as
        #: dp_rounds x dp_local_steps local steps, so the same epsilon. privacy.mode=secagg: the same
        #: pooled steps on a sum SecAgg+ reveals, each site adding a share of the noise (full batches).
        self.central = cfg.privacy.mode == "central"
        self.secure = cfg.privacy.mode == "secagg"
        self.pooled = self.central or self.secure
        self.rounds = cfg.downstream.dp_rounds * (cfg.downstream.dp_local_steps if self.pooled else 1)
        self._revealed: RevealedSum | None = None  # secagg: the sum of this round's SecAgg+ stages
        self._shape: SecAggShape | None = None
        self._model: Any = None  # central: the global model and its optimiser, kept across rounds
        self._optimizer: Any = None
        self.run_dir = Path(run_dir)
        self.weights: dict[str, np.ndarray] | None = None  # the global model, after the last finished round
        self.accuracy_synthetic: float | None = None  # mix: the model pretrained on the synthetic data
        self.history: list[dict[str, Any]] = []
        self._adopt_only = False  # resumed after the last round: only hand the model on (no site asked)

    @property
    def last_round(self) -> int:
        """The strategy round of the last DP-SGD round."""
        return self.first_round + self.rounds - 1

    def summary(self) -> dict[str, Any]:
        """summary.json "training": the settings, the pretrained (mix) accuracy and each round."""
        d = self.cfg.downstream
        return {
            "noise_multiplier": self.noise_multiplier,
            "rounds": self.rounds,
            "local_steps": d.dp_local_steps,
            "sample_rate": 1.0 if self.secure else d.dp_sample_rate,
            "max_grad_norm": d.dp_max_grad_norm,
            "lr": d.dp_lr,
            "optimizer": d.dp_optimizer,
            "mix_synthetic_steps": d.mix_synthetic_steps if self.cfg.feedback.task_type == "mix" else 0,
            "accuracy_synthetic_pretrained": self.accuracy_synthetic,
            "history": self.history,
        }

    def state(self) -> TrainingRecord | None:
        """What the run's checkpoint records of these rounds; None before the starting model is saved."""
        if self.weights is None:
            return None
        return TrainingRecord(len(self.history), list(self.history), self.accuracy_synthetic)

    def restore(self, strategy: "CoAutoGenStrategy", record: TrainingRecord) -> int:
        """Continue after ``record``'s last finished round: its weights (and the pooled modes'
        optimiser state) from ``training/``; returns the strategy round of that round."""
        last = self.first_round - 1 + int(record.done)
        path = self._path("round", last, "npz")
        try:
            with np.load(path) as saved:
                self.weights = {name: saved[name] for name in saved.files}
            if self.pooled and record.done:
                path = self._path("optimizer", last, "pt")
                self._global_model(strategy)
                self._optimizer.load_state_dict(torch.load(path, weights_only=True))
        except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"the checkpoint continues after DP-SGD round {record.done}, but {path} is unreadable ({exc}): "
                "restore it from a backup or start a new run"
            ) from None
        self.history, self.accuracy_synthetic = list(record.history), record.accuracy_synthetic
        if record.done >= self.rounds:  # the crash came after the last round: one more round hands the model on
            self._adopt_only = True
            return last - 1
        return last

    def _start(self, strategy: "CoAutoGenStrategy") -> dict[str, np.ndarray]:
        """The first global model: the synthetic-data model (mix), or a fresh one under downstream.seed."""
        final = strategy.final
        if final.model_arrays is not None:  # mix: the vote rounds' final stage pretrained it
            self.accuracy_synthetic = final.accuracy_real_test
            return {name: array.numpy() for name, array in final.model_arrays.items()}
        spec = final.model_spec()
        model = build_classifier(
            spec["model"], spec["num_classes"], spec["channels"], spec["image_size"], seed=self.cfg.downstream.seed
        )
        return state_dict_to_numpy(model)

    def request(self, strategy: "CoAutoGenStrategy", server_round: int) -> P.TrainRequest:
        """The ``train.dpsgd`` request of a round."""
        d = self.cfg.downstream
        return P.TrainRequest(
            round=server_round,
            noise_multiplier=self.noise_multiplier,
            sample_rate=1.0 if self.secure else d.dp_sample_rate,
            steps=1 if self.pooled else d.dp_local_steps,
            max_grad_norm=d.dp_max_grad_norm,
            lr=d.dp_lr,
            optimizer=d.dp_optimizer,
            weights=dict(self.weights or {}),
            run_key=strategy.run_key,
            privacy_mode=self.cfg.privacy.mode if self.pooled else "local",
            secagg_summands=self._shape.sites_in_sum if self.secure and self._shape else 0,
            secagg_gradient_cap=self.cfg.privacy.secagg_gradient_cap if self.secure else 0.0,
            **strategy.final.model_spec(),
        )

    def encoding(self, strategy: "CoAutoGenStrategy") -> SecureGradientEncoding:
        """secagg: the integer encoding of this round's gradient sums (after :attr:`_shape` is planned)."""
        assert self._shape is not None, "plan the round's SecAgg+ shape first"
        return SecureGradientEncoding(
            self.noise_multiplier,
            self._shape.sites_in_sum,
            self.cfg.downstream.dp_max_grad_norm,
            sum(int(p.size) for p in self._parameters(strategy).values()),
            self.cfg.privacy.secagg_gradient_cap,
        )

    def configure(self, strategy: "CoAutoGenStrategy", server_round: int, grid: Grid) -> list[Message]:
        """Send the global weights to every sampled site; in secagg mode run the round's SecAgg+
        stages with them instead (the sum waits for :meth:`aggregate`) and send nothing more."""
        if self._adopt_only:
            return []
        if self.weights is None:  # saved before any site is asked: a crash in round 1 resumes too
            self.weights = self._start(strategy)
            self._checkpoint(strategy, self.first_round - 1)
        nodes = strategy._sample_nodes(grid)
        strategy.planned_sites = max(strategy.planned_sites, len(grid.get_node_ids()))
        strategy.sampled[server_round] = nodes
        for node in nodes:
            strategy.sites.setdefault(node, SiteRecord(-1, node))
        log(
            INFO,
            "DP-SGD round %d/%d: global model sent to %d sites",
            server_round - self.first_round + 1,
            self.rounds,
            len(nodes),
        )
        if self.secure:  # SecAgg+'s four stages run here; Flower's round loop then sends nothing
            self._shape = SecAggShape.plan(len(nodes), self.cfg.privacy.secagg_threshold)
            round_ = SecureRound(self._shape, self.encoding(strategy), self.cfg.federation.timeout_s)
            self._revealed = round_.run(grid, nodes, self.request(strategy, server_round))
            return []
        content = to_content(self.request(strategy, server_round).to_parts())
        strategy._outbox = [Message(content=content, dst_node_id=n, message_type=P.TRAIN_DPSGD) for n in nodes]
        strategy._sent_to = {}
        return strategy._outbox

    def _collect(
        self, strategy: "CoAutoGenStrategy", server_round: int, replies: list[Message]
    ) -> list[dict[str, np.ndarray]]:
        """The valid weights of a round; every other reply is recorded against its site."""
        reference = self._parameters(strategy) if self.central else self.weights or {}  # what a reply must match
        updates = []
        for msg in replies:
            if msg.has_error():
                strategy._site_error(server_round, msg, what="DP-SGD: ")
                continue
            try:
                reply = P.TrainReply.from_parts(from_content(msg.content))
                if reply.gradients != self.central:
                    raise P.ReplyError(
                        f"a {'central' if self.central else 'local'} DP-SGD round got "
                        f"{'a gradient sum' if reply.gradients else 'weights'}"
                    )
                P.validate_weights(reply.weights, reference)
            except (P.ReplyError, TypeError, ValueError, KeyError) as exc:
                strategy._drop(server_round, msg, f"DP-SGD: {exc}")
                continue
            site = strategy._site(msg, reply.partition_id, reply.site_label)
            site.epsilon_spent = max(site.epsilon_spent, reply.epsilon_spent)
            site.epsilon_budget = reply.epsilon_budget
            site.rounds_answered += 1
            updates.append(reply.weights)
        strategy._record_missing(server_round, replies)
        return updates

    def aggregate(
        self, strategy: "CoAutoGenStrategy", server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Average the sites' weights (equal weights), mix in synthetic steps, checkpoint; after the
        last round hand the model to the final stage."""
        started = time.time()
        if self._adopt_only:
            return strategy.final.adopt(self._model_of(strategy, self.weights or {})), MetricRecord({})
        if self.secure:  # the round's SecAgg+ stages ran in configure(): its time counts from there
            model, sites = self._secure_step(strategy, server_round)
            asked = len(strategy.sampled.get(server_round, []))
            return self._finish(strategy, server_round, model, asked, strategy._round_start, sites)
        updates = self._collect(strategy, server_round, list(replies))
        if len(updates) < strategy.min_sites(server_round):
            raise RoundFailed(
                f"DP-SGD round {server_round}: valid weights from {len(updates)} "
                f"of {len(strategy.sampled.get(server_round, []))} sites, "
                f"fewer than the {strategy.min_sites(server_round)} the run needs (federation.min_sites); nothing more "
                "was asked of any site. summary.json names each site and why it did not count"
            )
        model = self._step(strategy, updates) if self.central else self._average(strategy, updates)
        return self._finish(strategy, server_round, model, len(replies), started, len(updates))

    def _finish(
        self,
        strategy: "CoAutoGenStrategy",
        server_round: int,
        model: Any,
        sent: int,
        started: float,
        valid: int | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Checkpoint the round's global model, log its metrics; after the last round hand it on."""
        self.weights = state_dict_to_numpy(model)
        metrics = self._metrics(strategy, server_round, sent, sent if valid is None else valid, model, started)
        self.history.append(metrics)
        self._checkpoint(strategy, server_round)
        strategy.final.tracker.log_round(server_round, metrics)
        arrays = strategy.final.adopt(model) if server_round == self.last_round else None
        return arrays, MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    @staticmethod
    def _model_of(strategy: "CoAutoGenStrategy", weights: dict[str, np.ndarray]) -> Any:
        """The downstream model holding ``weights``."""
        spec = strategy.final.model_spec()
        model = build_classifier(spec["model"], spec["num_classes"], spec["channels"], spec["image_size"])
        load_numpy_state_dict(model, weights)
        return model

    def _average(self, strategy: "CoAutoGenStrategy", updates: list[dict[str, np.ndarray]]) -> Any:
        d = self.cfg.downstream
        model = self._model_of(
            strategy, {k: np.mean([u[k] for u in updates], axis=0).astype(self.weights[k].dtype) for k in self.weights}
        )
        synthetic = strategy.final.synthetic
        if self.cfg.feedback.task_type == "mix" and synthetic is not None:
            public_steps(
                model,
                *synthetic,
                steps=d.mix_synthetic_steps,
                lr=d.lr,
                batch_size=d.batch_size,
                seed=d.seed + len(self.history),
            )
        return model

    def _global_model(self, strategy: "CoAutoGenStrategy") -> Any:
        """Central mode: the global model (from :attr:`weights`) and its optimiser, built once."""
        if self._model is None:
            d = self.cfg.downstream
            self._model = self._model_of(strategy, self.weights or {})
            params = self._model.parameters()
            self._optimizer = (
                torch.optim.SGD(params, lr=d.dp_lr) if d.dp_optimizer == "sgd" else torch.optim.Adam(params, lr=d.dp_lr)
            )
        return self._model

    def _parameters(self, strategy: "CoAutoGenStrategy") -> dict[str, np.ndarray]:
        """The global model's trainable parameters by name (what a gradient sum must match)."""
        return {name: p.detach().numpy() for name, p in self._global_model(strategy).named_parameters()}

    def _secure_step(self, strategy: "CoAutoGenStrategy", server_round: int) -> tuple[Any, int]:
        """secagg: one optimiser step on the noised gradient sum SecAgg+ revealed; (the model, the
        sites in the sum). Raises RoundFailed when it revealed nothing or holds fewer sites than
        the run needs."""
        revealed, self._revealed = self._revealed, None
        assert self._shape is not None, "configure() runs the round first"
        integers, sites = account_revealed(strategy, server_round, revealed, self._shape, "gradients")
        if sites < strategy.min_sites(server_round):
            raise RoundFailed(
                f"DP-SGD round {server_round}: the secure sum holds {sites} sites, fewer than the "
                f"{strategy.min_sites(server_round)} the run needs (federation.min_sites)"
            )
        reference = self._parameters(strategy)
        total = unflatten(self.encoding(strategy).decode(integers), reference)
        return self._step(strategy, [total], noised=True), sites

    def _step(self, strategy: "CoAutoGenStrategy", updates: list[dict[str, np.ndarray]], noised: bool = False) -> Any:
        """Pooled modes: one optimiser step on the sum of the sites' clipped gradient sums, plus
        (central) Gaussian noise of std noise multiplier x max_grad_norm from OS entropy, or
        (secagg, ``noised``) the noise the sites' shares put in the sum already (as a pooled DP-SGD
        step on the noised sum; Adam is invariant to its scale), then the mix's public steps."""
        model, d = self._global_model(strategy), self.cfg.downstream
        noise = GaussianMechanism(self.noise_multiplier, d.dp_max_grad_norm)
        self._optimizer.zero_grad(set_to_none=True)
        for name, param in model.named_parameters():
            total = np.sum([u[name] for u in updates], axis=0)
            param.grad = torch.as_tensor(total if noised else noise.apply(total), dtype=param.dtype)
        self._optimizer.step()
        synthetic = strategy.final.synthetic
        if self.cfg.feedback.task_type == "mix" and synthetic is not None and d.mix_synthetic_steps:
            public_steps(
                model,
                *synthetic,
                steps=d.mix_synthetic_steps,
                lr=d.lr,
                batch_size=d.batch_size,
                seed=d.seed + len(self.history),
            )
        model.eval()
        return model

    def _path(self, kind: str, server_round: int, suffix: str) -> Path:
        return self.run_dir / "training" / f"{kind}-{server_round:04d}.{suffix}"

    def _checkpoint(self, strategy: "CoAutoGenStrategy", server_round: int) -> None:
        """The global weights after the round (and the pooled modes' optimiser state), each written
        whole or not at all, then the run's checkpoint.json that names the round finished.

        Every round's weights stay (the run's record); of the optimiser only the newest state does:
        only a resume reads it, and Adam's state is twice the model's size every round."""
        write_atomic(self._path("round", server_round, "npz"), lambda fh: np.savez(fh, **self.weights))
        newest = self._path("optimizer", server_round, "pt")
        keeps_state = self.pooled and self._optimizer is not None
        if keeps_state:
            state = self._optimizer.state_dict()
            write_atomic(newest, lambda fh: torch.save(state, fh))
        checkpoint_of(strategy).save(self.run_dir)
        if keeps_state:  # only once checkpoint.json names the newest state
            for stale in newest.parent.glob("optimizer-*.pt"):
                if stale != newest:
                    stale.unlink(missing_ok=True)

    def _metrics(
        self, strategy: "CoAutoGenStrategy", server_round: int, sent: int, valid: int, model: Any, started: float
    ) -> dict[str, Any]:
        spends = [s.epsilon_spent for s in strategy.sites.values()]
        metrics: dict[str, Any] = {
            "phase": "dpsgd",
            "replies": sent,
            "updates_received": valid,
            "dropped": sum(1 for d in strategy.dropped if d["round"] == server_round),
            "dp_noise_multiplier": self.noise_multiplier,
            "epsilon_spent_max": max(spends) if spends else 0.0,
            "epsilon_spent": {s.name: s.epsilon_spent for s in strategy.sites.values()},
            "round_time_s": time.time() - started,
        }
        test = strategy.final.real_test
        if test is not None and len(test):  # the public central split: free to look at every round
            metrics["accuracy_real_test"], _ = evaluate_classifier(model, test.images, test.labels)
        log(
            INFO,
            "DP-SGD round %d: weights from %d of %d sites, central accuracy %s, epsilon spent (max) %.4f",
            server_round,
            valid,
            sent,
            metrics.get("accuracy_real_test"),
            metrics["epsilon_spent_max"],
        )
        return metrics
