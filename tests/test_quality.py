"""Known answers of the synthetic-data quality measures (coautogen_fl/quality.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import sqrtm

from coautogen_fl.quality import (
    frechet_distance,
    frechet_distance_from_moments,
    knn_radii,
    moments,
    precision_recall,
    quality_metrics,
    sample_per_class,
)


def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_identical_sets_have_distance_zero_and_full_precision_and_recall():
    x = gaussian(200, 8, 0)
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_disjoint_far_sets_have_zero_precision_and_recall():
    x = gaussian(100, 5, 1)
    far = gaussian(100, 5, 2) + 1000.0
    assert precision_recall(x, far) == (0.0, 0.0)
    assert frechet_distance(x, far) > 5 * 1000.0**2 * 0.99  # the mean shift dominates


def test_a_shifted_gaussian_matches_the_closed_form():
    x = gaussian(5000, 4, 3)
    shift = np.array([1.0, -2.0, 0.5, 3.0])
    # Same sample, shifted: the covariances are identical, so the distance is exactly |shift|^2.
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Different covariances: against the textbook formula with scipy's general matrix square root.
    a = np.diag([1.0, 2.0, 0.5, 1.5])
    y = gaussian(5000, 4, 4) @ a + shift
    mu1, s1 = moments(x)
    mu2, s2 = moments(y)
    textbook = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))
    assert frechet_distance(x, y) == pytest.approx(textbook, rel=1e-6)
    # And the population value: |shift|^2 + sum (1 - a_i)^2 for N(0, I) against N(shift, A^2).
    population = float(shift @ shift + np.sum((1.0 - np.diag(a)) ** 2))
    assert frechet_distance(x, y) == pytest.approx(population, rel=0.05)


def test_singular_covariances_give_a_finite_non_negative_distance():
    # Fewer samples than dimensions, as with a few dozen images per class in a 196-d embedding.
    x, y = gaussian(20, 50, 5), gaussian(20, 50, 6)
    d = frechet_distance(x, y)
    assert np.isfinite(d) and d > 0
    assert frechet_distance_from_moments(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == pytest.approx(
        3.0
    )


def test_knn_radii_skip_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k=4"):
        knn_radii(points, 4)


def test_precision_and_recall_separate_realism_from_coverage():
    # Synthetic data collapsed onto one of two real modes: realistic (precision 1), half covered.
    rng = np.random.default_rng(7)
    mode_a, mode_b = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0
    real = np.vstack([mode_a, mode_b])
    collapsed = mode_a[::2]  # real points of one mode only
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0
    assert 0.3 < recall <= 0.5


def test_quality_metrics_overall_and_per_class_with_small_classes_as_none():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(60, 3))
    real_labels = np.repeat([0, 1, 2], 20)
    synthetic = real + 0.01
    synthetic_labels = real_labels.copy()
    synthetic_labels[synthetic_labels == 2] = 1  # class "c" has no synthetic data at all
    q = quality_metrics(real, real_labels, synthetic, synthetic_labels, ["a", "b", "c"])
    assert q["k"] == 3 and set(q["per_class"]) == {"a", "b", "c"}
    assert q["per_class"]["a"]["precision"] == 1.0 and q["per_class"]["a"]["recall"] == 1.0
    assert q["per_class"]["a"]["frechet_distance"] == pytest.approx(3 * 0.01**2)  # the mean shift alone
    assert q["per_class"]["c"] == {
        "num_real": 20,
        "num_synthetic": 0,
        "frechet_distance": None,
        "precision": None,
        "recall": None,
    }
    assert q["overall"]["num_real"] == 60 and np.isfinite(q["overall"]["frechet_distance"])


def test_sample_per_class_is_bounded_seeded_and_keeps_small_classes():
    labels = np.array([0] * 50 + [1] * 3)
    picked = sample_per_class(labels, 10, seed=1)
    assert np.bincount(labels[picked]).tolist() == [10, 3]
    assert picked.tolist() == sample_per_class(labels, 10, seed=1).tolist()
    assert sample_per_class(np.array([], dtype=int), 10).size == 0
