"""Acceptance: the exact Gaussian-DP accountant agrees with independent implementations.

Criterion: within 1 % of epsilon of Google's ``dp-accounting`` privacy-loss-distribution (PLD)
accountant on a grid of noise multipliers (0.5-50), rounds (1-100) and deltas (1e-3-1e-8), and
within 3 % of opacus' PRV accountant on the same mechanisms.

What each check covers:

* ``PLDAccountant`` with ``SelfComposedDpEvent(GaussianDpEvent(s), T)``: dp-accounting folds T
  identical Gaussians into one of std ``s / sqrt(T)`` (its own statement of the composition rule)
  and then builds that Gaussian's PLD numerically (connect-the-dots discretisation). This checks
  our closed-form mu -> (epsilon, delta) conversion and root finding on the whole grid.
* ``PLDAccountant`` with ``ComposedDpEvent([GaussianDpEvent(s_1), ..., GaussianDpEvent(s_T)])``:
  every release is composed separately by FFT convolution of discretised PLDs, so this checks the
  composition rule ``mu = sqrt(sum 1 / s_t^2)`` itself, including schedules whose noise varies.
* dp-accounting's RDP accountant: a valid but looser upper bound, never below the exact value.
* opacus' PRV accountant (another numerical composition), on six cells.

Both numerical accountants round pessimistically, so they may exceed the exact epsilon by their
discretisation error but never fall below it.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from coautogen_fl.privacy import epsilon_for_noise

dp_accounting = pytest.importorskip(
    "dp_accounting", reason="the independent accountant; install the test extra: pip install -e '.[test]'"
)
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

NOISES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
ROUNDS = (1, 3, 10, 30, 100)
DELTAS = (1e-3, 1e-5, 1e-8)
REL_TOL = 0.01  # the acceptance criterion
ABS_TOL_SMALL = 1e-3  # used instead when both epsilons are below 1e-3 (no grid cell is)
UPPER_BOUND_SLACK = 1e-6  # float noise allowed when checking "numerical bound >= exact"


def _disagrees(ours: float, reference: float, rel: float) -> bool:
    if ours < ABS_TOL_SMALL and reference < ABS_TOL_SMALL:
        return abs(ours - reference) > ABS_TOL_SMALL
    return abs(ours - reference) > rel * reference


def _pld(events: list, interval: float) -> PLDAccountant:
    accountant = PLDAccountant(value_discretization_interval=interval)
    for event in events:
        accountant.compose(event)
    return accountant


@pytest.mark.parametrize("noise, rounds", list(itertools.product(NOISES, ROUNDS)))
def test_agrees_with_google_pld_on_grid(noise, rounds):
    mu = math.sqrt(rounds) / noise
    # Discretisation error in epsilon is at most about one interval; epsilon grows like mu^2 / 2,
    # so a coarser interval at large mu keeps the error ~1e-4 relative and the grid under ~10 s.
    interval = 1e-4 * max(1.0, mu * mu)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), rounds)
    pld = _pld([event], interval)
    bad = []
    for delta in DELTAS:
        ours, theirs = epsilon_for_noise([noise] * rounds, delta), pld.get_epsilon(delta)
        if _disagrees(ours, theirs, REL_TOL) or ours > theirs * (1 + UPPER_BOUND_SLACK):
            bad.append(f"delta={delta:g}: ours {ours:.6g} vs PLD {theirs:.6g}")
    assert not bad, f"noise {noise}, {rounds} rounds: " + "; ".join(bad)


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param([0.5] * 3, id="0.5x3"),
        pytest.param([0.5] * 100, id="0.5x100"),
        pytest.param([1.0] * 30, id="1x30"),
        pytest.param([11.7973] * 10, id="11.8x10"),
        pytest.param([50.0] * 100, id="50x100"),
        pytest.param(list(NOISES) * 3, id="mixed-0.5..50x3"),
        pytest.param(list(np.linspace(20.0, 5.0, 10)), id="decreasing-20..5"),
    ],
)
def test_composition_rule_matches_numerical_pld_convolution(schedule):
    mu = math.sqrt(sum(1.0 / s**2 for s in schedule))
    interval = 1e-3 * max(1.0, mu)  # one FFT convolution per release: coarser than the grid
    pld = _pld([dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(s) for s in schedule])], interval)
    for delta in DELTAS:
        ours, theirs = epsilon_for_noise(schedule, delta), pld.get_epsilon(delta)
        assert not _disagrees(ours, theirs, REL_TOL), f"delta={delta:g}: ours {ours:.6g} vs PLD {theirs:.6g}"
        assert ours <= theirs * (1 + UPPER_BOUND_SLACK)


def test_rdp_is_a_looser_upper_bound_on_grid():
    below = []
    for noise, rounds, delta in itertools.product(NOISES, ROUNDS, DELTAS):
        rdp = RdpAccountant()
        rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), rounds))
        ours, bound = epsilon_for_noise([noise] * rounds, delta), rdp.get_epsilon(delta)
        if not ours <= bound * (1 + UPPER_BOUND_SLACK) or bound > 1.5 * ours:
            below.append(f"noise {noise}, {rounds} rounds, delta {delta:g}: ours {ours:.6g}, RDP {bound:.6g}")
    assert not below, "; ".join(below)


@pytest.mark.parametrize(
    "noise, rounds, delta, eps_error",
    [
        # eps_error (opacus' absolute tolerance, default 0.01) set near 0.1 % of the expected epsilon:
        # the default would be 40 % of epsilon 0.025; much finer makes PRV take minutes at 100 rounds.
        (0.5, 1, 1e-3, 1e-3),
        (0.5, 100, 1e-8, 0.1),
        (50.0, 1, 1e-3, 1e-4),
        (50.0, 100, 1e-8, 1e-3),
        (11.7973, 10, 1e-5, 1e-3),
        (2.0, 30, 1e-5, 1e-2),
    ],
)
def test_agrees_with_opacus_prv(noise, rounds, delta, eps_error):
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    # sample_rate=1 makes PRV take log(0) (harmless); its internal RDP domain bound may warn.
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            prv.step(noise_multiplier=noise, sample_rate=1.0)
        theirs = prv.get_epsilon(delta, eps_error=eps_error)
    ours = epsilon_for_noise([noise] * rounds, delta)
    assert ours == pytest.approx(theirs, rel=0.03)
    assert ours <= theirs * (1 + UPPER_BOUND_SLACK)
