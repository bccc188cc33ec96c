"""Distributed discrete Gaussian noise for votes summed through secure aggregation (SecAgg+).

Each site adds discrete Gaussian noise N_Z(0, sigma_share^2) to its integer vote vector, with
``sigma_share^2 = (s * D)^2 / t`` (:func:`share_variance`): ``s`` the planned noise multiplier,
``D`` the L2 sensitivity in integer units, ``t`` the minimum number of sites whose inputs are in
the reconstructed sum. The server only sees the modular sum, which carries the sum of at least
``t`` independent shares. That sum is not a discrete Gaussian, but it is almost as private:

Kairouz, Liu, Steinke 2021 ("The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML; arXiv 2102.06387, Theorem 1): for sigma >= 1/2 and n independent
N_Z(0, sigma^2)^d, adding their sum to a query of L2 sensitivity D2 is (1/2) eps^2-concentrated DP,

    eps = min( sqrt(D2^2 / (n sigma^2) + tau d / 2),  D2 / (sqrt(n) sigma) + tau sqrt(d) ),
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)).

(1/2) eps^2-zCDP is Renyi DP ``alpha eps^2 / 2`` at every order: the Renyi curve of a Gaussian
of noise multiplier ``1 / eps`` (:func:`ddg_noise_multiplier`), which the site ledger records with
``kind="ddg"`` and composes with opacus' RDP accountant (:mod:`.accountant`).

The noise is sampled *exactly* from the operating system's entropy by
:func:`.discrete_gaussian.discrete_gaussian`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .accountant import (
    PrivacyError,
    _check_int,
    _check_noise,
    _require,
    epsilon_for_releases,
    validate_epsilon_delta,
)
from .discrete_gaussian import _check_variance

#: Kairouz-Liu-Steinke Theorem 1 assumes sigma >= 1/2; refusing sigma^2 < 1/2 is stricter (safe).
MIN_SHARE_VARIANCE = 0.5
#: Relative width at which :func:`noise_for_epsilon_secagg` stops bisecting.
_BISECT_RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# Privacy of the sum (Kairouz, Liu, Steinke 2021)
# --------------------------------------------------------------------------------------------


def _check_sensitivity(sensitivity: float) -> float:
    c = float(sensitivity)
    _require(
        math.isfinite(c) and c > 0,
        "sensitivity",
        sensitivity,
        "be a finite number > 0",
        "pass the L2 norm bound of a site's integer vote vector",
    )
    return c


def ddg_tau(share_variance: float, summands: int) -> float:
    """``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` of KLS 2021 Theorem 1 (0 for n = 1)."""
    s2 = float(share_variance)
    return 10.0 * math.fsum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, int(summands)))


def ddg_epsilon(share_variance: float, sensitivity: float, summands: int, dim: int) -> float:
    """The zCDP parameter of a sum of distributed discrete Gaussian shares (KLS 2021, Theorem 1).

    Adding the sum of ``summands`` independent N_Z(0, share_variance)^dim to an integer vector of
    L2 sensitivity ``sensitivity`` is (1/2) eps^2-concentrated DP with
    ``eps = min(sqrt(D^2/(n s2) + tau d/2), D/(sqrt(n) sqrt(s2)) + tau sqrt(d))``, tau of :func:`ddg_tau`.
    Always >= ``D / sqrt(n s2)``, the continuous Gaussian's value, and close to it once s2 >~ 1.

    Parameters
    ----------
    share_variance : float
        sigma^2 of each site's share, >= 1/2 (the theorem needs sigma >= 1/2; 1/2 is stricter).
    sensitivity : float
        L2 sensitivity D of one site's integer vote vector, > 0.
    summands : int
        n: the minimum number of independent shares in the sum (SecAgg+'s reconstruction
        threshold), >= 1.
    dim : int
        d: number of coordinates, >= 1.

    Raises
    ------
    PrivacyError
        On an invalid argument, or share_variance < 1/2.
    """
    s2 = float(share_variance)
    _require(
        math.isfinite(s2) and s2 >= MIN_SHARE_VARIANCE,
        "share_variance",
        share_variance,
        f"be finite and >= {MIN_SHARE_VARIANCE} (the distributed discrete Gaussian theorem needs sigma >= 1/2)",
        "raise the noise multiplier or the vote quantisation scale",
    )
    d2 = _check_sensitivity(sensitivity)
    n = _check_int(summands, "summands", 1, "pass SecAgg+'s reconstruction threshold (minimum sites in the sum)")
    d = _check_int(dim, "dim", 1, "pass the number of coordinates of the vote vector")
    tau = ddg_tau(s2, n)
    return min(math.sqrt(d2 * d2 / (n * s2) + tau * d / 2.0), d2 / (math.sqrt(n) * math.sqrt(s2)) + tau * math.sqrt(d))


def ddg_noise_multiplier(share_variance: float, sensitivity: float, summands: int, dim: int) -> float:
    """``1 / ddg_epsilon(...)``: the Gaussian noise multiplier with the same Renyi curve
    (``alpha / (2 s^2) = alpha eps^2 / 2``), which a ledger charges with ``kind="ddg"``.
    Parameters and errors as :func:`ddg_epsilon`."""
    return 1.0 / ddg_epsilon(share_variance, sensitivity, summands, dim)


def share_variance(noise_multiplier: float, sensitivity: float, summands: int) -> float:
    """Variance of each site's share, ``(noise_multiplier * sensitivity)^2 / summands``.

    Parameters
    ----------
    noise_multiplier : float
        Planned noise multiplier of the sum, > 0.
    sensitivity : float
        L2 sensitivity of one site's integer vote vector, > 0.
    summands : int
        Minimum number of shares in the sum, >= 1.
    """
    s = _check_noise(noise_multiplier)
    c = _check_sensitivity(sensitivity)
    n = _check_int(summands, "summands", 1, "pass SecAgg+'s reconstruction threshold")
    return (s * c) ** 2 / n


def secagg_releases(s: float, rounds: int, sensitivity: float, summands: int, dim: int, gaussian: int = 0) -> list:
    """The ledger entries (:func:`epsilon_for_releases` tuples) of ``rounds`` secure sums planned at
    noise multiplier ``s`` for ``summands`` shares of integer sensitivity ``sensitivity`` over ``dim``
    coordinates, then ``gaussian`` plain Gaussian releases at ``s``: what every site charges."""
    ddg = ddg_noise_multiplier(share_variance(s, sensitivity, summands), sensitivity, summands, dim)
    return [(ddg, 1.0, 1, "ddg")] * rounds + [(s, 1.0, 1, "gaussian")] * gaussian


def noise_for_epsilon_secagg(
    epsilon: float,
    delta: float,
    rounds: int,
    sensitivity: float,
    summands: int,
    dim: int,
    gaussian_releases: int = 0,
    prior: Sequence[tuple] = (),
) -> float:
    """Smallest planned noise multiplier whose secure-aggregation schedule spends <= epsilon.

    The schedule is ``rounds`` distributed discrete Gaussian sums at share variance
    ``share_variance(s, sensitivity, summands)`` plus ``gaussian_releases`` plain Gaussian releases
    at noise multiplier ``s``, composed exactly as the site ledger does (:func:`epsilon_for_releases`
    on the same tuples, RDP), so every site can charge the whole plan. Found by bisection; the
    returned ``s`` always satisfies the budget (never rounded below it). If even the smallest ``s``
    the theorem allows (share variance 1/2) is within budget, that ``s`` is returned.

    Parameters
    ----------
    epsilon : float
        Total epsilon of the run, > 0.
    delta : float
        Total delta, 0 < delta < 1.
    rounds : int
        Number of secure-aggregation releases, >= 1.
    sensitivity : float
        L2 sensitivity of a site's integer vote vector, > 0.
    summands : int
        Minimum number of sites in each sum, >= 1.
    dim : int
        Number of coordinates of a vote vector, >= 1.
    gaussian_releases : int (default: 0)
        Extra plain Gaussian releases (e.g. a noised evaluation) at the same noise multiplier.
    prior : sequence of release tuples (default: none)
        Releases of the same ledger planned before at their own noise (:func:`epsilon_for_releases`
        tuples, e.g. ``-tt mix``'s secure vote sums before its secure DP-SGD rounds).

    Raises
    ------
    PrivacyError
        On an invalid argument.
    """
    validate_epsilon_delta(epsilon, delta)
    rounds = _check_int(rounds, "rounds", 1, "set it to the number of secure-aggregation releases")
    gaussian = _check_int(gaussian_releases, "gaussian_releases", 0, "count the plain Gaussian releases")
    c = _check_sensitivity(sensitivity)
    n = _check_int(summands, "summands", 1, "pass SecAgg+'s reconstruction threshold")
    d = _check_int(dim, "dim", 1, "pass the number of coordinates")
    target = float(epsilon)
    if prior and epsilon_for_releases(list(prior), delta) >= target:
        raise PrivacyError(
            f"the releases planned before already spend epsilon {target:g} or more: nothing is left for "
            f"{rounds} secure sum(s); raise privacy.epsilon or lower privacy.training_share"
        )

    def spent(s: float) -> float:
        return epsilon_for_releases([*prior, *secagg_releases(s, rounds, c, n, d, gaussian)], delta)

    lo = math.sqrt(MIN_SHARE_VARIANCE * n) / c
    while share_variance(lo, c, n) < MIN_SHARE_VARIANCE:  # float rounding: step into the domain
        lo = math.nextafter(lo, math.inf)
    if spent(lo) <= target:
        return lo
    hi = 2.0 * lo
    while spent(hi) > target:
        lo, hi = hi, 2.0 * hi
    while hi - lo > _BISECT_RTOL * hi:
        mid = 0.5 * (lo + hi)
        if spent(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------------------------
# Range of a noised coordinate, and the SecAgg+ modulus
# --------------------------------------------------------------------------------------------


def _log_clip(share_var: float, slack: float, coordinates: int) -> float:
    # |Z| > slack  <=>  |Z| >= floor(slack) + 1 for an integer Z; P(|Z| >= m) <= 2 exp(-m^2 / (2 s2)).
    m = math.floor(slack) + 1
    return math.log(2.0 * coordinates) - m * m / (2.0 * share_var)


def clip_probability(share_variance: float, slack: float, coordinates: int) -> float:
    """Upper bound on P(some of ``coordinates`` iid N_Z(0, share_variance) has |z| > slack).

    Union bound over the coordinates of the discrete Gaussian's subgaussian tail
    ``P(|Z| >= m) <= 2 exp(-m^2 / (2 sigma^2))`` (CKS 2020), at ``m = floor(slack) + 1``; capped at 1.

    Parameters
    ----------
    share_variance : float
        sigma^2 of each coordinate's noise, > 0.
    slack : float
        Threshold, >= 0.
    coordinates : int
        Number of noised coordinates, >= 1.
    """
    s2 = _check_variance(share_variance, "share_variance")
    x = float(slack)
    _require(math.isfinite(x) and x >= 0, "slack", slack, "be finite and >= 0", "pass the room left above the votes")
    c = _check_int(coordinates, "coordinates", 1, "pass the number of noised coordinates")
    return min(1.0, math.exp(_log_clip(s2, x, c)))


def secagg_bound(clean_max: float, share_variance: float, coordinates: int, failure: float = 2.0**-64) -> int:
    """Integer B with every noised coordinate ``v + z`` (``0 <= v <= clean_max``) in [-B, B]
    except with probability <= ``failure`` over all ``coordinates`` (see :func:`clip_probability`).

    ``B = ceil(clean_max) + m`` with the smallest integer slack ``m`` whose clip bound is <= failure.

    Parameters
    ----------
    clean_max : float
        Largest clean (un-noised) coordinate, finite and >= 0.
    share_variance : float
        sigma^2 of each site's noise, > 0.
    coordinates : int
        Number of noised coordinates covered by the guarantee, >= 1.
    failure : float (default: 2**-64)
        Allowed probability that some coordinate falls outside, 0 < failure < 1.

    Raises
    ------
    PrivacyError
        On an invalid argument.
    """
    v = float(clean_max)
    _require(
        math.isfinite(v) and v >= 0,
        "clean_max",
        clean_max,
        "be finite and >= 0",
        "pass the largest possible clean vote count",
    )
    s2 = _check_variance(share_variance, "share_variance")
    c = _check_int(coordinates, "coordinates", 1, "pass the number of noised coordinates")
    f = float(failure)
    _require(0.0 < f < 1.0, "failure", failure, "satisfy 0 < failure < 1", "use 2**-64")
    log_f = math.log(f)
    m = max(0, math.ceil(math.sqrt(2.0 * s2 * (math.log(2.0 * c) - log_f))) - 1)
    while _log_clip(s2, m, c) > log_f:
        m += 1
    while m > 0 and _log_clip(s2, m - 1, c) <= log_f:
        m -= 1
    return math.ceil(v) + m


def wrap_free(bound: int, sites: int, modulus: int) -> bool:
    """Whether the modular sum of ``sites`` coordinates, each in [0, 2 * bound], never wraps:
    ``sites * 2 * bound < modulus``.

    After Flower's SecAgg+ quantisation each site's coordinate is offset by ``bound`` into
    [0, 2 * bound]. Flower also prepends a weight factor per site of up to its quantisation range,
    summed with the same modulus: that entry does not wrap iff ``sites * quantization_range <
    modulus``, which the caller must check too (it does not depend on the noise bound).

    Parameters
    ----------
    bound : int
        B of :func:`secagg_bound`, >= 1.
    sites : int
        Largest number of sites in the sum, >= 1.
    modulus : int
        SecAgg+ modulus range, >= 2.
    """
    b = _check_int(bound, "bound", 1, "derive it with secagg_bound(...)")
    n = _check_int(sites, "sites", 1, "pass the largest number of sites in the sum")
    m = _check_int(modulus, "modulus", 2, "pass SecAgg+'s modulus_range")
    return n * 2 * b < m


def check_modulus(bound: int, sites: int, modulus: int, fix: str | None = None) -> None:
    """Refuse a SecAgg+ configuration whose modular sum could wrap (see :func:`wrap_free`).

    ``fix`` is what the message tells the user to change; by default the smallest power of two
    that fits as the modulus.

    Raises
    ------
    PrivacyError
        If ``sites * 2 * bound >= modulus``.
    """
    if not wrap_free(bound, sites, modulus):
        need = int(sites) * 2 * int(bound)
        fix = fix or (
            f"set the SecAgg+ modulus_range to at least 2**{need.bit_length()} (> {need}), "
            "or lower the vote quantisation scale / noise bound"
        )
        raise PrivacyError(
            f"SecAgg+ modulus {modulus} is too small: {sites} sites x 2 x bound {bound} = {need} "
            f"could wrap around the modular sum; {fix}"
        )
