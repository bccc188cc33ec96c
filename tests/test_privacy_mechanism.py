"""The Gaussian mechanism on vote vectors and the noise level of the aggregate."""

import inspect
import math

import numpy as np
import pytest
from scipy import stats

from coautogen_fl.privacy import GaussianMechanism, PrivacyError, aggregate_noise_std
from coautogen_fl.privacy.mechanism import RELEASE_GRID, os_entropy_normal, snap


def test_noise_std_is_multiplier_times_sensitivity():
    assert GaussianMechanism(2.5).noise_std == 2.5
    assert GaussianMechanism(2.5, sensitivity=0.4).noise_std == pytest.approx(1.0)


@pytest.mark.parametrize("sigma, sensitivity", [(1.0, 1.0), (3.7, 1.0), (2.0, 0.25)])
def test_empirical_noise_std_matches(sigma, sensitivity):
    mech = GaussianMechanism(sigma, sensitivity)
    values = np.full(200_000, 5.0)
    noise = mech.apply(values) - values
    # snapping to the 1/16 grid adds variance 1/(12 * 16^2): far below 1 % here
    assert noise.std() == pytest.approx(mech.noise_std, rel=0.01)
    assert abs(noise.mean()) < 4 * mech.noise_std / math.sqrt(values.size)


def test_os_entropy_normal_is_standard_normal_and_not_seedable():
    z = os_entropy_normal(400_000)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, rel=0.01)
    assert stats.kstest(z[:50_000], "norm").pvalue > 1e-4
    assert np.isfinite(z).all()
    np.random.seed(0)
    a = os_entropy_normal(8)
    np.random.seed(0)
    assert not np.array_equal(a, os_entropy_normal(8))  # no global seed reaches it


def test_released_values_are_snapped_to_the_public_grid():
    """Floating-point noise would leave input-dependent low-order bits (Mironov); the release
    keeps only multiples of 1/RELEASE_GRID."""
    out = GaussianMechanism(1.3).apply(np.arange(5000) / 7.0)
    np.testing.assert_array_equal(out * RELEASE_GRID, np.round(out * RELEASE_GRID))
    np.testing.assert_array_equal(snap(np.array([0.03, 0.04, -1.51])), [0.0, 0.0625, -1.5])


def test_apply_leaves_input_untouched_and_returns_float64():
    votes = np.array([[3, 0, 1], [0, 2, 7]], dtype=np.int64)
    before = votes.copy()
    out = GaussianMechanism(1.0).apply(votes)
    np.testing.assert_array_equal(votes, before)
    assert out.dtype == np.float64 and out.shape == votes.shape
    assert not np.array_equal(out, votes)

    floats = np.array([1.0, 2.0, 3.0])
    out = GaussianMechanism(1.0).apply(floats)
    assert out is not floats and not np.shares_memory(out, floats)
    np.testing.assert_array_equal(floats, [1.0, 2.0, 3.0])


def test_apply_takes_no_generator():
    """There is no way to hand the mechanism a seeded generator."""
    assert list(inspect.signature(GaussianMechanism.apply).parameters) == ["self", "values"]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_parameters_rejected(bad):
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GaussianMechanism(bad)
    with pytest.raises(PrivacyError, match="sensitivity"):
        GaussianMechanism(1.0, sensitivity=bad)


def test_aggregate_noise_std_local_vs_central():
    assert aggregate_noise_std(2.0, 1.0, 9, "local") == pytest.approx(6.0)
    assert aggregate_noise_std(2.0, 0.5, 9, "local") == pytest.approx(3.0)
    assert aggregate_noise_std(2.0, 1.0, 9, "central") == pytest.approx(2.0)
    assert aggregate_noise_std(2.0, 1.0, 1, "local") == aggregate_noise_std(2.0, 1.0, 1, "central")


def test_aggregate_noise_std_local_matches_simulation():
    mech = GaussianMechanism(1.5)
    sites = 4
    total = sum(mech.apply(np.zeros(100_000)) for _ in range(sites))
    assert total.std() == pytest.approx(aggregate_noise_std(1.5, 1.0, sites, "local"), rel=0.01)


def test_aggregate_noise_std_errors():
    with pytest.raises(PrivacyError, match=r"'local', 'central'.*got 'secret'"):
        aggregate_noise_std(1.0, 1.0, 3, "secret")
    with pytest.raises(PrivacyError, match="num_sites"):
        aggregate_noise_std(1.0, 1.0, 0, "local")
