"""One total epsilon per site, split between the Gaussian releases (votes, the noised evaluation)
and the DP-SGD rounds of ``-tt real`` / ``-tt mix``.

The Gaussian releases get ``(1 - share) * epsilon`` on their own (exact GDP, as in ``-tt syn``).
The DP-SGD noise is then the smallest for which the composition of the WHOLE schedule, as a
site's ledger will compose it (:func:`epsilon_for_releases`: opacus PRV), stays within
``epsilon``. Composition is tighter than adding epsilons, so training gets at least its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .accountant import (
    PrivacyError,
    epsilon_for_releases,
    mu_for_epsilon,
    noise_multiplier_for_epsilon,
    validate_epsilon_delta,
)

#: privacy.training_share = 0 means: real 0.9 (the rest pays the noised evaluation), mix 0.5.
DEFAULT_TRAINING_SHARE = {"real": 0.9, "mix": 0.5}
_RELATIVE_TOLERANCE = 1e-3  # how far below the budget the schedule may end (relative)


def training_share(task_type: str, share: float) -> float:
    """The share of epsilon for DP-SGD: ``share`` if > 0, else the task type's default (0 for syn).

    Parameters
    ----------
    task_type : str
        ``syn``, ``real`` or ``mix`` (feedback.task_type).
    share : float
        privacy.training_share, in [0, 1); 0 = derived.
    """
    if task_type == "syn":
        return 0.0
    if not 0.0 <= share < 1.0:
        raise PrivacyError(f"privacy.training_share must be in [0, 1) (got {share!r}); use 0 for the default")
    return share if share > 0 else DEFAULT_TRAINING_SHARE[task_type]


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers of a run's releases and the epsilon the whole schedule composes to.

    Attributes
    ----------
    gaussian : float
        Each vote / noised-evaluation release; 0 when there is none.
    training : float
        Each DP-SGD round (``steps`` steps at ``sample_rate``); 0 when there is none.
    epsilon : float
        What every site's ledger holds after the whole schedule, at the run's delta.
    """

    gaussian: float
    training: float
    epsilon: float


def plan_noise(
    epsilon: float,
    delta: float,
    gaussian_releases: int,
    share: float = 0.0,
    sample_rate: float = 1.0,
    steps: int = 1,
    rounds: int = 0,
) -> NoisePlan:
    """Calibrate a run's noise to one total (epsilon, delta) per site.

    Parameters
    ----------
    epsilon, delta : float
        The site's total budget, > 0, and delta in (0, 1).
    gaussian_releases : int
        Vote rounds plus the noised evaluation, >= 0.
    share : float (default: 0.0)
        Training share (see :func:`training_share`); ignored when ``rounds`` is 0.
    sample_rate, steps, rounds : (default: 1.0, 1, 0)
        Each DP-SGD round's public Poisson rate and local steps; number of rounds (0: -tt syn).
    """
    validate_epsilon_delta(epsilon, delta)
    if rounds <= 0:
        gaussian = noise_multiplier_for_epsilon(epsilon, delta, gaussian_releases) if gaussian_releases else 0.0
        return NoisePlan(
            gaussian, 0.0, epsilon_for_releases([(gaussian, 1.0, 1)] * gaussian_releases, delta) if gaussian else 0.0
        )
    gaussian = (
        noise_multiplier_for_epsilon((1.0 - share) * epsilon, delta, gaussian_releases) if gaussian_releases else 0.0
    )
    fixed = [(gaussian, 1.0, 1)] * gaussian_releases

    def spent(sigma: float) -> float:
        return epsilon_for_releases(fixed + [(sigma, sample_rate, steps)] * rounds, delta)

    # Secant steps on log(epsilon) against log(noise): smooth and near-linear, so a few PRV
    # evaluations (each ~0.1-1 s) find the noise; the last step only ever moves it up. The
    # start is the central-limit (GDP) estimate for the training share: mu = q sqrt(n (e^(1/s^2) - 1)).
    mu = mu_for_epsilon(share * epsilon, delta) if 0 < share else mu_for_epsilon(epsilon, delta)
    guess = 1.0 / math.sqrt(math.log1p(mu * mu / (sample_rate * sample_rate * steps * rounds)))
    x0, x1 = math.log(guess), math.log(guess * 1.05)
    f0, f1 = math.log(spent(guess) / epsilon), math.log(spent(guess * 1.05) / epsilon)
    for _ in range(30):
        if abs(f1) < _RELATIVE_TOLERANCE and f1 <= 0:
            break
        slope = (f1 - f0) / (x1 - x0) if x1 != x0 and f1 != f0 else -2.0
        step = max(-2.0, min(2.0, -f1 / slope if slope < 0 else 1.0))
        x0, f0 = x1, f1
        x1 = x1 + step + (_RELATIVE_TOLERANCE / 2 if step > 0 else 0.0)
        f1 = math.log(spent(math.exp(x1)) / epsilon)
    while f1 > 0:  # never above the budget: nudge the noise up
        x1 += _RELATIVE_TOLERANCE
        f1 = math.log(spent(math.exp(x1)) / epsilon)
    return NoisePlan(gaussian, math.exp(x1), epsilon * math.exp(f1))
