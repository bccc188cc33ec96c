"""Pen forms: handwritten digits as single strokes, chosen like fonts (coautogen_fl/generation/pen.py)."""

from __future__ import annotations

import numpy as np
import pytest

from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.generation import pen
from coautogen_fl.generation.fonts import bundled_fonts
from coautogen_fl.generation.glyph import GlyphGenerator, render_glyph

DIGITS = [str(d) for d in range(10)]


def _ink(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def test_every_digit_has_a_form_and_the_form_names_cover_the_most_varied_digit() -> None:
    assert pen.pen_writes(DIGITS)
    assert pen.PEN_FONTS == ("pen:0", "pen:1", "pen:2")  # "1" has three forms
    assert not pen.pen_writes(["a", "b"]) and not pen.pen_writes([]) and not pen.pen_writes(["10"])


def test_auto_style_writes_digits_with_the_pen_and_other_texts_with_truetype_fonts() -> None:
    assert pen.glyph_fonts(DIGITS) == pen.PEN_FONTS
    letters = pen.glyph_fonts(["A", "B"])
    assert letters and not any(pen.is_pen_font(f) for f in letters)
    assert pen.glyph_fonts(DIGITS, style="fonts") == tuple(bundled_fonts(tuple(DIGITS)))
    both = pen.glyph_fonts(DIGITS, style="both")
    assert both[:3] == pen.PEN_FONTS and set(both[3:]) == set(bundled_fonts(tuple(DIGITS)))


def test_explicit_fonts_may_mix_pen_forms_and_truetype_fonts() -> None:
    assert pen.glyph_fonts(DIGITS, ["pen:1", "DejaVuSans", "pen:1"]) == ("pen:1", "DejaVuSans")
    assert pen.glyph_fonts(DIGITS, ["pen:2"]) == ("pen:2",)


@pytest.mark.parametrize(
    ("names", "fonts", "style", "needle"),
    [
        (["A", "B"], None, "pen", "glyph_style=fonts"),
        (["A", "B"], None, "both", "glyph_style=fonts"),
        (["A", "B"], ["pen:0"], "auto", "pen forms"),
        (DIGITS, None, "cursive", "glyph_style must be one of"),
        (DIGITS, ["NoSuchFont"], "auto", "NoSuchFont"),
    ],
)
def test_impossible_choices_are_refused_with_the_fix(names, fonts, style, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        pen.glyph_fonts(names, fonts, style)


def test_the_config_key_validates_at_start_up() -> None:
    assert load_config("configs/default.yaml").generator.glyph_style == "auto"
    with pytest.raises(ConfigError, match="glyph_style"):
        load_config("configs/default.yaml", overrides=["generator.glyph_style=cursive"])


def test_a_drawing_is_a_pure_function_of_its_seed() -> None:
    first = _ink(pen.draw_pen("5", "pen:0", 84, 0.08, seed=7))
    again = _ink(pen.draw_pen("5", "pen:0", 84, 0.08, seed=7))
    other = _ink(pen.draw_pen("5", "pen:0", 84, 0.08, seed=8))
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)  # the hand wobbles


def test_a_wider_pen_lays_down_more_ink() -> None:
    thin = _ink(pen.draw_pen("8", "pen:0", 84, 0.05, seed=3)).sum()
    thick = _ink(pen.draw_pen("8", "pen:0", 84, 0.15, seed=3)).sum()
    assert thick > 2 * thin
    assert pen.pen_width(0.1) > pen.pen_width(0.0) == pen.BASE_PEN_WIDTH


def test_forms_differ_where_writers_differ_and_wrap_where_there_is_one_form() -> None:
    plain, barred = (_ink(pen.draw_pen("7", f, 84, 0.08, seed=1)) for f in ("pen:0", "pen:1"))
    assert barred.sum() > plain.sum() * 1.1  # the crossed 7 has its bar
    zero = [_ink(pen.draw_pen("0", f, 84, 0.08, seed=1)) for f in pen.PEN_FONTS]
    assert all(np.array_equal(zero[0], z) for z in zero[1:])  # one form of "0": every name draws it


def test_drawing_refuses_a_text_without_forms() -> None:
    with pytest.raises(ValueError, match="no pen form"):
        pen.draw_pen("A", "pen:0", 84, 0.08, seed=0)
    with pytest.raises(ValueError, match="no pen form"):
        pen.draw_pen("1", "DejaVuSans", 84, 0.08, seed=0)


def test_a_pen_genotype_re_renders_its_candidate_exactly() -> None:
    generator = GlyphGenerator(DIGITS, seed=4)
    assert generator.fonts == pen.PEN_FONTS
    for candidate in generator.random(label=4, n=6) + generator.vary(generator.random(label=1, n=3), 0.5):
        assert pen.is_pen_font(candidate.genotype["font"])
        text = DIGITS[candidate.label]
        assert np.array_equal(render_glyph(candidate.genotype, text), candidate.image)


def test_pen_glyphs_carry_ink_and_votes_can_move_the_choice_of_form() -> None:
    generator = GlyphGenerator(DIGITS, seed=2)
    candidates = [c for label in range(10) for c in generator.random(label, 30)]
    peaks = np.array([c.image.max() for c in candidates])
    assert (peaks > 0.05).all() and (peaks > 0.2).mean() > 0.9  # a thin pen at a coarse scan may be faint
    weights = np.array([1.0 if c.genotype["font"] == "pen:1" else 0.0 for c in candidates])
    generator.fit(candidates, weights, mix=1.0)
    assert generator.distribution_of(7).describe()["top_font"] == "pen:1"


# --- shape coefficients ----------------------------------------------------------------------
def test_bend_moves_the_points_each_coefficient_names_and_zero_keeps_them() -> None:
    stem = np.array([[0.5, 0.0], [0.5, 0.5], [0.5, 1.0]])  # a vertical stroke through the middle
    assert np.array_equal(pen.bend(stem, {key: 0.0 for key in pen.SHAPE_KEYS}), stem)
    bowed = pen.bend(stem, {"bow_x": 0.1})
    assert bowed[:, 0].max() == pytest.approx(0.6)  # the middle bows by bow_x ...
    assert bowed[0, 0] == pytest.approx(0.5) and bowed[-1, 0] == pytest.approx(0.5)  # ... the ends stay
    base = np.array([[0.0, 1.0], [1.0, 1.0]])  # a bottom bar
    wide = pen.bend(base, {"taper": 0.4})
    assert wide[-1, 0] - wide[0, 0] == pytest.approx(1.4)  # taper widens the bottom by 2 * 0.5 * taper
    raised = pen.bend(stem, {"waist": -0.1})
    assert 0.4 in raised[:, 1].round(9) and 0.5 not in raised[:, 1].round(9)  # the middle now sits at 0.4
    assert raised[0, 1] == 0.0 and raised[-1, 1] == 1.0


def test_shape_coefficients_change_the_drawn_form_deterministically() -> None:
    plain = _ink(pen.draw_pen("1", "pen:0", 84, 0.08, seed=3))
    bowed = _ink(pen.draw_pen("1", "pen:0", 84, 0.08, seed=3, shape={"bow_x": 0.15}))
    again = _ink(pen.draw_pen("1", "pen:0", 84, 0.08, seed=3, shape={"bow_x": 0.15}))
    assert np.array_equal(bowed, again)
    assert bowed.shape[1] > plain.shape[1] + 3  # a bowed stem spans a wider ink box


def test_votes_refit_the_shape_of_a_class() -> None:
    generator = GlyphGenerator(DIGITS, seed=6)
    candidates = generator.random(label=3, n=200)
    weights = np.array([1.0 if c.genotype["waist"] > 0.06 else 0.0 for c in candidates])
    generator.fit(candidates, weights, mix=1.0)
    redrawn = generator.random(label=3, n=200)
    assert np.mean([c.genotype["waist"] for c in redrawn]) > 0.06  # prior mean 0
