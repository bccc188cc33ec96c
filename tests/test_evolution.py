"""Tests of the server's Feedback loop without Flower (Evolution), with the real glyph
generator and pixel embedder at small sizes."""

from __future__ import annotations

import numpy as np
import pytest

from coautogen_fl.config import FeedbackConfig
from coautogen_fl.embedding import PixelEmbedder
from coautogen_fl.evolution import Evolution, RoundOutcome
from coautogen_fl.generation.base import stack_images
from coautogen_fl.generation.glyph import GlyphGenerator
from coautogen_fl.generation.schedule import DegreeSchedule

CLASSES = ["0", "1", "2"]
IMAGE_SIZE = 12
PIXELS = 6
PER_LABEL = 4


def make_evolution(selection: str = "rank", per_label: int = PER_LABEL, seed: int = 0) -> Evolution:
    cfg = FeedbackConfig(
        candidates_per_label=per_label,
        volume_per_label=2 * per_label,
        selection=selection,
        threshold=1.0,
        evolve="candidates",
    )
    return Evolution(
        GlyphGenerator(CLASSES, image_size=IMAGE_SIZE, seed=seed),
        PixelEmbedder(PIXELS),
        num_classes=len(CLASSES),
        cfg=cfg,
        schedule=DegreeSchedule(start=0.8, end=0.2, step=0.1),
        seed=seed,
    )


def concentrated_votes(evo: Evolution, favourite: int = 1, amount: float = 50.0) -> np.ndarray:
    """All votes of each class on its ``favourite``-th candidate, plus sub-threshold noise."""
    rng = np.random.default_rng(0)
    votes = rng.uniform(-0.9, 0.9, len(evo.pool))  # below 1.0 * noise_std = 1.0: dropped
    labels = np.array([c.label for c in evo.pool])
    chosen = [int(np.flatnonzero(labels == label)[favourite]) for label in range(len(CLASSES))]
    votes[chosen] = amount
    return votes, chosen


def test_start_draws_candidates_per_label_of_every_class():
    evo = make_evolution()
    pool = evo.start()
    assert pool is evo.pool
    assert len(pool) == PER_LABEL * len(CLASSES)
    np.testing.assert_array_equal(np.bincount([c.label for c in pool]), [PER_LABEL] * len(CLASSES))
    assert all(c.round == 0 and c.parent_id is None for c in pool)
    assert len({c.candidate_id for c in pool}) == len(pool)
    assert pool[0].image.shape == (IMAGE_SIZE, IMAGE_SIZE)


def test_payload_is_float16_of_the_right_shape_and_cached_within_a_round():
    evo = make_evolution()
    evo.start()
    embeddings, labels = evo.payload()
    assert embeddings.dtype == np.float16
    assert embeddings.shape == (PER_LABEL * len(CLASSES), PIXELS * PIXELS)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [c.label for c in evo.pool])
    expected = PixelEmbedder(PIXELS).embed(stack_images(evo.pool)).astype(np.float16)
    np.testing.assert_array_equal(embeddings, expected)
    again = evo.payload()
    assert again[0] is embeddings and again[1] is labels  # embedded once per round


def test_payload_is_recomputed_after_advance():
    evo = make_evolution()
    evo.start()
    first, _ = evo.payload()
    votes, _ = concentrated_votes(evo)
    evo.advance(1, votes, noise_std=1.0, children_per_label=5)
    second, labels = evo.payload()
    assert second is not first
    assert second.shape == (5 * len(CLASSES), PIXELS * PIXELS)
    np.testing.assert_array_equal(np.bincount(labels), [5, 5, 5])
    np.testing.assert_array_equal(second, PixelEmbedder(PIXELS).embed(stack_images(evo.pool)).astype(np.float16))


def test_advance_rank_mode_breeds_every_child_from_the_voted_candidate():
    evo = make_evolution("rank")
    evo.start()
    votes, chosen = concentrated_votes(evo, favourite=2)
    voted_pool = list(evo.pool)
    chosen_ids = {evo.pool[i].label: evo.pool[i].candidate_id for i in chosen}
    outcome = evo.advance(3, votes, noise_std=1.0, children_per_label=7)
    assert isinstance(outcome, RoundOutcome)
    assert outcome.voted == voted_pool
    assert outcome.kept == len(CLASSES)
    assert outcome.fallback_labels == []
    assert outcome.degree == pytest.approx(0.6)  # schedule.degree(3 - 1) = 0.8 - 2 * 0.1
    assert outcome.children is evo.pool
    assert len(evo.pool) == 7 * len(CLASSES)
    np.testing.assert_array_equal(np.bincount([c.label for c in evo.pool]), [7] * len(CLASSES))
    for child in evo.pool:
        assert child.parent_id == chosen_ids[child.label]
        assert child.round == 3
        assert child.votes is None
    # the voted pool carries its votes
    for candidate, value in zip(voted_pool, votes):
        assert candidate.votes == pytest.approx(float(value))


def test_advance_sample_mode_with_concentrated_votes_also_descends_from_the_winner():
    evo = make_evolution("sample")
    evo.start()
    votes, chosen = concentrated_votes(evo, favourite=0)
    winners = {evo.pool[i].candidate_id for i in chosen}
    outcome = evo.advance(1, votes, noise_std=1.0, children_per_label=3)
    assert {c.parent_id for c in outcome.children} == winners
    assert outcome.degree == pytest.approx(0.8)


def test_children_are_variations_of_their_parents():
    evo = make_evolution("rank")
    evo.start()
    votes, chosen = concentrated_votes(evo, favourite=1)
    parents = {evo.pool[i].candidate_id: evo.pool[i] for i in chosen}
    outcome = evo.advance(1, votes, noise_std=1.0, children_per_label=2)
    for child in outcome.children:
        parent = parents[child.parent_id]
        assert child.label == parent.label
        assert child.genotype != parent.genotype  # varied, not copied
        assert child.genotype["noise_seed"] != parent.genotype["noise_seed"]


def test_class_without_signal_falls_back_and_is_reported():
    evo = make_evolution("rank")
    evo.start()
    votes, chosen = concentrated_votes(evo, favourite=1)
    labels = np.array([c.label for c in evo.pool])
    votes[labels == 2] = 0.5  # all below the threshold
    outcome = evo.advance(2, votes, noise_std=1.0, children_per_label=PER_LABEL)
    assert outcome.fallback_labels == [2]
    assert outcome.kept == 2
    parents_of_2 = {c.parent_id for c in outcome.children if c.label == 2}
    assert parents_of_2 == {c.candidate_id for c in outcome.voted if c.label == 2}  # uniform: one each


def test_threshold_scales_with_noise_std():
    evo = make_evolution("rank")
    evo.start()
    votes, _ = concentrated_votes(evo, amount=50.0)
    outcome = evo.advance(1, votes, noise_std=100.0, children_per_label=PER_LABEL)
    assert outcome.kept == 0
    assert outcome.fallback_labels == [0, 1, 2]


def test_several_rounds_chain_parents_across_rounds():
    evo = make_evolution("rank")
    evo.start()
    first_ids = {c.candidate_id for c in evo.pool}
    votes, _ = concentrated_votes(evo)
    round1 = evo.advance(1, votes, 1.0, PER_LABEL).children
    votes, _ = concentrated_votes(evo)
    round2 = evo.advance(2, votes, 1.0, 2 * PER_LABEL).children
    assert {c.parent_id for c in round1} <= first_ids
    assert {c.parent_id for c in round2} <= {c.candidate_id for c in round1}
    assert all(c.round == 2 for c in round2)
    assert len(round2) == 2 * PER_LABEL * len(CLASSES)


@pytest.mark.parametrize(
    "shape", [(PER_LABEL * len(CLASSES) - 1,), (PER_LABEL * len(CLASSES), 1), (1, PER_LABEL * len(CLASSES))]
)
def test_wrong_votes_shape_raises(shape):
    evo = make_evolution()
    evo.start()
    before = list(evo.pool)
    with pytest.raises(ValueError, match=f"the pool has {PER_LABEL * len(CLASSES)} candidates"):
        evo.advance(1, np.ones(shape), noise_std=1.0, children_per_label=PER_LABEL)
    assert evo.pool == before  # refused votes change nothing
    assert all(c.votes is None for c in evo.pool)
