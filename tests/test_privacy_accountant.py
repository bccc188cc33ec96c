"""Exact Gaussian-DP accounting, its error handling, and cross-checks against opacus."""

import math
import warnings

import pytest

from coautogen_fl.privacy import (
    Accountant,
    GaussianAccountant,
    OpacusAccountant,
    PrivacyError,
    PrivacyWarning,
    delta_for_mu,
    epsilon_for_mu,
    epsilon_for_noise,
    gdp_mu,
    make_accountant,
    mu_for_epsilon,
    noise_multiplier_for_epsilon,
    validate_epsilon_delta,
)

DELTA = 1e-5


@pytest.mark.parametrize(
    "epsilon, rounds, expected",
    [(1.0, 1, 3.73), (1.0, 10, 11.80), (5.0, 1, 0.892), (5.0, 10, 2.820)],
)
def test_noise_multiplier_matches_reference_table(epsilon, rounds, expected):
    # Reference numbers from ENVIRONMENT.md "Privacy numbers" (delta 1e-5).
    sigma = noise_multiplier_for_epsilon(epsilon, DELTA, rounds)
    assert sigma == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 7, 50])
def test_round_trip_epsilon_sigma_epsilon(epsilon, rounds):
    sigma = noise_multiplier_for_epsilon(epsilon, DELTA, rounds)
    assert epsilon_for_noise([sigma] * rounds, DELTA) == pytest.approx(epsilon, rel=1e-6)
    # The calibrated mu sits exactly on the delta target.
    assert delta_for_mu(mu_for_epsilon(epsilon, DELTA), epsilon) == pytest.approx(DELTA, rel=1e-6)


def test_varying_noise_composes_like_single_mu():
    noises = [0.8, 2.5, 4.0, 10.0]
    mu = math.sqrt(sum(1 / s**2 for s in noises))
    assert gdp_mu(noises) == pytest.approx(mu, rel=1e-12)
    # One release with noise 1/mu is the same mechanism as the whole composition.
    assert epsilon_for_noise(noises, DELTA) == pytest.approx(epsilon_for_noise([1 / mu], DELTA), rel=1e-9)
    assert epsilon_for_noise(noises, DELTA) == pytest.approx(epsilon_for_mu(mu, DELTA), rel=1e-12)


def test_epsilon_strictly_decreasing_in_noise():
    eps = [epsilon_for_noise([s] * 5, DELTA) for s in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert eps[-1] > 0


def test_edge_cases_zero_mu_and_large_epsilon():
    assert gdp_mu([]) == 0.0
    assert epsilon_for_noise([], DELTA) == 0.0
    assert epsilon_for_mu(0.0, DELTA) == 0.0
    # exp(1000) overflows a float; the log-space formula must not.
    assert delta_for_mu(1.0, 1000.0) == 0.0
    assert 0.0 <= delta_for_mu(40.0, 800.0) < 1.0
    # Known value: mu=1, eps=0 gives delta = 2*Phi(1/2) - 1.
    assert delta_for_mu(1.0, 0.0) == pytest.approx(0.3829249225480262, rel=1e-12)


@pytest.mark.parametrize("sigma, steps", [(3.73, 1), (11.8, 10), (2.0, 5), (0.892, 1)])
def test_exact_agrees_with_opacus_prv_and_is_tighter_than_rdp(sigma, steps):
    exact = epsilon_for_noise([sigma] * steps, DELTA)
    prv, rdp = OpacusAccountant("prv"), OpacusAccountant("rdp")
    for _ in range(steps):
        prv.step(sigma, 1.0)
        rdp.step(sigma, 1.0)
    eps_prv = prv.get_epsilon(DELTA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        eps_rdp = rdp.get_epsilon(DELTA)
    assert exact <= eps_prv * 1.01
    assert eps_prv == pytest.approx(exact, rel=0.03)
    assert exact < eps_rdp


@pytest.mark.parametrize("sigma, steps", [(2.0, 1), (11.8, 10)])
def test_prv_accountant_silences_its_harmless_warnings(sigma, steps):
    # sigma 11.8 triggers opacus' internal RDP domain-size warning, sample_rate 1 log(0).
    acc = OpacusAccountant("prv")
    for _ in range(steps):
        acc.step(sigma, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.get_epsilon(DELTA) > 0


def test_gaussian_accountant_matches_functions_and_records_history():
    acc = make_accountant("gdp")
    assert isinstance(acc, Accountant) and isinstance(acc, GaussianAccountant)
    assert acc.get_epsilon(DELTA) == 0.0
    for s in (2.0, 3.0, 3.0):
        acc.step(s)
    assert acc.history == [(2.0, 1.0), (3.0, 1.0), (3.0, 1.0)]
    assert acc.get_epsilon(DELTA) == pytest.approx(epsilon_for_noise([2.0, 3.0, 3.0], DELTA))
    with pytest.raises(PrivacyError, match="OpacusAccountant"):
        acc.step(2.0, sample_rate=0.1)
    assert len(acc.history) == 3


def test_opacus_accountant_handles_subsampling():
    acc = make_accountant("prv")
    assert isinstance(acc, OpacusAccountant) and acc.kind == "prv"
    assert acc.get_epsilon(DELTA) == 0.0
    for _ in range(20):
        acc.step(1.0, sample_rate=0.05)
    assert acc.history == [(1.0, 0.05)] * 20
    # Subsampling amplifies privacy: far below 20 full-participation releases.
    assert acc.get_epsilon(DELTA) < 0.5 * epsilon_for_noise([1.0] * 20, DELTA)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon_rejected_with_fix(epsilon):
    with pytest.raises(PrivacyError, match=r"privacy\.epsilon must be > 0.*got.*set privacy"):
        validate_epsilon_delta(epsilon, DELTA)
    with pytest.raises(PrivacyError):
        noise_multiplier_for_epsilon(epsilon, DELTA, 10)


@pytest.mark.parametrize("delta", [0.0, 1.0, 1.5, -1e-5, float("nan")])
def test_bad_delta_rejected_with_fix(delta):
    with pytest.raises(PrivacyError, match=r"privacy\.delta must satisfy 0 < delta < 1"):
        validate_epsilon_delta(1.0, delta)
    with pytest.raises(PrivacyError, match=r"privacy\.delta"):
        epsilon_for_noise([1.0], delta)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_noise_multiplier_rejected(bad):
    with pytest.raises(PrivacyError, match="noise_multiplier must be a finite number > 0"):
        gdp_mu([1.0, bad])
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GaussianAccountant().step(bad)


@pytest.mark.parametrize("rounds", [0, -3, 2.5, True])
def test_bad_rounds_rejected(rounds):
    with pytest.raises(PrivacyError, match="rounds must be an integer >= 1"):
        noise_multiplier_for_epsilon(1.0, DELTA, rounds)


def test_unknown_accountant_lists_valid_names():
    with pytest.raises(PrivacyError, match=r"'gdp', 'prv', 'rdp'.*got 'moments'"):
        make_accountant("moments")
    with pytest.raises(PrivacyError, match="kind"):
        OpacusAccountant("gdp")


def test_warning_when_delta_protects_nobody():
    with pytest.warns(PrivacyWarning, match=r"protects nobody.*<= 1e-05"):
        validate_epsilon_delta(1.0, 1e-3, num_private=10_000)
    with pytest.warns(PrivacyWarning):
        validate_epsilon_delta(1.0, 0.01, num_private=100)  # exactly 1/n counts too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_epsilon_delta(1.0, 1e-5, num_private=10_000)
    with pytest.raises(PrivacyError, match="num_private"):
        validate_epsilon_delta(1.0, 1e-5, num_private=0)
