"""Tests of the PE rater: vote histograms and their per-sample L2 sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from coautogen_fl.rater import Rater, build_rater, normalise_site_vector, vote_histogram


def random_case(rng: np.random.Generator):
    """Random private data and candidates; some classes may lack candidates or voters."""
    dim = int(rng.integers(1, 40))
    num_classes = int(rng.integers(1, 6))
    n_private = int(rng.integers(1, 60))
    n_candidates = int(rng.integers(1, 30))
    k = int(rng.integers(1, 6))
    private = rng.normal(size=(n_private, dim))
    private_labels = rng.integers(0, num_classes, n_private)
    candidates = rng.normal(size=(n_candidates, dim)).astype(rng.choice([np.float64, np.float32, np.float16]))
    candidate_labels = rng.integers(0, num_classes, n_candidates)
    return private, private_labels, candidates, candidate_labels, k


def test_per_sample_sensitivity_property():
    """Adding or removing one private sample moves the histogram by L2 norm <= 1 (exactly 1
    when its class has candidates, 0 otherwise)."""
    rng = np.random.default_rng(20240601)
    checked_nonzero = 0
    for _ in range(50):
        private, labels, candidates, candidate_labels, k = random_case(rng)
        full = vote_histogram(private, labels, candidates, candidate_labels, k)
        for j in rng.choice(len(labels), size=min(4, len(labels)), replace=False):
            keep = np.arange(len(labels)) != j
            without = vote_histogram(private[keep], labels[keep], candidates, candidate_labels, k)
            change = float(np.linalg.norm(full - without))
            assert change <= 1.0 + 1e-9
            if np.any(candidate_labels == labels[j]):
                assert change == pytest.approx(1.0, abs=1e-9)
                checked_nonzero += 1
            else:
                assert change == 0.0
        # adding one fresh sample of a random class
        extra = rng.normal(size=(1, private.shape[1]))
        extra_label = rng.integers(0, max(labels.max(), candidate_labels.max()) + 1, 1)
        added = vote_histogram(
            np.concatenate([private, extra]), np.concatenate([labels, extra_label]), candidates, candidate_labels, k
        )
        change = float(np.linalg.norm(added - full))
        assert change <= 1.0 + 1e-9
        if np.any(candidate_labels == extra_label[0]):
            assert change == pytest.approx(1.0, abs=1e-9)
    assert checked_nonzero > 50  # the property was exercised on real votes, not just empty ones


def test_sensitivity_holds_at_exact_ties_between_candidates():
    """A private sample equidistant from two candidates (a server can place candidates
    symmetrically) must cast the same vote whatever the other private samples are: otherwise
    removing one sample also moves another sample's vote and the change exceeds 1.

    Each voter's distances must not depend on which other voters are in the batch (e.g. via
    BLAS blocking of one big matrix product)."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(300):
        dim = int(rng.integers(2, 200))
        n = int(rng.integers(2, 40))
        private = rng.normal(size=(n, dim))
        i = int(rng.integers(n))
        v = rng.normal(size=dim) * 0.5
        far = [rng.normal(size=dim) * 5 + 20 for _ in range(3)]
        candidates = np.stack([private[i] + v, private[i] - v, *far])
        labels = np.zeros(n, dtype=np.int64)
        candidate_labels = np.zeros(len(candidates), dtype=np.int64)
        full = vote_histogram(private, labels, candidates, candidate_labels)
        j = (i + 1) % n
        keep = np.arange(n) != j
        without = vote_histogram(private[keep], labels[keep], candidates, candidate_labels)
        worst = max(worst, float(np.linalg.norm(full - without)))
    assert worst <= 1.0 + 1e-9


def test_votes_go_to_nearest_candidate_of_own_class_only():
    # class 0 candidates at x=0 and x=10, class 1 candidate at x=1 (nearer to every voter)
    candidates = np.array([[0.0], [10.0], [1.0]])
    candidate_labels = np.array([0, 0, 1])
    private = np.array([[0.9], [1.1], [9.0], [1.2]])
    labels = np.array([0, 0, 0, 1])
    votes = vote_histogram(private, labels, candidates, candidate_labels, k=1)
    np.testing.assert_array_equal(votes, [2.0, 1.0, 1.0])


def test_votes_only_reach_candidates_of_the_voters_classes():
    rng = np.random.default_rng(3)
    private = rng.normal(size=(40, 5))
    labels = np.full(40, 2)
    candidates = rng.normal(size=(12, 5))
    candidate_labels = np.repeat([0, 1, 2], 4)
    votes = vote_histogram(private, labels, candidates, candidate_labels, k=2)
    assert np.all(votes[candidate_labels != 2] == 0)
    assert votes[candidate_labels == 2].sum() == pytest.approx(40 * np.sqrt(2))


def test_k_nearest_each_weigh_one_over_sqrt_k():
    candidates = np.array([[0.0], [1.0], [2.0], [50.0]])
    candidate_labels = np.zeros(4, dtype=np.int64)
    votes = vote_histogram(np.array([[0.1]]), np.array([0]), candidates, candidate_labels, k=3)
    np.testing.assert_allclose(votes, [1 / np.sqrt(3)] * 3 + [0.0])
    assert np.linalg.norm(votes) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_total_mass_is_n_sqrt_k_eff(k):
    rng = np.random.default_rng(k)
    # class 0: 5 candidates, class 1: 2 candidates, class 2: none
    candidate_labels = np.array([0, 0, 0, 0, 0, 1, 1])
    candidates = rng.normal(size=(7, 6))
    labels = np.array([0] * 11 + [1] * 4 + [2] * 6)
    private = rng.normal(size=(len(labels), 6))
    votes = vote_histogram(private, labels, candidates, candidate_labels, k=k)
    expected = 11 * np.sqrt(min(k, 5)) + 4 * np.sqrt(min(k, 2))  # class 2 releases nothing
    assert votes.sum() == pytest.approx(expected)
    assert votes.dtype == np.float64
    assert votes.shape == (7,)
    assert votes[candidate_labels == 1].sum() == pytest.approx(4 * np.sqrt(min(k, 2)))


def test_embedding_dimension_mismatch_raises():
    with pytest.raises(ValueError, match=r"embedding dimensions differ: private \(4,\) vs candidates \(5,\)"):
        vote_histogram(np.zeros((3, 4)), np.zeros(3, int), np.zeros((2, 5)), np.zeros(2, int))


def test_k_below_one_raises():
    with pytest.raises(ValueError, match="k must be >= 1"):
        vote_histogram(np.zeros((3, 4)), np.zeros(3, int), np.zeros((2, 4)), np.zeros(2, int), k=0)


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 5.0, 1e6])
def test_normalise_site_vector_norm_at_most_one(scale):
    rng = np.random.default_rng(0)
    votes = rng.random(20)
    votes = votes / np.linalg.norm(votes) * scale
    out = normalise_site_vector(votes)
    assert np.linalg.norm(out) <= 1.0 + 1e-12
    if scale <= 1.0:
        np.testing.assert_array_equal(out, votes)  # short vectors are left alone
        assert out is not votes  # a copy: the caller's array is not aliased
    else:
        assert np.linalg.norm(out) == pytest.approx(1.0)
        np.testing.assert_allclose(out * scale, votes)  # direction kept


def test_pe_rater_scores_like_vote_histogram_and_build_rater():
    rng = np.random.default_rng(5)
    private, labels, candidates, candidate_labels, _ = random_case(rng)
    rater = build_rater("PE", k=2)
    assert isinstance(rater, Rater) and rater.name == "PE"
    assert rater.sensitivity == 1.0
    assert rater.k == 2
    np.testing.assert_array_equal(
        rater.score(private, labels, candidates, candidate_labels),
        vote_histogram(private, labels, candidates, candidate_labels, 2),
    )
    with pytest.raises(ValueError, match="unknown rater 'DPSGD'; choose one of PE"):
        build_rater("DPSGD")


def test_a_site_without_voters_votes_zeros():
    """Every image a site-test image: zero votes, not an error, so whether a site answers does
    not depend on its data (one added voter must not turn an error into a vote reply)."""
    votes = vote_histogram(np.zeros((0, 1)), np.zeros(0, dtype=np.int64), np.ones((4, 196)), np.arange(4) % 2)
    np.testing.assert_array_equal(votes, np.zeros(4))
