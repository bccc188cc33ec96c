"""A site's DP-SGD releases (``-tt real`` / ``-tt mix``), mixed into :class:`clients.site.Site`.

- ``privacy.mode=local``: the site runs its DP-SGD steps (opacus) and releases the new weights.
- ``privacy.mode=central``: the site releases its clean clipped gradient sum of one Poisson batch
  to a server its node config trusts, which noises the sum of all sites once.
- ``privacy.mode=secagg``: the site releases its integer clipped gradient sum of all its voter
  images plus its discrete-Gaussian share of the noise, inside Flower's SecAgg+, which masks it
  before it leaves (:mod:`coautogen_fl.secure_gradients`).

Every release is charged to the site's ledger before it is computed, and stored so that a resumed
run asking the very same request gets the very same release without a second charge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from coautogen_fl import protocol as P
from coautogen_fl.downstream import build_classifier, load_numpy_state_dict, state_dict_to_numpy
from coautogen_fl.dpsgd import DPSGDSettings, check_private_model, clipped_gradient_sum, dp_train
from coautogen_fl.privacy import PrivacyError
from coautogen_fl.privacy.discrete_gaussian import discrete_gaussian
from coautogen_fl.secure_gradients import SecureGradientEncoding

from .secagg import SecAggSetup

if TYPE_CHECKING:
    from .site import Site


class SiteTraining:
    """The DP-SGD handlers of a :class:`clients.site.Site` (see the module docstring)."""

    def train_dp(self: "Site", request: P.TrainRequest, run_id: str = "") -> P.TrainReply:
        """:meth:`_train_dp` under the site's release lock."""
        with self.releases.exclusive():
            return self._train_dp(request, run_id)

    def _model(self: "Site", request: P.TrainRequest) -> tuple[DPSGDSettings, Any]:
        """The request's settings and global model, checked before anything is charged: a
        malformed model, or one opacus cannot train per example (BatchNorm), fails here."""
        settings = DPSGDSettings(
            request.noise_multiplier,
            request.sample_rate,
            request.steps,
            request.max_grad_norm,
            request.lr,
            request.optimizer,
        ).validate()
        model = build_classifier(request.model, request.num_classes, request.channels, request.image_size)
        load_numpy_state_dict(model, request.weights)
        check_private_model(model)
        return settings, model

    def _reply(self: "Site", arrays: dict, spent: float, request: P.TrainRequest, gradients: bool) -> P.TrainReply:
        return P.TrainReply(
            arrays,
            spent,
            self.terms.epsilon_budget,
            self.partition_id,
            request.noise_multiplier,
            self.label,
            gradients=gradients,
        )

    def _train_dp(self: "Site", request: P.TrainRequest, run_id: str = "") -> P.TrainReply:
        """DP-SGD on this site's voter images (``-tt real`` / ``mix``): the ledger is charged with
        the request's (noise multiplier, public sample rate, steps) before any step runs; a charge
        past the budget raises ``BudgetExceededError`` and nothing is trained or released. A round
        this site already paid for is answered with the stored weights if the request is the
        same, and refused otherwise."""
        settings, model = self._model(request)
        if request.privacy_mode != "local":
            return self._gradient_step(request, settings, model, run_id)
        run_key, fingerprint = request.run_key or run_id, request.fingerprint()
        stored = self._stored(run_key, "dpsgd", request.round, fingerprint)
        if stored is None:
            spent = self._charge(
                run_key,
                "dpsgd",
                request.round,
                fingerprint,
                settings.noise_multiplier,
                settings.sample_rate,
                settings.steps,
            )
            dp_train(model, self.data.train.images, self.data.train.labels, settings)
            weights = state_dict_to_numpy(model)
            self.releases.save(
                run_key, "dpsgd", request.round, fingerprint, {k: v.tolist() for k, v in weights.items()}
            )
        else:
            spent = self.ledger.spent_epsilon()
            weights = {k: np.asarray(v, dtype=request.weights[k].dtype) for k, v in stored.items()}
        return self._reply(weights, spent, request, gradients=False)

    def _gradient_step(
        self: "Site", request: P.TrainRequest, settings: DPSGDSettings, model: Any, run_id: str
    ) -> P.TrainReply:
        """Central-mode DP-SGD: this site's clipped per-example gradient sum of one Poisson batch,
        clean, to a server its node config trusts (the server noises the sum of all sites), charged
        first as one step of (noise multiplier, public sample rate). A repeated request of a
        resumed run gets the stored sum."""
        if request.privacy_mode != "central" or settings.steps != 1:
            raise PrivacyError(
                f"a DP-SGD request with privacy-mode {request.privacy_mode!r} and {settings.steps} steps; "
                "expected local, or central with 1 step (one gradient sum per round); a secagg round arrives "
                "only inside Flower's SecAgg+ protocol"
            )
        if not self.terms.trusts_server:
            raise P.SiteRefusal(
                "the server asked for a clean gradient sum (central DP-SGD) but this site does not trust it "
                "(node config trust-server)"
            )
        run_key, fingerprint = request.run_key or run_id, request.fingerprint()
        stored = self._stored(run_key, "dpsgd", request.round, fingerprint)
        if stored is None:
            spent = self._charge(
                run_key, "dpsgd", request.round, fingerprint, settings.noise_multiplier, settings.sample_rate
            )
            sums = clipped_gradient_sum(
                model, self.data.train.images, self.data.train.labels, settings.sample_rate, settings.max_grad_norm
            )
            self.releases.save(run_key, "dpsgd", request.round, fingerprint, {k: v.tolist() for k, v in sums.items()})
        else:
            spent = self.ledger.spent_epsilon()
            sums = {k: np.asarray(v, dtype=np.float32) for k, v in stored.items()}
        return self._reply(sums, spent, request, gradients=True)

    def secure_gradient_step(
        self: "Site", request: P.TrainRequest, setup: SecAggSetup, run_id: str = ""
    ) -> tuple[P.TrainReply, np.ndarray]:
        """:meth:`_secure_gradient_step` under the site's release lock."""
        with self.releases.exclusive():
            return self._secure_gradient_step(request, setup, run_id)

    def _secure_gradient_step(
        self: "Site", request: P.TrainRequest, setup: SecAggSetup, run_id: str = ""
    ) -> tuple[P.TrainReply, np.ndarray]:
        """Secure DP-SGD (``privacy.mode=secagg``): the integer clipped gradient sum of all this
        site's voter images plus its discrete-Gaussian share of the noise, charged first
        (``kind="ddg"``, sample rate 1); Flower's SecAgg+ masks it and reveals only the sum.

        The share is sized for ``min(the request's sites in the sum, the fewest SecAgg+'s own setup
        allows, the site's own secagg-trust-sites)`` sites, as for secure votes. Returns the reply's
        public bookkeeping and the noised integers SecAgg+ masks."""
        settings, model = self._model(request)
        if request.privacy_mode != "secagg" or settings.steps != 1 or settings.sample_rate != 1.0:
            raise PrivacyError(
                f"a SecAgg+ DP-SGD round asked for privacy-mode {request.privacy_mode!r}, {settings.steps} steps at "
                f"sample rate {settings.sample_rate:g}; expected secagg, 1 step, rate 1 (a secure sum of every example)"
            )
        if request.secagg_summands < 2 or not request.secagg_gradient_cap > 0:
            raise PrivacyError(
                f"a SecAgg+ DP-SGD round with {request.secagg_summands} sites in the sum and gradient cap "
                f"{request.secagg_gradient_cap!r}; expected >= 2 and > 0"
            )
        encoding = SecureGradientEncoding(
            request.noise_multiplier,
            request.secagg_summands,
            settings.max_grad_norm,
            sum(int(np.prod(p.shape)) for p in model.parameters()),
            request.secagg_gradient_cap,
        )
        setup.check(encoding)
        summands = self.terms.secagg_summands(min(request.secagg_summands, setup.sites_in_sum))
        run_key, fingerprint = request.run_key or run_id, request.fingerprint()
        stored = self._stored(run_key, "dpsgd", request.round, fingerprint)
        if stored is not None:
            integers = np.asarray(stored["gradients"], dtype=np.int64)
            return self._reply({}, self.ledger.spent_epsilon(), request, gradients=True), integers
        charge = encoding.charge_multiplier(summands)  # validates the request before the charge
        spent = self._charge(run_key, "dpsgd", request.round, fingerprint, charge, ledger_kind="ddg")
        sums = clipped_gradient_sum(model, self.data.train.images, self.data.train.labels, 1.0, settings.max_grad_norm)
        clean = encoding.encode(sums)
        noised = clean + discrete_gaussian(encoding.share_variance(summands), clean.shape)
        # The bound's slack is exceeded with probability <= 2^-64 (as for secure votes): a no-op but
        # for that, and it keeps SecAgg+'s own clipping from ever acting.
        integers = np.clip(noised, -encoding.bound, encoding.bound)
        self.releases.save(run_key, "dpsgd", request.round, fingerprint, {"gradients": integers.tolist()})
        return self._reply({}, spent, request, gradients=True), integers
