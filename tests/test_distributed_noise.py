"""Distributed discrete Gaussian noise for secure aggregation: the exact sampler (CKS 2020), the
privacy of the sum (Kairouz-Liu-Steinke 2021), its planning and ledger accounting (RDP), and the
range / modulus arithmetic that keeps the SecAgg+ sum from wrapping."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest
from scipy.stats import chi2

from coautogen_fl.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PrivacyError,
    PrivacyLedger,
    epsilon_for_noise,
    epsilon_for_releases,
)
from coautogen_fl.privacy.discrete_gaussian import discrete_gaussian
from coautogen_fl.privacy.distributed import (
    check_modulus,
    clip_probability,
    ddg_epsilon,
    ddg_noise_multiplier,
    noise_for_epsilon_secagg,
    secagg_bound,
    share_variance,
    wrap_free,
)

DELTA = 1e-5


def exact_pmf(variance: float, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    support = np.arange(-half_width, half_width + 1)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * variance))
    return support, weights / weights.sum()


# ------------------------------------------------------------------------------------ sampler


def test_sampler_returns_int64_of_the_requested_shape():
    assert discrete_gaussian(20.0, 7).shape == (7,)
    x = discrete_gaussian(20.0, (3, 4))
    assert x.shape == (3, 4) and x.dtype == np.int64
    assert discrete_gaussian(1.0, 0).shape == (0,)


@pytest.mark.parametrize("variance", [4.0, 0.3])
def test_sampler_moments_and_pmf_match_the_exact_discrete_gaussian(variance):
    n = 20_000
    x = discrete_gaussian(variance, n)
    support, pmf = exact_pmf(variance, 60)
    mean, var = float(support @ pmf), float(support**2 @ pmf)  # exact moments (var < variance at 0.3)
    fourth = float(support**4 @ pmf)
    assert abs(mean) < 1e-12 and var <= variance
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * math.sqrt((fourth - var**2) / n)
    # Chi-square goodness of fit on the bins with expected count >= 5, the tails pooled.
    counts = np.array([np.sum(x == k) for k in support])
    expected = n * pmf
    keep = expected >= 5
    observed = np.append(counts[keep], n - counts[keep].sum())
    wanted = np.append(expected[keep], n - expected[keep].sum())
    mask = wanted > 0
    stat = float(np.sum((observed[mask] - wanted[mask]) ** 2 / wanted[mask]))
    assert stat < chi2.ppf(1 - 1e-6, int(mask.sum()) - 1)
    assert 0.5 * np.abs(counts / n - pmf).sum() < 0.03  # total variation


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_sampler_refuses_bad_variance(bad):
    with pytest.raises(PrivacyError, match="variance"):
        discrete_gaussian(bad, 3)


def test_sampler_ignores_numpys_global_seed():
    np.random.seed(0)
    a = discrete_gaussian(100.0, 200)
    np.random.seed(0)
    b = discrete_gaussian(100.0, 200)
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------------------- ddg_epsilon


def test_ddg_epsilon_approaches_and_never_beats_the_continuous_gaussian():
    for s2, n, d in [(0.5, 2, 10), (1.0, 5, 100), (4.0, 10, 1000), (50.0, 3, 10**5), (1e4, 20, 10)]:
        continuous = 2.0 / (math.sqrt(n) * math.sqrt(s2))
        assert ddg_epsilon(s2, 2.0, n, d) >= continuous
    assert ddg_epsilon(50.0, 2.0, 8, 1000) == pytest.approx(2.0 / math.sqrt(8 * 50.0), rel=1e-12)
    assert ddg_epsilon(20.0, 1.0, 1, 10) == 1.0 / math.sqrt(20.0)  # one share: a discrete Gaussian, no tau
    assert ddg_epsilon(0.5, 1.0, 3, 10) > 1.0 / math.sqrt(1.5) * 1.05  # small shares: tau matters
    assert ddg_noise_multiplier(20.0, 1.0, 3, 10) == 1.0 / ddg_epsilon(20.0, 1.0, 3, 10)


def test_more_summands_lower_ddg_epsilon():
    values = [ddg_epsilon(2.0, 1.0, n, 50) for n in (1, 2, 3, 5, 10, 40)]
    assert all(a > b for a, b in pairwise(values))


@pytest.mark.parametrize(
    "args",
    [
        (0.49, 1.0, 3, 10),
        (0.0, 1.0, 3, 10),
        (math.nan, 1.0, 3, 10),
        (2.0, 0.0, 3, 10),
        (2.0, -1.0, 3, 10),
        (2.0, 1.0, 0, 10),
        (2.0, 1.0, 3, 0),
        (2.0, 1.0, 2.5, 10),
        (2.0, 1.0, True, 10),
    ],
)
def test_ddg_epsilon_refuses_bad_input(args):
    with pytest.raises(PrivacyError):
        ddg_epsilon(*args)


def test_share_variance():
    assert share_variance(2.0, 3.0, 4) == 9.0
    with pytest.raises(PrivacyError):
        share_variance(0.0, 1.0, 2)


# --------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("epsilon,rounds,sens,n,dim,evals", [(1.0, 5, 1.0, 3, 10, 1), (2.0, 8, 16.0, 5, 200, 0)])
def test_the_plan_fits_a_sites_ledger_exactly(tmp_path, epsilon, rounds, sens, n, dim, evals):
    s = noise_for_epsilon_secagg(epsilon, DELTA, rounds, sens, n, dim, gaussian_releases=evals)
    ddg = ddg_noise_multiplier(share_variance(s, sens, n), sens, n, dim)  # what each site computes
    ledger = PrivacyLedger(tmp_path / "l.json", epsilon, DELTA)
    for r in range(evals):
        ledger.charge(s, round=100 + r, run_id="x")
    spent = 0.0
    for r in range(rounds):
        spent = ledger.charge(ddg, round=r + 1, run_id="x", kind="ddg")
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=1e-3)
    before = (tmp_path / "l.json").read_bytes()
    with pytest.raises(BudgetExceededError):
        ledger.charge(ddg, round=rounds + 1, run_id="x", kind="ddg")
    assert (tmp_path / "l.json").read_bytes() == before
    # A smaller multiplier would not fit: the plan is not needlessly noisy.
    smaller = ddg_noise_multiplier(share_variance(s * 0.99, sens, n), sens, n, dim)
    assert epsilon_for_releases([(smaller, 1.0, rounds, "ddg")] + [(s * 0.99, 1.0, 1)] * evals, DELTA) > epsilon


def test_plan_refuses_bad_input():
    with pytest.raises(PrivacyError):
        noise_for_epsilon_secagg(0.0, DELTA, 3, 1.0, 3, 10)
    with pytest.raises(PrivacyError):
        noise_for_epsilon_secagg(1.0, DELTA, 0, 1.0, 3, 10)


# ----------------------------------------------------------------------------------- ledger


def test_a_ddg_entry_round_trips_through_the_file(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, 5.0, DELTA)
    ledger.charge(6.0, round=1, run_id="a")
    spent = ledger.charge(4.0, round=2, run_id="a", kind="ddg")
    entries = json.loads(path.read_text())["entries"]
    assert "kind" not in entries[0] and entries[1]["kind"] == "ddg"
    reopened = PrivacyLedger(path, 5.0, DELTA)
    assert [e.kind for e in reopened.entries] == ["gaussian", "ddg"]
    assert reopened.spent_epsilon() == spent == epsilon_for_releases([(6.0, 1.0, 1), (4.0, 1.0, 1, "ddg")], DELTA)
    assert reopened.epsilon_after(4.0, kind="ddg") > spent


def test_a_gaussian_only_ledger_is_unchanged(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", 5.0, DELTA)
    for r, s in enumerate((4.0, 6.0, 5.0)):
        ledger.charge(s, round=r)
    assert ledger.spent_epsilon() == epsilon_for_noise([4.0, 6.0, 5.0], DELTA)  # bit for bit
    assert epsilon_for_releases([(4.0, 1.0, 1, "gaussian"), (6.0, 1.0, 2)], DELTA) == epsilon_for_noise(
        [4.0, 6.0, 6.0], DELTA
    )


def test_mixed_ledger_is_rdp_no_tighter_than_gdp_and_order_free(tmp_path):
    charges = [(6.0, "gaussian"), (4.0, "ddg"), (5.0, "gaussian"), (4.0, "ddg")]
    spent = []
    for name, order in (("a", charges), ("b", charges[::-1])):
        ledger = PrivacyLedger(tmp_path / f"{name}.json", 10.0, DELTA)
        for r, (s, kind) in enumerate(order):
            ledger.charge(s, round=r, kind=kind)
        spent.append(ledger.spent_epsilon())
    assert spent[0] == spent[1]
    assert spent[0] >= epsilon_for_noise([s for s, _ in charges], DELTA)


def test_ddg_with_subsampling_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", 5.0, DELTA)
    with pytest.raises(PrivacyError, match="ddg"):
        ledger.charge(4.0, round=1, sample_rate=0.5, kind="ddg")
    with pytest.raises(PrivacyError, match="kind"):
        ledger.charge(4.0, round=1, kind="laplace")
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize("extra", [{"kind": "laplace"}, {"kind": "ddg", "sample_rate": 0.5, "steps": 2}])
def test_an_unknown_kind_in_the_file_is_corrupt(tmp_path, extra):
    entry = {"noise_multiplier": 6.0, "round": 1, "run_id": "x", "timestamp": "2026-01-01T00:00:00+00:00", **extra}
    (tmp_path / "l.json").write_text(
        json.dumps({"version": 1, "delta": DELTA, "epsilon_budget": 1.0, "entries": [entry]})
    )
    with pytest.raises(LedgerCorruptError):
        PrivacyLedger(tmp_path / "l.json", 1.0, DELTA)


# ---------------------------------------------------------------------- range and modulus


def test_noise_never_exceeds_a_slack_with_tiny_clip_probability():
    s2 = 20.0
    bound = secagg_bound(0, s2, 20_000, failure=1e-9)
    assert clip_probability(s2, bound, 20_000) <= 1e-9
    assert clip_probability(s2, bound - 1, 20_000) > 1e-9  # the smallest such slack
    z = discrete_gaussian(s2, 20_000)
    assert np.abs(z).max() <= bound
    assert secagg_bound(7.5, s2, 20_000, failure=1e-9) == bound + 8


def test_clip_probability_is_monotone():
    slacks = [clip_probability(10.0, m, 100) for m in range(0, 60, 3)]
    assert all(a >= b for a, b in pairwise(slacks))
    assert clip_probability(10.0, 0, 100) == 1.0
    assert clip_probability(10.0, 20, 100) < clip_probability(10.0, 20, 1000) < clip_probability(20.0, 20, 1000)
    assert secagg_bound(3, 10.0, 100) <= secagg_bound(3, 10.0, 1000) <= secagg_bound(3, 40.0, 1000)
    assert secagg_bound(3, 10.0, 100, failure=1e-3) <= secagg_bound(3, 10.0, 100)


def test_check_modulus_refuses_a_wrapping_configuration():
    assert wrap_free(100, 5, 1001) and not wrap_free(100, 5, 1000)
    check_modulus(100, 5, 2**12)
    with pytest.raises(PrivacyError, match=r"modulus_range to at least 2\*\*10"):
        check_modulus(100, 5, 1000)
    with pytest.raises(PrivacyError):
        wrap_free(0, 5, 1000)
