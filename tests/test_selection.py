"""Tests of the selection step: thresholding noised votes and choosing parents."""

from __future__ import annotations

import numpy as np
import pytest

from coautogen_fl.selection import Selection, select_parents, threshold_votes


def test_threshold_zeroes_votes_below_threshold_times_std():
    votes = np.array([-3.0, 0.0, 1.9, 2.0, 2.1, 10.0])
    kept = threshold_votes(votes, threshold=1.0, noise_std=2.0)
    np.testing.assert_array_equal(kept, [0.0, 0.0, 0.0, 2.0, 2.1, 10.0])
    # the cut scales with the threshold
    kept = threshold_votes(votes, threshold=2.5, noise_std=2.0)
    np.testing.assert_array_equal(kept, [0.0, 0.0, 0.0, 0.0, 0.0, 10.0])


def test_threshold_zero_keeps_positive_votes_and_clips_negative_noise():
    votes = np.array([-0.5, 0.0, 0.25, 3.0])
    kept = threshold_votes(votes, threshold=0.0, noise_std=5.0)
    np.testing.assert_array_equal(kept, [0.0, 0.0, 0.25, 3.0])
    assert np.all(kept >= 0)
    np.testing.assert_array_equal(votes, [-0.5, 0.0, 0.25, 3.0])  # input untouched


def test_rank_mode_allocation_is_proportional_and_sums_per_class():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    votes = np.array([6.0, 3.0, 1.0, 0.0, 5.0, 5.0, 0.0])
    sel = select_parents(votes, labels, per_label=10, mode="rank", rng=np.random.default_rng(0))
    counts = np.bincount(sel.parents, minlength=7)
    np.testing.assert_array_equal(counts, [6, 3, 1, 0, 5, 5, 0])
    assert sel.fallback_labels == []
    # every parent of class c is a class-c candidate, per_label per class
    np.testing.assert_array_equal(np.bincount(labels[sel.parents]), [10, 10])


def test_rank_mode_largest_remainder():
    labels = np.zeros(3, dtype=np.int64)
    votes = np.array([1.0, 1.0, 1.0])
    sel = select_parents(votes, labels, per_label=7, mode="rank", rng=np.random.default_rng(0))
    counts = np.bincount(sel.parents, minlength=3)
    assert counts.sum() == 7
    assert sorted(counts) == [2, 2, 3]
    votes = np.array([0.7, 0.2, 0.1])  # shares 3.5, 1.0, 0.5 of 5
    sel = select_parents(votes, labels, per_label=5, mode="rank", rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(sel.parents, minlength=3), [4, 1, 0])


def test_rank_mode_is_deterministic_and_ignores_the_rng():
    rng_votes = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    votes = rng_votes.random(20) * 10
    a = select_parents(votes, labels, 13, "rank", np.random.default_rng(1))
    b = select_parents(votes, labels, 13, "rank", np.random.default_rng(2))
    np.testing.assert_array_equal(a.parents, b.parents)
    assert a.parents.size == 4 * 13


def test_sample_mode_frequencies_follow_votes():
    labels = np.array([0, 0, 0, 0, 1, 1])
    votes = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 9.0])
    per_label = 20000
    sel = select_parents(votes, labels, per_label, "sample", np.random.default_rng(42))
    counts = np.bincount(sel.parents, minlength=6)
    np.testing.assert_allclose(counts[:4] / per_label, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    assert counts[4] == 0  # zero votes: never drawn
    assert counts[5] == per_label
    assert sel.fallback_labels == []


def test_sample_mode_is_reproducible_with_the_seed():
    labels = np.repeat(np.arange(3), 4)
    votes = np.arange(12, dtype=np.float64)
    a = select_parents(votes, labels, 8, "sample", np.random.default_rng(7))
    b = select_parents(votes, labels, 8, "sample", np.random.default_rng(7))
    c = select_parents(votes, labels, 8, "sample", np.random.default_rng(8))
    np.testing.assert_array_equal(a.parents, b.parents)
    assert not np.array_equal(a.parents, c.parents)


@pytest.mark.parametrize("mode", ["rank", "sample"])
def test_all_zero_class_falls_back_to_uniform(mode):
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    votes = np.array([0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0])
    per_label = 8000 if mode == "sample" else 8
    sel = select_parents(votes, labels, per_label, mode, np.random.default_rng(0))
    assert isinstance(sel, Selection)
    assert sel.fallback_labels == [0, 2]
    counts = np.bincount(sel.parents, minlength=8)
    if mode == "rank":
        np.testing.assert_array_equal(counts[:4], [2, 2, 2, 2])
        np.testing.assert_array_equal(counts[4:6], [6, 2])
        np.testing.assert_array_equal(counts[6:], [4, 4])
    else:
        np.testing.assert_allclose(counts[:4] / per_label, [0.25] * 4, atol=0.02)
        np.testing.assert_allclose(counts[4:6] / per_label, [0.75, 0.25], atol=0.02)


def test_parents_are_grouped_by_class_in_label_order():
    labels = np.array([2, 0, 1, 2, 0, 1])
    votes = np.ones(6)
    sel = select_parents(votes, labels, 3, "rank", np.random.default_rng(0))
    np.testing.assert_array_equal(labels[sel.parents], [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="selection mode must be 'sample' or 'rank' \\(got 'best'\\)"):
        select_parents(np.ones(2), np.zeros(2, int), 2, "best", np.random.default_rng(0))
