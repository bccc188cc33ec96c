"""Privacy accounting for Gaussian vote histograms.

T full-participation Gaussian releases with noise multipliers ``s_t`` compose *exactly* into
mu-GDP, ``mu = sqrt(sum 1 / s_t^2)`` (Dong, Roth, Su 2019), which converts to (epsilon, delta)
in closed form. Subsampled or other mechanisms go through opacus' PRV / RDP (upper bounds).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr

_XTOL = _RTOL = 1e-13  # root-finder tolerance, far below the ledger's 1e-6 slack
ACCOUNTANT_NAMES = ("gdp", "prv", "rdp")


class PrivacyError(ValueError):
    """A privacy parameter is invalid; the message names it, the value given and the fix."""


class PrivacyWarning(UserWarning):
    """A privacy parameter is legal but yields a meaningless guarantee."""


def _require(ok: bool, name: str, value: object, rule: str, fix: str) -> None:
    if not ok:
        raise PrivacyError(f"{name} must {rule} (got {value!r}); {fix}")


def _check_noise(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    s = float(noise_multiplier)
    _require(
        math.isfinite(s) and s > 0,
        name,
        noise_multiplier,
        "be a finite number > 0",
        "derive it with noise_multiplier_for_epsilon(epsilon, delta, rounds)",
    )
    return s


def _check_int(value: int, name: str, minimum: int, fix: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
    _require(ok, name, value, f"be an integer >= {minimum}", fix)
    return int(value)


def _check_delta(delta: float) -> float:
    d = float(delta)
    _require(
        0.0 < d < 1.0,
        "privacy.delta",
        delta,
        "satisfy 0 < delta < 1",  # rejects nan
        "set privacy.delta=1e-5 or another value well below 1/(number of private records)",
    )
    return d


def validate_epsilon_delta(epsilon: float, delta: float, num_private: int | None = None) -> None:
    """Check an (epsilon, delta) target before any noise is calibrated to it.

    Parameters
    ----------
    epsilon : float
        Target epsilon; must be finite and > 0.
    delta : float
        Target delta; must satisfy 0 < delta < 1.
    num_private : int or None (default: None)
        Number of private records (e.g. images at a site). If given and
        ``delta >= 1 / num_private``, a :class:`PrivacyWarning` is issued: a mechanism that
        publishes one random record in the clear meets such a delta, so it protects nobody.

    Raises
    ------
    PrivacyError
        If epsilon or delta is out of range, or num_private is not a positive integer.
    """
    e = float(epsilon)
    _require(
        math.isfinite(e) and e > 0,
        "privacy.epsilon",
        epsilon,
        "be > 0 and finite",
        "set privacy.epsilon=1.0 or another positive value",
    )
    d = _check_delta(delta)
    if num_private is None:
        return
    n = _check_int(num_private, "num_private", 1, "pass the number of private records")
    if d >= 1.0 / n:
        warnings.warn(
            f"PRIVACY WARNING: privacy.delta={d:g} >= 1/num_private = 1/{n} = {1.0 / n:g}. "
            "At this delta a mechanism may publish a whole record, so the guarantee protects "
            f"nobody. Set privacy.delta <= {0.1 / n:.3g} (delta << 1/num_private).",
            PrivacyWarning,
            stacklevel=2,
        )


def gdp_mu(noise_multipliers: Sequence[float]) -> float:
    """Exact mu of composed full-participation Gaussian releases: ``sqrt(sum 1 / s_t**2)``.

    Parameters
    ----------
    noise_multipliers : Sequence[float]
        One noise multiplier ``s_t > 0`` per release; an empty sequence gives 0.0.
    """
    return math.sqrt(sum(1.0 / _check_noise(s) ** 2 for s in noise_multipliers))


def delta_for_mu(mu: float, epsilon: float) -> float:
    """Smallest delta such that mu-GDP implies (epsilon, delta)-DP.

    ``delta = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)``, evaluated in log space.

    Parameters
    ----------
    mu : float
        GDP parameter, finite and >= 0 (0 means nothing released: delta 0).
    epsilon : float
        Epsilon, >= 0.
    """
    mu, eps = float(mu), float(epsilon)
    _require(math.isfinite(mu) and mu >= 0, "mu", mu, "be finite and >= 0", "use gdp_mu(...)")
    _require(eps >= 0, "epsilon", epsilon, "be >= 0", "pass a non-negative epsilon")
    if mu == 0.0:
        return 0.0
    # Log space: exp(eps) overflows beyond eps ~ 709 while the product stays tiny.
    log_a = float(log_ndtr(-eps / mu + mu / 2))
    log_b = eps + float(log_ndtr(-eps / mu - mu / 2))
    if log_a == -math.inf:
        return 0.0
    return max(0.0, -math.exp(log_a) * math.expm1(min(0.0, log_b - log_a)))


def epsilon_for_mu(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 such that mu-GDP implies (epsilon, delta)-DP.

    Parameters
    ----------
    mu : float
        GDP parameter, finite and >= 0. Gives 0.0 if 0 or if ``delta_for_mu(mu, 0) <= delta``.
    delta : float
        Target delta, 0 < delta < 1.
    """
    mu, delta = float(mu), _check_delta(delta)
    if mu == 0.0 or delta_for_mu(mu, 0.0) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while delta_for_mu(mu, hi) > delta:  # delta decreases in epsilon
        hi *= 2.0
    return float(brentq(lambda e: delta_for_mu(mu, e) - delta, 0.0, hi, xtol=_XTOL, rtol=_RTOL))


def mu_for_epsilon(epsilon: float, delta: float) -> float:
    """Largest mu such that mu-GDP implies (epsilon, delta)-DP (inverse of epsilon_for_mu).

    Parameters
    ----------
    epsilon : float
        Target epsilon, finite and > 0.
    delta : float
        Target delta, 0 < delta < 1.
    """
    validate_epsilon_delta(epsilon, delta)
    eps, delta = float(epsilon), float(delta)
    hi = 1.0
    while delta_for_mu(hi, eps) < delta:  # delta increases in mu towards 1
        hi *= 2.0
    return float(brentq(lambda m: delta_for_mu(m, eps) - delta, 0.0, hi, xtol=_XTOL, rtol=_RTOL))


def noise_multiplier_for_epsilon(epsilon: float, delta: float, rounds: int) -> float:
    """Noise multiplier ``sqrt(rounds) / mu_for_epsilon(epsilon, delta)``.

    Used in each of ``rounds`` full-participation releases, it spends exactly epsilon.

    Parameters
    ----------
    epsilon : float
        Total epsilon of the whole run, > 0.
    delta : float
        Total delta, 0 < delta < 1.
    rounds : int
        Number of full-participation Gaussian releases, >= 1.
    """
    rounds = _check_int(rounds, "rounds", 1, "set it to the number of vote releases")
    return math.sqrt(rounds) / mu_for_epsilon(epsilon, delta)


def epsilon_for_noise(noise_multipliers: Sequence[float], delta: float) -> float:
    """Exact epsilon at ``delta`` of full-participation releases (empty sequence: 0.0)."""
    return epsilon_for_mu(gdp_mu(noise_multipliers), delta)


#: Kinds of release a ledger records: a Gaussian (vote, evaluation, DP-SGD) release, or a
#: distributed discrete Gaussian sum through secure aggregation, recorded as its equivalent noise
#: multiplier (:func:`coautogen_fl.privacy.distributed.ddg_noise_multiplier`).
RELEASE_KINDS = ("gaussian", "ddg")


def _check_kind(kind: str) -> str:
    _require(
        kind in RELEASE_KINDS,
        "release kind",
        kind,
        f"be one of {', '.join(map(repr, RELEASE_KINDS))}",
        "use 'gaussian' for a noised vote or DP-SGD release, 'ddg' for a secure-aggregation sum",
    )
    return str(kind)


def _unpack_release(release: Sequence) -> tuple[float, float, int, str]:
    """``(noise, rate, steps)`` or ``(noise, rate, steps, kind)``, validated."""
    _require(
        len(release) in (3, 4),
        "release",
        release,
        "be (noise_multiplier, sample_rate, steps[, kind])",
        "pass one tuple per release",
    )
    noise, rate, steps = release[:3]
    kind = _check_kind(release[3]) if len(release) == 4 else "gaussian"
    q = float(rate)
    _require(0.0 < q <= 1.0, "sample_rate", rate, "satisfy 0 < sample_rate <= 1", "use 1.0 for full participation")
    _require(
        kind == "gaussian" or q == 1.0,
        "sample_rate of a 'ddg' release",
        rate,
        "be 1.0",
        "a secure-aggregation sum takes every site's votes: record it with sample_rate=1.0",
    )
    return _check_noise(noise), q, _check_int(steps, "steps", 1, "count the release's steps"), kind


def epsilon_for_releases(releases: Sequence[tuple], delta: float) -> float:
    """Epsilon at ``delta`` of composed releases ``(noise_multiplier, sample_rate, steps[, kind])``.

    With full-participation Gaussian releases only (every sample rate 1, no ``"ddg"``), the exact
    GDP composition of :func:`epsilon_for_noise` (a release of ``steps`` steps counts as ``steps``
    releases). With any Poisson-subsampled release (DP-SGD) and no ``"ddg"`` release, all of them go
    through one opacus PRV accountant, a full-participation release as sample rate 1. With any
    ``"ddg"`` release (a distributed discrete Gaussian sum, whose guarantee is zCDP, which does not
    compose exactly with GDP), all of them go through opacus' RDP accountant, a ``"ddg"`` release
    as a Gaussian of its equivalent noise multiplier at sample rate 1 (the same Renyi curve). The
    releases are grouped by (noise, rate) in sorted order first, so the result does not depend on
    the order they were charged in: a server that plans a schedule and a site that charges it
    compute the very same number.

    Parameters
    ----------
    releases : Sequence[tuple]
        Per release: noise multiplier > 0, sample rate in (0, 1], steps >= 1 and optionally its
        kind, ``"gaussian"`` (default) or ``"ddg"`` (sample rate must be 1); empty gives 0.0.
    delta : float
        Target delta, 0 < delta < 1.

    Raises
    ------
    PrivacyError
        On an invalid release or delta.
    """
    unpacked = [_unpack_release(r) for r in releases]
    grouped: dict[tuple[float, float], int] = {}
    for noise, q, steps, _ in unpacked:
        grouped[(noise, q)] = grouped.get((noise, q), 0) + steps
    history = tuple((s, q, n) for (s, q), n in sorted(grouped.items()))
    if any(kind == "ddg" for *_, kind in unpacked):
        return _rdp_epsilon(history, _check_delta(delta))
    if all(q == 1.0 for _, q in grouped):  # in the given order: bit-for-bit the votes-only ledger of old
        return epsilon_for_noise([s for s, _, n, _ in unpacked for _ in range(n)], delta)
    return _prv_epsilon(history, _check_delta(delta))


@lru_cache(maxsize=256)
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """opacus RDP epsilon (upper bound, default orders) of a grouped history; cached like
    :func:`_prv_epsilon`, and on one BLAS thread for the same reason."""
    from opacus.accountants import RDPAccountant  # lazy: opacus pulls in torch
    from threadpoolctl import threadpool_limits

    accountant = RDPAccountant()
    accountant.history = list(history)
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        return float(accountant.get_epsilon(delta))


#: Integer Renyi orders: opacus' closed form, where its fractional orders take a slow series.
_INTEGER_ORDERS = list(range(2, 64))


def _integer_order_prv():
    """opacus' PRV accountant whose discretisation domain is sized with integer Renyi orders only.

    opacus sizes the domain (Gopi et al. 2021, remark 5.6) with an RDP bound over 150 orders; the
    99 fractional ones cost ~95 % of a PRV evaluation for a subsampled Gaussian. The minimum over
    a subset of orders is >= the minimum over all, so the bound, and with it the domain, can only
    grow: the truncation stays safe, the mesh (from eps_error) is the same, and the epsilon moves
    by well under PRV's own 0.01 error (tests/test_ledger_dpsgd.py compares both).
    """
    from opacus.accountants import (  # lazy: not on this module's import
        PRVAccountant,
        RDPAccountant,
    )
    from opacus.accountants.analysis.prv import Domain

    class IntegerOrderPRV(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            total = sum(num_self_compositions)
            bound = RDPAccountant()
            bound.history = [(p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions)]
            size = bound.get_epsilon(delta_error / 4, alphas=_INTEGER_ORDERS)
            for p in prvs:  # as opacus' compute_safe_domain_size: each mechanism once, too
                one = RDPAccountant()
                one.history = [(p.noise_multiplier, p.sample_rate, 1)]
                size = max(size, one.get_epsilon(delta_error / (8 * total), alphas=_INTEGER_ORDERS))
            span = max(size, eps_error) + 3
            mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-span, span, mesh)

    return IntegerOrderPRV()


@lru_cache(maxsize=256)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """PRV epsilon (upper bound) of a grouped history; cached: a pure function, asked for the same
    schedule by the server's plan and every site of a simulation in one process."""
    from threadpoolctl import threadpool_limits  # lazy, like opacus

    accountant = _integer_order_prv()
    accountant.history = list(history)
    # One BLAS thread: in a process that forked after OpenBLAS started its pool (Flower's
    # simulation with Ray), a threaded np.dot inside opacus' discretisation can hang for good.
    with threadpool_limits(limits=1, user_api="blas"), np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


@runtime_checkable
class Accountant(Protocol):
    """Records releases and reports the epsilon spent at a given delta."""

    def step(self, noise_multiplier: float, sample_rate: float = 1.0) -> None:
        """Record one Gaussian release (``sample_rate``: Poisson sampling probability)."""

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step)."""

    @property
    def history(self) -> list[tuple[float, float]]:
        """One ``(noise_multiplier, sample_rate)`` per recorded step, oldest first."""


class _Recorded:
    def __init__(self) -> None:
        self._history: list[tuple[float, float]] = []

    def _check(self, noise_multiplier: float, sample_rate: float) -> tuple[float, float]:
        q = float(sample_rate)
        _require(
            0.0 < q <= 1.0,
            "sample_rate",
            sample_rate,
            "satisfy 0 < sample_rate <= 1",
            "use 1.0 when every record takes part in every release",
        )
        return _check_noise(noise_multiplier), q

    @property
    def history(self) -> list[tuple[float, float]]:
        return list(self._history)


class GaussianAccountant(_Recorded):
    """Exact GDP accountant; full participation only (``sample_rate`` must be 1.0)."""

    def step(self, noise_multiplier: float, sample_rate: float = 1.0) -> None:
        s, q = self._check(noise_multiplier, sample_rate)
        _require(
            q == 1.0,
            "GaussianAccountant sample_rate",
            sample_rate,
            "be 1.0 (exact only for full participation)",
            "use OpacusAccountant('prv') / accountant='prv'",
        )
        self._history.append((s, q))

    def get_epsilon(self, delta: float) -> float:
        return epsilon_for_noise([s for s, _ in self._history], delta)


class OpacusAccountant(_Recorded):
    """Opacus PRV or RDP accountant for subsampled or mixed Gaussian mechanisms.

    Parameters
    ----------
    kind : str (default: "prv")
        ``"prv"`` (numerical composition, ~1-2 % above the exact value for full
        participation) or ``"rdp"`` (Renyi DP, typically 7-9 % looser).
    """

    def __init__(self, kind: str = "prv") -> None:
        # Imported here: opacus pulls in torch, which importing this package must not.
        from opacus.accountants import PRVAccountant, RDPAccountant

        classes = {"prv": PRVAccountant, "rdp": RDPAccountant}
        _require(kind in classes, "OpacusAccountant kind", kind, "be 'prv' or 'rdp'", "use 'prv'")
        super().__init__()
        self.kind = kind
        self._impl = classes[kind]()

    def step(self, noise_multiplier: float, sample_rate: float = 1.0) -> None:
        s, q = self._check(noise_multiplier, sample_rate)
        self._impl.step(noise_multiplier=s, sample_rate=q)
        self._history.append((s, q))

    def get_epsilon(self, delta: float) -> float:
        delta = _check_delta(delta)
        if not self._history:
            return 0.0  # opacus PRV cannot build a domain from an empty history
        # PRV takes log(0) at sample_rate=1 and floods harmless divide-by-zero warnings; it
        # also sizes its domain with an internal RDP bound whose alpha-range warning is moot.
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
            if self.kind == "prv":
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(self._impl.get_epsilon(delta))


def make_accountant(name: str) -> Accountant:
    """Build an accountant from its config name.

    Parameters
    ----------
    name : str
        ``"gdp"`` (exact, full participation only), ``"prv"`` or ``"rdp"`` (opacus).
    """
    key = str(name).strip().lower()
    if key == "gdp":
        return GaussianAccountant()
    if key in ("prv", "rdp"):
        return OpacusAccountant(kind=key)
    raise PrivacyError(
        f"privacy.accountant must be one of {', '.join(map(repr, ACCOUNTANT_NAMES))} "
        f"(got {name!r}); set privacy.accountant='gdp' for full-participation Gaussian votes"
    )
