"""Distribution evolution: noised votes refit the generator's sampling distribution."""

from __future__ import annotations

import numpy as np
import pytest

from coautogen_fl.config import FeedbackConfig
from coautogen_fl.embedding import PixelEmbedder
from coautogen_fl.evolution import Evolution
from coautogen_fl.generation.distribution import GenotypeDistribution, vote_weights
from coautogen_fl.generation.glyph import GlyphGenerator
from coautogen_fl.generation.schedule import DegreeSchedule

RANGES = {"a": (0.0, 1.0), "r": (5, 28)}


def prior() -> GenotypeDistribution:
    return GenotypeDistribution(RANGES, ["x", "y", "z"], "font", frozenset({"r"}))


def test_vote_weights_centre_each_class_and_keep_the_positive_part():
    votes = np.array([1.0, 3.0, 5.0, 100.0, 100.0, 130.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(vote_weights(votes, labels), [0, 0, 2, 0, 0, 20])


def test_prior_samples_uniformly_within_ranges_and_integers_stay_integers():
    rng = np.random.default_rng(0)
    draws = [prior().sample(rng) for _ in range(4000)]
    a = np.array([d["a"] for d in draws])
    assert 0 <= a.min() and a.max() <= 1 and abs(a.mean() - 0.5) < 0.02 and abs(a.std() - 1 / np.sqrt(12)) < 0.01
    assert all(isinstance(d["r"], int) and 5 <= d["r"] <= 28 for d in draws)
    assert {d["font"] for d in draws} == {"x", "y", "z"}


def test_fit_moves_towards_weighted_genotypes_and_keeps_a_minimum_spread():
    genotypes = [{"a": 0.9, "r": 8, "font": "y"}] * 10 + [{"a": 0.1, "r": 27, "font": "x"}] * 10
    weights = np.array([1.0] * 10 + [0.0] * 10)
    fitted = prior().fitted(genotypes, weights, mix=0.8, min_spread=0.08)
    assert fitted.mean["a"] == pytest.approx(0.8 * 0.9 + 0.2 * 0.5)
    assert fitted.std["a"] == pytest.approx(max(0.2 / np.sqrt(12), 0.08))  # collapsed spread floored
    assert fitted.probabilities[1] > 0.8 and fitted.probabilities.min() >= 0.02 / 1.1
    rng = np.random.default_rng(1)
    sample_a = np.array([fitted.sample(rng)["a"] for _ in range(2000)])
    assert abs(sample_a.mean() - fitted.mean["a"]) < 0.03


def test_zero_weights_leave_the_distribution_unchanged():
    d = prior()
    assert d.fitted([{"a": 0.2, "r": 6, "font": "x"}], np.zeros(1)) is d


def test_noise_averages_out_over_the_pool():
    """Votes favouring large 'a', with noise as large as the whole signal range, still move
    the mean up on every seed (pure noise does not): the weighted moments pool the signal of
    every candidate."""
    labels = np.zeros(500, dtype=int)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        genotypes = [prior().sample(rng) for _ in range(500)]
        a = np.array([g["a"] for g in genotypes])
        with_signal = prior().fitted(genotypes, vote_weights(10.0 * a + rng.normal(0, 10.0, 500), labels), mix=1.0)
        pure_noise = prior().fitted(genotypes, vote_weights(rng.normal(0, 10.0, 500), labels), mix=1.0)
        assert with_signal.mean["a"] > 0.565 > pure_noise.mean["a"]


def make_distribution_evolution(per_label: int = 6) -> Evolution:
    cfg = FeedbackConfig(candidates_per_label=per_label, volume_per_label=2 * per_label, evolve="distribution")
    return Evolution(
        GlyphGenerator(["0", "1"], image_size=12, seed=0), PixelEmbedder(6), 2, cfg, DegreeSchedule(), seed=0
    )


def test_evolution_distribution_mode_refits_the_generator_and_draws_a_fresh_pool():
    evo = make_distribution_evolution()
    pool = evo.start()
    big = [c.genotype["font_size"] for c in pool]
    votes = np.array([100.0 if c.genotype["font_size"] > np.median(big) else 0.0 for c in pool])
    outcome = evo.advance(1, votes, noise_std=1.0, children_per_label=12)
    assert not evo.generator.distribution.is_prior
    # every voted candidate lies above the median, so the refit mean (mix 0.8 with the prior's 0.7) must too
    assert evo.generator.distribution.mean["font_size"] > 0.8 * np.median(big) + 0.2 * 0.7
    assert len(outcome.children) == 24 and all(c.round == 1 and c.parent_id is None for c in outcome.children)
    assert outcome.voted is pool and [c.votes for c in pool] == list(votes)


def test_distribution_mode_refuses_a_generator_without_fit():
    class NoFit:
        def random(self, label, n):
            return []

        def vary(self, candidates, degree):
            return []

    with pytest.raises(ValueError, match="feedback.evolve=candidates"):
        Evolution(NoFit(), PixelEmbedder(6), 2, FeedbackConfig(evolve="distribution"), DegreeSchedule())


@pytest.mark.parametrize("refit", ["per_class", "shared"])
def test_per_class_refit_moves_each_class_toward_its_own_voted_candidates(refit):
    # Votes favour steep rotations for class 0 and the opposite for class 1: a per-class refit
    # moves each class its own way; a shared one can only move both the same way.
    g = GlyphGenerator([str(d) for d in range(2)], 28, seed=0, refit=refit)
    pool = g.random(0, 60) + g.random(1, 60)
    votes = np.array([c.genotype["rotation"] * (1 if c.label == 0 else -1) for c in pool])
    labels = np.array([c.label for c in pool])
    g.fit(pool, vote_weights(votes, labels), mix=1.0, min_spread=0.05)
    mean = {label: np.mean([c.genotype["rotation"] for c in g.random(label, 300)]) for label in (0, 1)}
    if refit == "per_class":
        assert mean[0] > 10.0 and mean[1] < -10.0
    else:
        assert abs(mean[0] - mean[1]) < 5.0 and set(g.class_distributions) == set()


def test_per_class_refit_keeps_a_class_whose_votes_carry_no_signal():
    g = GlyphGenerator(["0", "1"], 28, seed=0)
    pool = g.random(0, 20) + g.random(1, 20)
    votes = np.array([c.genotype["blur"] if c.label == 0 else 1.0 for c in pool])  # class 1: all equal
    g.fit(pool, vote_weights(votes, np.array([c.label for c in pool])), mix=1.0)
    assert set(g.class_distributions) == {0}
    assert g.distribution_of(1) is g.distribution
