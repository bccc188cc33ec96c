"""The Gaussian mechanism on vote vectors and the noise level of the aggregate."""

import math

import numpy as np
import pytest

from coautogen_fl.privacy import GaussianMechanism, PrivacyError, aggregate_noise_std


def test_noise_std_is_multiplier_times_sensitivity():
    assert GaussianMechanism(2.5).noise_std == 2.5
    assert GaussianMechanism(2.5, sensitivity=0.4).noise_std == pytest.approx(1.0)


@pytest.mark.parametrize("sigma, sensitivity", [(1.0, 1.0), (3.7, 1.0), (2.0, 0.25)])
def test_empirical_noise_std_matches(sigma, sensitivity):
    mech = GaussianMechanism(sigma, sensitivity)
    values = np.full(200_000, 5.0)
    noise = mech.apply(values, np.random.default_rng(0)) - values
    assert noise.std() == pytest.approx(mech.noise_std, rel=0.01)
    assert abs(noise.mean()) < 4 * mech.noise_std / math.sqrt(values.size)


def test_apply_leaves_input_untouched_and_returns_float64():
    votes = np.array([[3, 0, 1], [0, 2, 7]], dtype=np.int64)
    before = votes.copy()
    out = GaussianMechanism(1.0).apply(votes, np.random.default_rng(1))
    np.testing.assert_array_equal(votes, before)
    assert out.dtype == np.float64 and out.shape == votes.shape
    assert not np.array_equal(out, votes)

    floats = np.array([1.0, 2.0, 3.0])
    out = GaussianMechanism(1.0).apply(floats, np.random.default_rng(1))
    assert out is not floats and not np.shares_memory(out, floats)
    np.testing.assert_array_equal(floats, [1.0, 2.0, 3.0])


def test_sensitivity_scales_noise_for_the_same_draws():
    values = np.zeros(1000)
    small = GaussianMechanism(2.0, sensitivity=1.0).apply(values, np.random.default_rng(7))
    large = GaussianMechanism(2.0, sensitivity=3.0).apply(values, np.random.default_rng(7))
    np.testing.assert_allclose(large, 3.0 * small, rtol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_parameters_rejected(bad):
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GaussianMechanism(bad)
    with pytest.raises(PrivacyError, match="sensitivity"):
        GaussianMechanism(1.0, sensitivity=bad)


def test_apply_requires_a_generator():
    with pytest.raises(TypeError, match="default_rng"):
        GaussianMechanism(1.0).apply(np.zeros(3), np.random.RandomState(0))


def test_aggregate_noise_std_local_vs_central():
    assert aggregate_noise_std(2.0, 1.0, 9, "local") == pytest.approx(6.0)
    assert aggregate_noise_std(2.0, 0.5, 9, "local") == pytest.approx(3.0)
    assert aggregate_noise_std(2.0, 1.0, 9, "central") == pytest.approx(2.0)
    assert aggregate_noise_std(2.0, 1.0, 1, "local") == aggregate_noise_std(2.0, 1.0, 1, "central")


def test_aggregate_noise_std_local_matches_simulation():
    rng = np.random.default_rng(3)
    mech = GaussianMechanism(1.5)
    sites = 4
    total = sum(mech.apply(np.zeros(100_000), rng) for _ in range(sites))
    assert total.std() == pytest.approx(aggregate_noise_std(1.5, 1.0, sites, "local"), rel=0.01)


def test_aggregate_noise_std_errors():
    with pytest.raises(PrivacyError, match=r"'local', 'central'.*got 'secret'"):
        aggregate_noise_std(1.0, 1.0, 3, "secret")
    with pytest.raises(PrivacyError, match="num_sites"):
        aggregate_noise_std(1.0, 1.0, 0, "local")
