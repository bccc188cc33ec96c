"""Tests of the procedural glyph generator, its fonts and the degree schedule."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from coautogen_fl.generation import pen
from coautogen_fl.generation.base import Candidate, Generator
from coautogen_fl.generation.fonts import NoUsableFontError, bundled_fonts, font_dir
from coautogen_fl.generation.glyph import (
    GENOTYPE_KEYS,
    PARAMETER_RANGES,
    GlyphGenerator,
    render_glyph,
)
from coautogen_fl.generation.schedule import DegreeSchedule

DIGITS = [str(d) for d in range(10)]
CONTINUOUS = [k for k in PARAMETER_RANGES if k not in ("resolution", "levels")]


@pytest.fixture(scope="module")
def gen() -> GlyphGenerator:
    return GlyphGenerator(DIGITS, seed=0)


def clean_genotype(**overrides: object) -> dict:
    """An undistorted, noise-free genotype (so pixel comparisons are about the glyph)."""
    genotype = {
        "font": "DejaVuSans",
        "font_size": 0.8,
        "stroke_width": 0.0,
        "rotation": 0.0,
        "translate_x": 0.0,
        "translate_y": 0.0,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "shear": 0.0,
        "blur": 0.0,
        "resolution": 28,
        "contrast": 1.0,
        "background_noise": 0.0,
        "noise_seed": 0,
        "elastic_alpha": 0.0,
        "elastic_scale": 0.1,
        "stroke_weight": 0.0,
        "levels": 256,
        "bow_x": 0.0,
        "bow_y": 0.0,
        "taper": 0.0,
        "waist": 0.0,
    }
    genotype.update(overrides)
    return genotype


# --- fonts -----------------------------------------------------------------------------------


def test_bundled_fonts_keep_text_fonts_and_drop_symbol_fonts() -> None:
    fonts = bundled_fonts()
    assert "DejaVuSans" in fonts and "DejaVuSerif" in fonts and "cmr10" in fonts
    assert all(path.is_file() and path.parent == font_dir() for path in fonts.values())
    # These files exist in matplotlib's bundle, so their absence below is the filter's doing:
    # cmex10/cmsy10 map "0".."9" to parentheses/arrows (distinct, non-empty: only the glyph
    # names reveal them), STIXSizOneSymReg has no digits, DejaVuSansDisplay draws nothing and
    # LastResort draws the same box for every digit.
    rejected = ["cmex10", "cmsy10", "STIXSizOneSymReg", "DejaVuSansDisplay", "LastResortHE-Regular"]
    for name in rejected:
        assert (font_dir() / f"{name}.ttf").is_file()
        assert name not in fonts, name


def test_bundled_fonts_returns_a_fresh_dict_from_the_cache() -> None:
    first = bundled_fonts()
    first.pop("DejaVuSans")
    assert "DejaVuSans" in bundled_fonts()


def test_bundled_fonts_error_names_the_folder_when_nothing_renders() -> None:
    with pytest.raises(NoUsableFontError) as info:
        bundled_fonts(("\U0010fffd",))
    assert str(font_dir()) in str(info.value) and "matplotlib" in str(info.value)


# --- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 16])
def test_images_are_float32_in_unit_range_with_ink(size: int) -> None:
    # TrueType fonts: their strokes cannot thin away (pen forms: tests/test_pen_forms.py)
    candidates = GlyphGenerator(DIGITS, image_size=size, seed=1, style="fonts").random(label=3, n=20)
    assert len(candidates) == 20
    for c in candidates:
        assert c.image.shape == (size, size) and c.image.dtype == np.float32
        assert c.image.min() >= 0.0 and c.image.max() <= 1.0
        assert c.image.max() > 0.2  # the glyph is visible (dimmest ink 0.3, less after blur and grey levels)
        assert set(c.genotype) == set(GENOTYPE_KEYS)
        json.dumps(c.genotype)  # JSON-serialisable
        assert c.label == 3 and c.parent_id is None


def test_scan_resolution_range_follows_image_size() -> None:
    g = GlyphGenerator(DIGITS, image_size=16, seed=0)
    assert g.parameter_ranges["resolution"] == (PARAMETER_RANGES["resolution"][0], 16)
    resolutions = [c.genotype["resolution"] for c in g.random(0, 40) + g.vary(g.random(1, 20), 1)]
    assert max(resolutions) <= 16 and min(resolutions) >= PARAMETER_RANGES["resolution"][0]


def test_generator_satisfies_protocol(gen: GlyphGenerator) -> None:
    assert isinstance(gen, Generator)
    assert gen.random(0, 0) == []


def test_random_samples_within_ranges(gen: GlyphGenerator) -> None:
    for c in gen.random(5, 40):
        assert c.genotype["font"] in gen.fonts
        for name, (low, high) in PARAMETER_RANGES.items():
            assert low <= c.genotype[name] <= high, name
        assert isinstance(c.genotype["resolution"], int)


def test_genotype_round_trip_renders_identical_pixels(gen: GlyphGenerator) -> None:
    for c in gen.random(7, 10) + gen.vary(gen.random(2, 5), 0.5):
        genotype = json.loads(json.dumps(c.genotype))
        assert np.array_equal(gen.render(genotype, DIGITS[c.label]), c.image)
        assert np.array_equal(render_glyph(genotype, DIGITS[c.label], 28), c.image)


def test_glyph_stays_inside_frame_at_extreme_parameters() -> None:
    extreme = clean_genotype(
        font="DejaVuSans-Bold",
        font_size=1.0,
        stroke_width=0.06,
        rotation=15.0,
        translate_x=0.1,
        translate_y=-0.1,
        scale_x=1.25,
        scale_y=1.2,
        shear=0.3,
    )
    for text in DIGITS:
        image = render_glyph(extreme, text)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert border.max() < 0.05, text
        assert image.max() > 0.9


def test_one_has_less_ink_than_eight(gen: GlyphGenerator) -> None:
    genotype = clean_genotype()
    assert render_glyph(genotype, "8").sum() > 1.2 * render_glyph(genotype, "1").sum()
    ones = np.mean([c.image.sum() for c in gen.random(1, 30)])
    eights = np.mean([c.image.sum() for c in gen.random(8, 30)])
    assert eights > ones


def test_low_resolution_blurs_the_glyph() -> None:
    sharp = render_glyph(clean_genotype(resolution=28), "4")
    scanned = render_glyph(clean_genotype(resolution=8), "4")
    assert not np.array_equal(sharp, scanned)
    # Down- and up-sampling removes high frequencies: neighbouring pixels differ less.
    assert np.abs(np.diff(scanned, axis=1)).mean() < np.abs(np.diff(sharp, axis=1)).mean()


# --- reproducibility -------------------------------------------------------------------------


def _run(seed: int) -> list[Candidate]:
    g = GlyphGenerator(DIGITS, seed=seed)
    parents = g.random(4, 6) + g.random(9, 6)
    return parents + g.vary(parents, 0.6)


def test_same_seed_gives_identical_candidates() -> None:
    a, b = _run(11), _run(11)
    assert [c.candidate_id for c in a] == [c.candidate_id for c in b]
    assert [c.genotype for c in a] == [c.genotype for c in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))


def test_different_seed_gives_different_candidates() -> None:
    a, b = _run(11), _run(12)
    assert [c.genotype for c in a] != [c.genotype for c in b]
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, b)) == 0


def test_ids_are_unique_and_counter_formatted(gen: GlyphGenerator) -> None:
    ids = [c.candidate_id for c in gen.random(0, 5) + gen.random(1, 5)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"glyph-\d{7}", i) for i in ids)


# --- vary ------------------------------------------------------------------------------------


def test_vary_propagates_parent_id_label_and_round(gen: GlyphGenerator) -> None:
    parents = gen.random(6, 4) + gen.random(0, 3)
    children = gen.vary(parents, 0.3)
    assert len(children) == len(parents)
    for parent, child in zip(parents, children):
        assert child.parent_id == parent.candidate_id and child.label == parent.label
        assert child.candidate_id != parent.candidate_id
        assert child.round == parent.round + 1
    assert gen.vary([], 0.5) == []


def test_small_degree_stays_nearer_parent_than_fresh_sample() -> None:
    g = GlyphGenerator(DIGITS, seed=5)
    parents = [c for label in range(10) for c in g.random(label, 5)]  # 50 parents
    children = g.vary(parents, 0.1)
    fresh = [g.random(p.label, 1)[0] for p in parents]

    def mean_l2(others: list[Candidate]) -> float:
        return float(np.mean([np.linalg.norm(p.image - o.image) for p, o in zip(parents, others)]))

    assert mean_l2(children) < 0.6 * mean_l2(fresh)


def test_degree_zero_keeps_every_parameter_but_the_noise_seed(gen: GlyphGenerator) -> None:
    parents = gen.random(2, 20)
    children = gen.vary(parents, 0.0)
    for parent, child in zip(parents, children):
        kept = {k: v for k, v in child.genotype.items() if k != "noise_seed"}
        assert kept == {k: v for k, v in parent.genotype.items() if k != "noise_seed"}
        reseeded = dict(child.genotype, noise_seed=parent.genotype["noise_seed"])
        assert np.array_equal(gen.render(reseeded, "2"), parent.image)
    assert any(c.genotype["noise_seed"] != p.genotype["noise_seed"] for p, c in zip(parents, children))


def test_degree_one_moves_parameters_and_switches_fonts_within_ranges() -> None:
    g = GlyphGenerator(DIGITS, seed=2)
    parents = g.random(8, 60)
    children = g.vary(parents, 1.0)
    switched = sum(c.genotype["font"] != p.genotype["font"] for p, c in zip(parents, children))
    assert 15 <= switched <= 45  # probability 0.5 per child
    for p, c in zip(parents, children):
        assert all(c.genotype[k] != p.genotype[k] for k in CONTINUOUS)
        for name, (low, high) in PARAMETER_RANGES.items():
            assert low <= c.genotype[name] <= high, name


# --- input errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda g: g.random(-1, 1), "label must"),
        (lambda g: g.random(10, 1), "label must"),
        (lambda g: g.random(0, -1), "n must"),
        (lambda g: g.vary(g.random(0, 1), 1.5), r"degree .*1\.5"),
        (lambda g: g.vary(g.random(0, 1), -0.1), r"degree .*-0\.1"),
        (lambda g: g.vary([Candidate("x", 0, np.zeros((28, 28)))], 0.5), "genotype"),
        (lambda g: GlyphGenerator([]), "class_names"),
        (lambda g: GlyphGenerator(["1", "1"]), "class_names"),
        (lambda g: GlyphGenerator(DIGITS, image_size=7), "image_size"),
        (lambda g: GlyphGenerator(DIGITS, fonts=["cmex10"]), "fonts"),
        (lambda g: render_glyph({"font": "DejaVuSans"}, "1"), "genotype"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_argument(call, needle, gen) -> None:
    with pytest.raises(ValueError, match=needle):
        call(gen)


def test_degree_error_names_degree(gen: GlyphGenerator) -> None:
    with pytest.raises(ValueError, match="degree"):
        gen.vary(gen.random(0, 1), float("nan"))


def test_explicit_font_subset_is_used() -> None:
    g = GlyphGenerator(DIGITS, seed=0, fonts=["cmtt10"])
    assert g.fonts == ("cmtt10",)
    candidates = g.random(3, 5)
    assert {c.genotype["font"] for c in g.vary(candidates, 1.0) + candidates} == {"cmtt10"}


# --- schedule --------------------------------------------------------------------------------


def test_schedule_anneals_then_clamps() -> None:
    schedule = DegreeSchedule()
    degrees = [schedule.degree(r) for r in range(15)]
    assert degrees[0] == pytest.approx(0.8) and degrees[1] == pytest.approx(0.74)
    assert all(a >= b for a, b in zip(degrees, degrees[1:]))
    assert degrees[-1] == 0.2 and min(degrees) == 0.2
    assert DegreeSchedule(0.8, 0.6, 0.02).degree(5) == pytest.approx(0.7)
    assert DegreeSchedule(0.5, 0.0, 0.0).degree(100) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"start": 1.2}, "start"),
        ({"end": 0.9}, "end"),
        ({"end": -0.1}, "end"),
        ({"step": -0.01}, "step"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        DegreeSchedule(**kwargs)


def test_schedule_rejects_negative_round() -> None:
    with pytest.raises(ValueError, match="round_index"):
        DegreeSchedule().degree(-1)


# --- handwriting and scan model ------------------------------------------------------------
def test_handwriting_parameters_round_trip_through_the_genotype():
    g = GlyphGenerator(DIGITS, 28, seed=5)
    for c in g.random(3, 6) + g.vary(g.random(7, 6), 0.7):
        for name in ("elastic_alpha", "elastic_scale", "stroke_weight", "levels", *pen.SHAPE_KEYS):
            low, high = g.parameter_ranges[name]
            assert low <= c.genotype[name] <= high
        assert isinstance(c.genotype["levels"], int)
        copy = json.loads(json.dumps(c.genotype))  # a genotype survives JSON (the round files)
        assert np.array_equal(render_glyph(copy, DIGITS[c.label], 28), c.image)


def test_elastic_deformation_moves_ink_and_is_seeded_by_the_genotype():
    plain = render_glyph(clean_genotype(), "5")
    warped = render_glyph(clean_genotype(elastic_alpha=0.08, elastic_scale=0.08, noise_seed=1), "5")
    again = render_glyph(clean_genotype(elastic_alpha=0.08, elastic_scale=0.08, noise_seed=1), "5")
    other = render_glyph(clean_genotype(elastic_alpha=0.08, elastic_scale=0.08, noise_seed=2), "5")
    assert np.array_equal(warped, again)
    assert np.abs(warped - plain).mean() > 0.02 and np.abs(warped - other).mean() > 0.02
    assert abs(warped.sum() - plain.sum()) < 0.25 * plain.sum()  # a warp, not an eraser


def test_stroke_weight_thickens_and_thins_the_pen():
    ink = {w: render_glyph(clean_genotype(stroke_weight=w), "4").sum() for w in (-0.012, 0.0, 0.03)}
    assert ink[-0.012] < 0.8 * ink[0.0] and ink[0.03] > 1.3 * ink[0.0]


def test_scanner_levels_quantize_grey_values_at_the_scan_resolution():
    genotype = clean_genotype(resolution=28, levels=4)
    values = np.unique(np.round(render_glyph(genotype, "8") * 255))
    assert set(values) <= {0.0, 85.0, 170.0, 255.0} and len(values) > 2
    assert len(np.unique(render_glyph(clean_genotype(levels=256), "8"))) > 8
