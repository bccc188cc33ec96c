"""A run's noise plan: every release a site will make, calibrated so that each site's ledger
ends at (or just under) its epsilon. One function per privacy mode and task type:

- :func:`secagg_noise`: ``-tt syn`` with ``privacy.mode=secagg`` (secure vote sums, the noised evaluation);
- :func:`training_plan`: ``-tt real`` / ``mix`` in local or central mode (Gaussian releases + DP-SGD);
- :func:`secagg_training_plan`: ``-tt real`` / ``mix`` with ``privacy.mode=secagg`` (secure vote
  sums, the noised evaluation, and secure DP-SGD sums, all composed as the ledger composes them).
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING

from flwr.common import log

from coautogen_fl.config import RunConfig
from coautogen_fl.downstream import build_classifier
from coautogen_fl.privacy import epsilon_for_releases, noise_multiplier_for_epsilon
from coautogen_fl.privacy.distributed import noise_for_epsilon_secagg, secagg_releases
from coautogen_fl.privacy.split import NoisePlan, plan_noise, training_share
from coautogen_fl.rater import SIGNED_RATERS, vote_sensitivity
from coautogen_fl.secure_gradients import SecureGradientEncoding
from coautogen_fl.secure_votes import SecAggShape, plan_secagg_noise, secagg_vote_releases

if TYPE_CHECKING:
    from .outcome import FinalStage


def expected_sites(cfg: RunConfig) -> int:
    """The sites the federation is expected to sample each round (at least 2)."""
    return max(2, round(cfg.federation.num_hospitals * cfg.federation.fraction_train))


def vote_encoding_args(cfg: RunConfig, num_classes: int) -> dict:
    """:meth:`coautogen_fl.secure_votes.SecureVoteEncoding.plan`'s public settings of a run's votes."""
    p, f = cfg.privacy, cfg.feedback
    capped = cfg.data.real_per_label > 0
    return dict(
        k=f.k,
        unit=p.unit,
        sensitivity=vote_sensitivity(p.unit, capped=capped, signed=f.rater in SIGNED_RATERS),
        capped=capped,
        vote_cap=p.secagg_vote_cap,
        coordinates=num_classes * f.candidates_per_label,
    )


def secagg_noise(cfg: RunConfig, num_classes: int, evaluations: int) -> float:
    """The noise multiplier of a secagg run's vote sums (and its noised evaluation), for the
    sites the federation is expected to sample each round."""
    p, f = cfg.privacy, cfg.feedback
    sampled = expected_sites(cfg)
    args = vote_encoding_args(cfg, num_classes)
    sigma = plan_secagg_noise(p.epsilon, p.delta, f.rounds, evaluations, sampled, p.secagg_threshold, args)
    log(
        INFO,
        "privacy plan (secagg): %d secure vote sum(s) and %d noised evaluation(s) at noise multiplier %.4g; each site "
        "adds a discrete-Gaussian share for the threshold of %.0f%% of the sampled sites",
        f.rounds,
        evaluations,
        sigma,
        100 * p.secagg_threshold,
    )
    return sigma


def training_plan(cfg: RunConfig, gaussian_releases: int) -> NoisePlan:
    """The noise of a -tt real/mix run: the Gaussian releases' share, the DP-SGD noise for the rest."""
    p, d = cfg.privacy, cfg.downstream
    share = training_share(cfg.feedback.task_type, p.training_share)
    plan = plan_noise(p.epsilon, p.delta, gaussian_releases, share, d.dp_sample_rate, d.dp_local_steps, d.dp_rounds)
    log(
        INFO,
        "privacy plan (-tt %s): %d Gaussian release(s) at noise %.4g, %d DP-SGD rounds of %d steps at rate %g and "
        "noise %.4g; each site's ledger will hold epsilon %.4f of %g",
        cfg.feedback.task_type,
        gaussian_releases,
        plan.gaussian,
        d.dp_rounds,
        d.dp_local_steps,
        d.dp_sample_rate,
        plan.training,
        plan.epsilon,
        p.epsilon,
    )
    return plan


def model_parameters(final: "FinalStage") -> int:
    """The downstream model's trainable parameters (the length of a secure gradient sum)."""
    spec = final.model_spec()
    model = build_classifier(spec["model"], spec["num_classes"], spec["channels"], spec["image_size"])
    return sum(p.numel() for p in model.parameters())  # as the sites and the server count them


def secagg_training_plan(cfg: RunConfig, num_classes: int, evaluations: int, parameters: int) -> NoisePlan:
    """The noise of a ``-tt real`` / ``mix`` run with ``privacy.mode=secagg``.

    The votes (mix) and the noised evaluation get ``(1 - share) x epsilon`` on their own, as in
    :func:`secagg_noise` (real: the evaluation alone, at a Gaussian noise for that share). The
    secure DP-SGD sums (``dp_rounds x dp_local_steps`` full-batch steps) then get the smallest noise
    for which the whole schedule, composed as every site's ledger composes it, stays within epsilon.
    """
    p, f, d = cfg.privacy, cfg.feedback, cfg.downstream
    share = training_share(f.task_type, p.training_share)
    rest = (1.0 - share) * p.epsilon
    threshold = SecAggShape.plan(expected_sites(cfg), p.secagg_threshold).sites_in_sum
    if f.task_type == "mix" and f.rounds:
        args = vote_encoding_args(cfg, num_classes)
        gaussian = plan_secagg_noise(
            rest, p.delta, f.rounds, evaluations, expected_sites(cfg), p.secagg_threshold, args
        )
        prior = secagg_vote_releases(gaussian, f.rounds, evaluations, threshold, args)
    else:
        gaussian = noise_multiplier_for_epsilon(rest, p.delta, evaluations) if evaluations else 0.0
        prior = [(gaussian, 1.0, 1, "gaussian")] * evaluations
    steps = d.dp_rounds * d.dp_local_steps
    # The integer sensitivity depends on the model and the clip only, not on the noise.
    sensitivity = SecureGradientEncoding(
        1.0, threshold, d.dp_max_grad_norm, parameters, p.secagg_gradient_cap
    ).integer_sensitivity
    training = noise_for_epsilon_secagg(p.epsilon, p.delta, steps, sensitivity, threshold, parameters, 0, prior)
    total = epsilon_for_releases(
        [*prior, *secagg_releases(training, steps, sensitivity, threshold, parameters)], p.delta
    )
    log(
        INFO,
        "privacy plan (-tt %s, secagg): %d secure vote sum(s), %d noised evaluation(s) at noise %.4g, %d secure "
        "full-batch DP-SGD sums at noise %.4g (each site's share sized for %d sites in the sum); each site's ledger "
        "will hold epsilon %.4f of %g",
        f.task_type,
        f.rounds if f.task_type == "mix" else 0,
        evaluations,
        gaussian,
        steps,
        training,
        threshold,
        total,
        p.epsilon,
    )
    return NoisePlan(gaussian, training, total)
