"""Tests of domain randomisation as a post-processing stage and of the post-processing wrapper."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coautogen_fl.generation.base import Candidate
from coautogen_fl.generation.domain import BACKGROUND_TOLERANCE
from coautogen_fl.generation.glyph import GlyphGenerator
from coautogen_fl.generation.imageops import LUMA
from coautogen_fl.generation.postprocess import DomainRandomizer, PostProcessedGenerator

DIGITS = [str(d) for d in range(10)]
SIZE = 32
#: Where FakeColour draws its square: rows/columns [8, 24); the rest is the uniform backdrop.
SQUARE = slice(8, 24)


class FakeColour:
    """A colour generator without fit: a coloured square on a uniform grey backdrop; records the
    genotypes ``vary`` receives."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.counter = 0
        self.varied_genotypes: list[dict] = []
        self.vary_calls = 0

    def regenerate(self, genotype: dict) -> np.ndarray:
        image = np.full((SIZE, SIZE, 3), genotype["backdrop"], dtype=np.float32)
        image[SQUARE, SQUARE] = np.asarray(genotype["colour"], dtype=np.float32)
        return image

    def _make(self, label: int, genotype: dict, parent: Candidate | None) -> Candidate:
        self.counter += 1
        return Candidate(
            f"fake-{self.counter:04d}",
            label,
            self.regenerate(genotype),
            genotype,
            None if parent is None else parent.candidate_id,
            0 if parent is None else parent.round + 1,
        )

    def random(self, label: int, n: int) -> list[Candidate]:
        return [
            self._make(label, {"colour": [float(v) for v in 0.6 + 0.4 * self.rng.random(3)], "backdrop": 0.1}, None)
            for _ in range(n)
        ]

    def vary(self, candidates: list[Candidate], degree: float) -> list[Candidate]:
        self.vary_calls += 1
        children = []
        for parent in candidates:
            self.varied_genotypes.append(parent.genotype)
            colour = np.clip(np.asarray(parent.genotype["colour"]) + degree * 0.1 * self.rng.normal(size=3), 0.5, 1.0)
            children.append(self._make(parent.label, {"colour": [float(v) for v in colour], "backdrop": 0.1}, parent))
        return children


class AlternatingFilter:
    """Keeps every second candidate it ever sees; scores = mean brightness."""

    name = "alternate"

    def __init__(self) -> None:
        self.seen = 0
        self.kept_ids: set[str] = set()
        self.scored_ids: set[str] = set()

    def keep(self, candidates: list[Candidate]) -> np.ndarray:
        keep = (np.arange(self.seen, self.seen + len(candidates)) % 2) == 0
        self.seen += len(candidates)
        self.kept_ids.update(c.candidate_id for c, k in zip(candidates, keep) if k)
        return keep

    def scores(self, candidates: list[Candidate]) -> np.ndarray:
        self.scored_ids.update(c.candidate_id for c in candidates)
        return np.array([float(np.mean(c.image)) for c in candidates])


class RejectAll(AlternatingFilter):
    name = "reject-all"

    def keep(self, candidates: list[Candidate]) -> np.ndarray:
        return np.zeros(len(candidates), dtype=bool)


@pytest.fixture(scope="module")
def glyphs() -> list[Candidate]:
    return GlyphGenerator(DIGITS, seed=1).random(3, 4)


@pytest.fixture(scope="module")
def colours() -> list[Candidate]:
    return FakeColour(seed=1).random(0, 4)


@pytest.fixture(scope="module")
def background_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two uniformly coloured PNGs (one in a sub-folder) and a file that is no image."""
    root = tmp_path_factory.mktemp("backgrounds")
    (root / "nested").mkdir()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(root / "blue.png")
    Image.new("RGB", (50, 50), (0, 255, 0)).save(root / "nested" / "green.png")
    (root / "README.txt").write_text("not an image")
    return root


BACKGROUND_COLOURS = {"blue.png": (0.0, 0.0, 1.0), "nested/green.png": (0.0, 1.0, 0.0)}


def randomizer(background_dir: Path | None = None, **strengths: float) -> DomainRandomizer:
    """A randomiser with every effect off unless given in ``strengths``."""
    settings = {"lighting": 0.0, "texture": 0.0, "camera": 0.0, "background_probability": 0.0, **strengths}
    return DomainRandomizer(backgrounds=str(background_dir or ""), seed=3, **settings)


# --- DomainRandomizer -----------------------------------------------------------------------


@pytest.mark.parametrize("effect", ["lighting", "texture", "camera", "background_probability"])
@pytest.mark.parametrize("images", ["glyphs", "colours"])
def test_each_effect_changes_the_image_only_when_its_strength_is_positive(
    effect: str, images: str, background_dir: Path, request: pytest.FixtureRequest
) -> None:
    candidates = request.getfixturevalue(images)
    off = randomizer(background_dir, **{effect: 0.0}).apply(candidates)
    on = randomizer(background_dir, **{effect: 1.0}).apply(candidates)
    for before, a, b in zip(candidates, off, on):
        np.testing.assert_array_equal(a.image, before.image)
        assert b.image.shape == before.image.shape and b.image.dtype == np.float32
        assert 0.0 <= b.image.min() and b.image.max() <= 1.0
    assert all(not np.array_equal(b.image, before.image) for before, b in zip(candidates, on))


def test_all_strengths_zero_leave_images_identical_but_record_params(
    glyphs: list[Candidate], colours: list[Candidate]
) -> None:
    stage = DomainRandomizer(lighting=0, texture=0, camera=0, background_probability=0)
    for before, after in zip(glyphs + colours, stage.apply(glyphs + colours)):
        np.testing.assert_array_equal(after.image, before.image)
        assert after.genotype == {**before.genotype, "domain": after.genotype["domain"]}
        assert after.candidate_id == before.candidate_id and after.label == before.label


def test_apply_returns_new_candidates_and_keeps_the_inputs(colours: list[Candidate]) -> None:
    snapshot = [(c.image.copy(), dict(c.genotype)) for c in colours]
    out = DomainRandomizer(lighting=1, texture=1, camera=1).apply(colours)
    assert all(a is not b for a, b in zip(out, colours))
    for c, (image, genotype) in zip(colours, snapshot):
        np.testing.assert_array_equal(c.image, image)
        assert c.genotype == genotype and "domain" not in c.genotype


def test_tint_acts_through_luminance_on_grayscale(glyphs: list[Candidate]) -> None:
    stage = randomizer()
    params = stage.sample_params(np.random.default_rng(0), glyphs[0].image.shape)
    params["lighting"].update(gain=0.9, tint=[1.2, 1.0, 0.8], light_amplitude=0.0)
    expected = np.clip(
        glyphs[0].image * np.float32(0.9) * np.float32(LUMA @ np.array([1.2, 1.0, 0.8], np.float32)), 0, 1
    )
    np.testing.assert_allclose(stage.apply_params(glyphs[0].image, params), expected, atol=1e-6)
    # On colour images the same tint changes the channels unequally.
    rgb = np.full((SIZE, SIZE, 3), 0.5, dtype=np.float32)
    out = stage.apply_params(rgb, params)
    np.testing.assert_allclose(out[0, 0], 0.5 * 0.9 * np.array([1.2, 1.0, 0.8]), atol=1e-6)


def test_directional_light_is_a_ramp_across_the_image() -> None:
    stage = randomizer()
    params = stage.sample_params(np.random.default_rng(0), (SIZE, SIZE))
    params["lighting"].update(gain=1.0, tint=[1.0, 1.0, 1.0], light_angle=0.0, light_amplitude=0.4)
    out = stage.apply_params(np.full((SIZE, SIZE), 0.5, np.float32), params)
    # Angle 0 lights the right side: columns brighten left to right, rows are constant.
    assert np.all(np.diff(out[0]) > 0) and np.allclose(out, out[0:1])
    np.testing.assert_allclose([out[0, 0], out[0, -1]], [0.5 * 0.6, 0.5 * 1.4], atol=1e-6)


def test_same_seed_same_params_and_pixels_different_seed_differs(
    colours: list[Candidate], background_dir: Path
) -> None:
    def run(seed: int) -> list[Candidate]:
        return DomainRandomizer(1, 1, 1, str(background_dir), 1.0, seed=seed).apply(colours)

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):
        assert x.genotype["domain"] == y.genotype["domain"]
        np.testing.assert_array_equal(x.image, y.image)
    assert [x.genotype["domain"] for x in a] != [z.genotype["domain"] for z in c]


@pytest.mark.parametrize("images", ["glyphs", "colours"])
def test_reapply_reproduces_apply_exactly_also_after_json(
    images: str, background_dir: Path, request: pytest.FixtureRequest
) -> None:
    candidates = request.getfixturevalue(images)
    stage = DomainRandomizer(0.8, 0.8, 0.8, str(background_dir), 0.5, seed=2)
    out = stage.apply(candidates * 3)
    assert {o.genotype["domain"]["background"]["file"] is None for o in out} == {True, False}
    for before, after in zip(candidates * 3, out):
        np.testing.assert_array_equal(stage.reapply(before.image, after.genotype), after.image)
        restored = json.loads(json.dumps(after.genotype))
        # A fresh randomiser over the same folder re-creates it from the JSON alone.
        fresh = DomainRandomizer(0.8, 0.8, 0.8, str(background_dir), 0.5, seed=99)
        np.testing.assert_array_equal(fresh.reapply(before.image, restored), after.image)
    with pytest.raises(ValueError, match="lacks 'domain'"):
        stage.reapply(candidates[0].image, candidates[0].genotype)


def test_backgrounds_fill_background_pixels_only(colours: list[Candidate], background_dir: Path) -> None:
    stage = randomizer(background_dir, background_probability=1.0)
    out = stage.apply(colours * 3)
    files = set()
    for before, after in zip(colours * 3, out):
        background = after.genotype["domain"]["background"]
        files.add(background["file"])
        colour = np.array(BACKGROUND_COLOURS[background["file"]], dtype=np.float32)
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[SQUARE, SQUARE] = True
        np.testing.assert_array_equal(after.image[mask], before.image[mask])  # the square is untouched
        np.testing.assert_allclose(after.image[~mask], np.broadcast_to(colour, after.image[~mask].shape), atol=1e-5)
        assert len(background["crop"]) == 4 and all(0.0 <= v <= 1.0 for v in background["crop"])
    assert files == set(BACKGROUND_COLOURS)  # both files (one in a sub-folder), not the .txt


def test_background_rule_blends_between_one_and_two_tolerances(background_dir: Path) -> None:
    stage = randomizer(background_dir, background_probability=1.0)
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    image[10, 10] = BACKGROUND_TOLERANCE  # at the tolerance: still background
    image[12, 12] = 1.5 * BACKGROUND_TOLERANCE  # halfway: half blended
    image[14, 14] = 2.0 * BACKGROUND_TOLERANCE  # from twice on: foreground
    params = stage.sample_params(np.random.default_rng(0), image.shape)
    scene = float(LUMA @ np.array(BACKGROUND_COLOURS[params["background"]["file"]], np.float32))
    out = stage.apply_params(image, params)
    np.testing.assert_allclose(
        [out[0, 0], out[10, 10], out[14, 14]], [scene, scene, 2 * BACKGROUND_TOLERANCE], atol=1e-5
    )
    np.testing.assert_allclose(out[12, 12], 0.5 * scene + 0.5 * 1.5 * BACKGROUND_TOLERANCE, atol=1e-5)


def test_errors_name_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"postprocess\.backgrounds: folder not found"):
        DomainRandomizer(backgrounds=str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"postprocess\.backgrounds: no readable image"):
        DomainRandomizer(backgrounds=str(tmp_path))
    for key in ("lighting", "texture", "camera", "background_probability"):
        for bad in (-0.1, 1.5, True, "0.3"):
            with pytest.raises(ValueError, match=rf"postprocess\.{key} must be a number in \[0, 1\]"):
                DomainRandomizer(**{key: bad})
    with pytest.raises(ValueError, match="image must have shape"):
        randomizer().apply_params(np.zeros((4, 4, 2)), randomizer().sample_params(np.random.default_rng(0), (4, 4)))


# --- PostProcessedGenerator ---------------------------------------------------------------------


def test_random_returns_exactly_n_that_passed_the_filter() -> None:
    filt = AlternatingFilter()
    gen = PostProcessedGenerator(FakeColour(), [DomainRandomizer(seed=1)], [filt], max_draws=10)
    out = gen.random(2, 10)
    assert len(out) == 10 and {c.label for c in out} == {2}
    assert all(c.candidate_id in filt.kept_ids and "domain" in c.genotype for c in out)
    assert len({c.candidate_id for c in out}) == 10
    assert len(filt.scored_ids) == 9 and not filt.scored_ids & filt.kept_ids  # only rejected ones are scored
    # Draws: 10 (5 kept), 5 (3), 2 (1), 1 (0), 1 (1).
    assert gen.filter_stats["calls"] == [{"call": "random(label=2)", "drawn": 19, "kept": 10, "filled": 0}]
    assert gen.random(2, 0) == []
    assert gen.filter_stats["total"] == {"drawn": 19, "kept": 10, "filled": 0}


def test_fill_with_best_scores_and_warn_when_everything_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Candidate] = []

    class Recording(RejectAll):
        def scores(self, candidates: list[Candidate]) -> np.ndarray:
            seen.extend(candidates)
            return super().scores(candidates)

    gen = PostProcessedGenerator(FakeColour(), [DomainRandomizer(seed=1)], [Recording()], max_draws=3)
    with caplog.at_level(logging.WARNING, logger="coautogen_fl"):
        out = gen.random(0, 4)
    assert len(seen) == 12 and len(out) == 4
    best = sorted(seen, key=lambda c: float(np.mean(c.image)), reverse=True)[:4]
    assert [c.candidate_id for c in out] == [c.candidate_id for c in best]
    assert gen.filter_stats["total"] == {"drawn": 12, "kept": 0, "filled": 4}
    assert any("kept 0 of 12" in r.getMessage() and "filled 4" in r.getMessage() for r in caplog.records)


def test_vary_passes_stripped_genotypes_and_revaries_rejected_children() -> None:
    inner = FakeColour()
    filt = AlternatingFilter()
    gen = PostProcessedGenerator(inner, [DomainRandomizer(seed=1)], [filt], max_draws=2)
    parents = PostProcessedGenerator(FakeColour(seed=7), [DomainRandomizer(seed=2)]).random(1, 4)
    children = gen.vary(parents, 0.5)
    assert inner.varied_genotypes and all("domain" not in g for g in inner.varied_genotypes)
    assert inner.varied_genotypes[:4] == [{k: v for k, v in p.genotype.items() if k != "domain"} for p in parents]
    # Attempt 1 keeps children 0 and 2; attempt 2 re-varies parents 1 and 3 and keeps parent 1's;
    # parent 3's best rejected child fills in.
    assert inner.vary_calls == 2 and len(inner.varied_genotypes) == 4 + 2
    assert inner.varied_genotypes[4:] == [inner.varied_genotypes[1], inner.varied_genotypes[3]]
    assert [c.parent_id for c in children] == [p.candidate_id for p in parents]
    assert all("domain" in c.genotype and c.round == 1 for c in children)
    assert gen.filter_stats["calls"] == [{"call": "vary", "drawn": 6, "kept": 3, "filled": 1}]
    assert all("domain" in p.genotype for p in parents)  # the caller's parents are untouched


def test_fit_is_forwarded_only_when_the_inner_generator_has_it() -> None:
    glyph = GlyphGenerator(DIGITS, seed=0)
    wrapped = PostProcessedGenerator(glyph, [DomainRandomizer(seed=0)])
    assert callable(getattr(wrapped, "fit", None)) and not hasattr(wrapped, "observe_votes")
    assert wrapped.class_names == glyph.class_names and wrapped.image_size == 28
    pool = wrapped.random(0, 6)
    wrapped.fit(pool, np.array([1.0, 0, 0, 0, 0, 0]), mix=1.0, min_spread=0.01)
    assert glyph.distribution.mean is not None
    assert glyph.distribution.mean["rotation"] == pytest.approx(pool[0].genotype["rotation"])
    assert getattr(PostProcessedGenerator(FakeColour()), "fit", None) is None
    with pytest.raises(TypeError, match="GlyphGenerator has no regenerate"):
        wrapped.regenerate(pool[0].genotype)


def test_regenerate_round_trips_through_stages(background_dir: Path) -> None:
    stages = [DomainRandomizer(0.7, 0.7, 0.7, str(background_dir), 0.5, seed=4)]
    gen = PostProcessedGenerator(FakeColour(), stages, [AlternatingFilter()], max_draws=5)
    pool = gen.random(0, 6)
    pool += gen.vary(pool, 0.4)
    for c in pool:
        genotype = json.loads(json.dumps(c.genotype))
        np.testing.assert_array_equal(gen.regenerate(genotype), c.image)
        assert not np.array_equal(gen.generator.regenerate(gen.strip(genotype)), c.image)


def test_wrapper_rejects_malformed_stages_filters_and_arguments() -> None:
    with pytest.raises(ValueError, match="max_draws must be an int >= 1"):
        PostProcessedGenerator(FakeColour(), max_draws=0)
    with pytest.raises(ValueError, match="stage names must be unique"):
        PostProcessedGenerator(FakeColour(), [DomainRandomizer(), DomainRandomizer()])
    with pytest.raises(ValueError, match="needs name, keep"):
        PostProcessedGenerator(FakeColour(), filters=[object()])
    gen = PostProcessedGenerator(FakeColour())
    with pytest.raises(ValueError, match="degree"):
        gen.vary(gen.random(0, 1), 1.5)
