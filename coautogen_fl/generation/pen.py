"""Pen forms: how a hand writes each digit, as single strokes drawn with a round pen.

A TrueType font is designed for print: serifs, contrast between thick and thin strokes, closed
counters. A hand draws a digit as one or two strokes of even width, and writers differ in a few
well-known ways (a "1" with or without its flag and base, an open or closed "4", a "7" with or
without its bar, a "9" with a straight or a curved stem). ``PEN_FORMS`` writes these common forms
as polylines in a unit box; they are a generic model of handwriting, like a single-stroke (Hershey
style) font, and were not fitted to any data set.

A pen form plays the part of a font in a glyph genotype: its name ``pen:<n>`` is a value of the
genotype's ``font`` key, so the votes choose between forms exactly as they choose between fonts,
and everything after drawing (affine map, elastic field, stroke weight, scan) is shared with the
TrueType path of ``coautogen_fl.generation.glyph``. Four shape coefficients (``bend``) change the
form itself: a bowed stem, a wider base, a higher or lower waist. They are genotype parameters, so
the votes refit a class's shape as they refit its pose; the elastic field, seeded, cannot be refit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from coautogen_fl.config import CHOICES
from coautogen_fl.generation.fonts import select_fonts

Point = tuple[float, float]
Stroke = list[Point]

#: Prefix of pen-form names in a genotype's ``font`` key: ``pen:0``, ``pen:1``, ``pen:2``.
PEN_PREFIX = "pen:"

#: Width of the unit box relative to its height (digits are taller than wide).
_ASPECT = 0.62

#: Pen diameter (fraction of the em size) at a genotype's ``stroke_width`` 0; each unit of
#: ``stroke_width`` (an outline per side for TrueType fonts) widens the pen by 1.5 units.
BASE_PEN_WIDTH = 0.06
PEN_WIDTH_PER_STROKE = 1.5

#: The hand's wobble, as fractions of the box: std of each stroke's whole shift, and of the
#: per-point steps whose running sum bends the stroke smoothly.
_STROKE_SHIFT = 0.02
_WOBBLE_STEP = 0.004


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 24) -> Stroke:
    """Points of an elliptic arc from ``start`` to ``end`` degrees (counter-clockwise on screen)."""
    angles = (math.radians(start + (end - start) * i / steps) for i in range(steps + 1))
    return [(cx + rx * math.cos(a), cy - ry * math.sin(a)) for a in angles]


#: The common written forms of each digit: a form is a list of strokes, a stroke a polyline in
#: the unit box (x right, y down). Form ``n`` of a text is ``PEN_FORMS[text][n % len(forms)]``.
PEN_FORMS: dict[str, list[list[Stroke]]] = {
    "0": [[_arc(0.5, 0.5, 0.36, 0.48, 90, 450)]],
    "1": [
        [[(0.55, 0.02), (0.5, 0.98)]],
        [[(0.28, 0.22), (0.55, 0.02), (0.52, 0.98)]],
        [[(0.28, 0.22), (0.55, 0.02), (0.52, 0.98)], [(0.25, 0.98), (0.8, 0.98)]],
    ],
    "2": [
        [_arc(0.5, 0.28, 0.34, 0.26, 160, -40) + [(0.12, 0.98), (0.9, 0.98)]],
        [
            _arc(0.5, 0.28, 0.34, 0.26, 160, -30)
            + [(0.15, 0.95)]
            + _arc(0.5, 0.9, 0.1, 0.08, 180, 270, 4)
            + [(0.9, 0.95)]
        ],
    ],
    "3": [
        [_arc(0.48, 0.27, 0.32, 0.25, 150, -90) + _arc(0.48, 0.73, 0.36, 0.25, 90, -150)],
        [[(0.15, 0.02), (0.85, 0.02), (0.45, 0.42)] + _arc(0.48, 0.7, 0.36, 0.28, 80, -150)],
    ],
    "4": [
        [[(0.62, 0.02), (0.1, 0.66), (0.92, 0.66)], [(0.7, 0.3), (0.7, 0.98)]],
        [[(0.2, 0.02), (0.12, 0.58), (0.88, 0.58)], [(0.75, 0.02), (0.75, 0.98)]],
    ],
    "5": [[[(0.85, 0.02), (0.25, 0.02), (0.2, 0.45)] + _arc(0.48, 0.68, 0.36, 0.3, 140, -150)]],
    "6": [[_arc(0.55, 0.5, 0.35, 0.48, 60, 180) + _arc(0.5, 0.7, 0.32, 0.28, 180, 540)]],
    "7": [
        [[(0.1, 0.02), (0.9, 0.02), (0.38, 0.98)]],
        [[(0.1, 0.02), (0.9, 0.02), (0.38, 0.98)], [(0.35, 0.5), (0.8, 0.5)]],
    ],
    "8": [[_arc(0.5, 0.26, 0.28, 0.24, -90, 270) + _arc(0.5, 0.73, 0.36, 0.25, 90, -270)]],
    "9": [
        [_arc(0.5, 0.3, 0.34, 0.28, 0, 360) + [(0.84, 0.3), (0.62, 0.98)]],
        [_arc(0.5, 0.3, 0.34, 0.28, 0, 360) + [(0.84, 0.3), (0.82, 0.98)]],
    ],
}

#: The pen-form names a glyph generator offers: as many as the most varied text has forms.
PEN_FONTS: tuple[str, ...] = tuple(f"{PEN_PREFIX}{n}" for n in range(max(len(f) for f in PEN_FORMS.values())))


def is_pen_font(name: str) -> bool:
    """True if ``name`` (a genotype's ``font``) names a pen form rather than a TrueType font."""
    return name in PEN_FONTS


def pen_writes(texts: Sequence[str]) -> bool:
    """True if every text is a single character with pen forms (e.g. the digits "0".."9")."""
    return bool(texts) and all(t in PEN_FORMS for t in texts)


def pen_width(stroke_width: float) -> float:
    """Pen diameter (fraction of the em size) for a genotype's ``stroke_width``."""
    return BASE_PEN_WIDTH + PEN_WIDTH_PER_STROKE * float(stroke_width)


#: Keys of a pen shape (see ``bend``): smooth, data-independent deformations of the unit box
#: whose coefficients the votes refit, so that a class's shape (not only its pose) can move.
SHAPE_KEYS = ("bow_x", "bow_y", "taper", "waist")


def bend(points: np.ndarray, shape: dict[str, float] | None) -> np.ndarray:
    """Deform unit-box points (x right, y down) by the low-order shape coefficients.

    With u = x - 0.5, v = y - 0.5 and a bump b(t) = 1 - 4 t^2 (1 at the centre, 0 at the edges):
    ``bow_x`` shifts the middle of vertical strokes sideways (x += bow_x b(v)); ``bow_y`` shifts
    the middle of horizontal strokes up or down (y += bow_y b(u)); ``taper`` widens the bottom
    against the top (x += 2 taper u v); ``waist`` moves the middle of the glyph (a loop's join, a
    bar) up or down (y += waist b(v)). All zero leaves the points as they are.
    """
    if not shape or not any(shape.values()):
        return points
    points = _densify(points)
    u, v = points[:, 0] - 0.5, points[:, 1] - 0.5
    x = points[:, 0] + shape.get("bow_x", 0.0) * (1 - 4 * v * v) + 2 * shape.get("taper", 0.0) * u * v
    y = points[:, 1] + shape.get("bow_y", 0.0) * (1 - 4 * u * u) + shape.get("waist", 0.0) * (1 - 4 * v * v)
    return np.stack([x, y], 1)


def _densify(points: np.ndarray, step: float = 0.04) -> np.ndarray:
    """The polyline with extra points on long segments, so that a bend curves straight strokes too."""
    out = [points[:1]]
    for start, end in zip(points[:-1], points[1:]):
        parts = max(1, int(np.ceil(np.hypot(*(end - start)) / step)))
        out.append(start + (end - start) * (np.arange(1, parts + 1)[:, None] / parts))
    return np.concatenate(out)


def draw_pen(
    text: str, font: str, em_size: int, pen_width: float, seed: int, shape: dict[str, float] | None = None
) -> Image.Image:
    """Draw one pen form of ``text``, cropped to its ink box with a 2 px black margin.

    Parameters
    ----------
    text : str
        A key of ``PEN_FORMS``.
    font : str
        A name of ``PEN_FONTS``; ``pen:n`` draws form ``n`` (modulo the text's number of forms).
    em_size : int
        Height of the unit box in pixels.
    pen_width : float
        Pen diameter as a fraction of ``em_size`` (at least one pixel).
    seed : int
        Seeds the hand's wobble: each stroke is shifted a little and its points take small
        correlated steps, so two drawings of a form are never identical.
    shape : dict or None, default None
        Shape coefficients (``SHAPE_KEYS``) bending the form before the wobble (see ``bend``);
        None or all zero draws the form as written.
    """
    if text not in PEN_FORMS or not is_pen_font(font):
        raise ValueError(f"no pen form {font!r} for {text!r}: pen forms exist for {sorted(PEN_FORMS)} ({PEN_FONTS})")
    forms = PEN_FORMS[text]
    strokes = forms[int(font[len(PEN_PREFIX) :]) % len(forms)]
    rng = np.random.default_rng([int(seed), 0x9E7])  # own stream, as the elastic field has
    height, width = em_size, int(em_size * _ASPECT)
    pad = int(em_size * 0.3) + 2  # room for the widest bend and wobble; cropped below
    image = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
    draw = ImageDraw.Draw(image)
    line_width = max(1, int(round(pen_width * em_size)))
    radius = line_width / 2
    for stroke in strokes:
        points = bend(np.array(stroke), shape) + rng.normal(0.0, _STROKE_SHIFT, (1, 2))
        points = points + rng.normal(0.0, _WOBBLE_STEP, points.shape).cumsum(0)
        xy = [(pad + x * width, pad + y * height) for x, y in points]
        draw.line(xy, fill=255, width=line_width, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps: PIL's lines end square
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    box = image.getbbox()
    if box is None:
        return image
    left, top, right, bottom = box
    return image.crop((left - 2, top - 2, right + 2, bottom + 2))


#: Values of ``generator.glyph_style``: which "fonts" a glyph generator draws with (the config's list).
GLYPH_STYLES = CHOICES["generator.glyph_style"]


def glyph_fonts(class_names: Sequence[str], fonts: Sequence[str] | None = None, style: str = "auto") -> tuple[str, ...]:
    """The pen forms and TrueType fonts a glyph generator draws ``class_names`` with.

    Parameters
    ----------
    class_names : Sequence[str]
        The texts drawn.
    fonts : Sequence[str] or None, default None
        An explicit list (pen-form names and bundled font names); overrides ``style``.
    style : str, default "auto"
        ``pen``: the pen forms (handwriting; needs class names with pen forms, e.g. digits);
        ``fonts``: every bundled TrueType font that renders all class names; ``both``: the two
        together; ``auto``: ``pen`` when every class name has pen forms, else ``fonts``.
    """
    if style not in GLYPH_STYLES:
        raise ValueError(f"generator.glyph_style must be one of {GLYPH_STYLES}, got {style!r}")
    writes = pen_writes(class_names)
    if fonts is not None:
        pens = tuple(dict.fromkeys(f for f in fonts if is_pen_font(f)))
        printed = [f for f in fonts if not is_pen_font(f)]
        if pens and not writes:
            raise ValueError(f"pen forms {list(pens)} draw only {sorted(PEN_FORMS)}, not all of {list(class_names)}")
        return pens + (select_fonts(class_names, printed) if printed or not pens else ())
    if style in ("pen", "both") and not writes:
        raise ValueError(
            f"generator.glyph_style={style} needs pen forms for every class name, and there are pen forms "
            f"only for {sorted(PEN_FORMS)} (class names: {list(class_names)}); set generator.glyph_style=fonts"
        )
    if style == "pen" or (style == "auto" and writes):
        return PEN_FONTS
    return (PEN_FONTS if style == "both" else ()) + select_fonts(class_names)
