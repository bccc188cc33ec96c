"""Procedural glyph generator (the embedded default): class names drawn with domain randomisation.

Each candidate is its class name (e.g. "7") in a bundled TrueType font, transformed, blurred,
degraded to a scan resolution, dimmed and noised: white ink on black, float32 in [0, 1]. Needs no
weights, runs on one CPU core. The genotype (a flat JSON-serialisable dict) holds every
parameter, so ``render_glyph`` re-creates any candidate's pixels exactly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from coautogen_fl.generation import handwriting, pen
from coautogen_fl.generation.base import Candidate, CandidateMaker, check_int
from coautogen_fl.generation.distribution import GenotypeDistribution
from coautogen_fl.generation.fonts import load_font
from coautogen_fl.generation.schedule import check_degree

#: Sampling range (low, high) of every numeric genotype parameter; ``random`` draws uniformly
#: from it and ``vary`` clips to it.
#: - font_size: longer side of the text's ink box as a fraction of the image side (before
#:   scale_x/scale_y); a glyph is always shrunk and shifted to stay inside the frame.
#: - stroke_width: extra outline per side, as a fraction of the font's em size (0 = as designed).
#: - rotation: degrees, positive = counter-clockwise. shear: horizontal shear (x += shear * -y).
#: - translate_x / translate_y: shift as a fraction of the image side (y positive = down).
#: - scale_x / scale_y: extra stretch per axis, so glyphs can be narrower/wider/squatter.
#: - blur: Gaussian radius in output pixels.
#: - resolution: the scan resolution in pixels (integer); the glyph is box-downsampled to it and
#:   bilinearly upsampled back, which gives the blocky-blurry look of 8x8 scans. Values at or
#:   above the image size leave the image as is. The upper bound 28 is for the default image
#:   size: a generator uses its own image_size as the upper bound (``parameter_ranges``).
#: - contrast: ink intensity (1 = pure white). background_noise: std of additive sensor noise.
#: - elastic_alpha / elastic_scale: the hand's wobble, a smooth random displacement field (largest
#:   shift and smoothness, fractions of the side); stroke_weight: pen weight, dilation (> 0) or
#:   erosion (< 0) as a fraction of the side; levels: the scanner's grey levels (integer), applied
#:   at the scan resolution (see ``coautogen_fl.generation.handwriting``).
#: - bow_x / bow_y / taper / waist: the shape of a pen form, low-order bends of its unit box that
#:   the votes refit like any other parameter (see ``coautogen_fl.generation.pen.bend``); TrueType
#:   fonts ignore them.
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "font_size": (0.4, 1.0),
    "stroke_width": (0.0, 0.1),
    "rotation": (-30.0, 30.0),
    "translate_x": (-0.2, 0.2),
    "translate_y": (-0.2, 0.2),
    "scale_x": (0.5, 1.4),
    "scale_y": (0.6, 1.2),
    "shear": (-0.5, 0.5),
    "blur": (0.0, 2.0),
    "resolution": (5, 28),
    "contrast": (0.3, 1.0),
    "background_noise": (0.0, 0.2),
    "elastic_alpha": (0.0, 0.08),
    "elastic_scale": (0.04, 0.2),
    "stroke_weight": (-0.012, 0.03),
    "levels": (4, 64),
    "bow_x": (-0.15, 0.15),
    "bow_y": (-0.1, 0.1),
    "taper": (-0.4, 0.4),
    "waist": (-0.12, 0.12),
}

#: Parameters stored as integers (stepped on a continuous scale, then rounded).
INTEGER_PARAMETERS = frozenset({"resolution", "levels"})

#: Gaussian step std of ``vary`` = degree * (high - low) * STEP_SCALE: at degree 1 a step spans a
#: quarter of the range, so even the strongest variation stays related to its parent.
STEP_SCALE = 0.25

#: Keys every glyph genotype holds (besides the PARAMETER_RANGES keys).
GENOTYPE_KEYS = ("font", *PARAMETER_RANGES, "noise_seed")

#: The working canvas is this many times the output size: text is drawn and transformed there,
#: then box-downsampled, which anti-aliases far better than transforming at the output size.
_SUPERSAMPLE = 3


def render_glyph(genotype: dict[str, Any], text: str, image_size: int = 28) -> np.ndarray:
    """Render ``text`` as described by ``genotype``; a pure function of its arguments.

    Parameters
    ----------
    genotype : dict
        Holds every key of ``GENOTYPE_KEYS`` (as produced by ``GlyphGenerator``).
    text : str
        The text to draw, e.g. the class name ``"7"``.
    image_size : int, default 28
        Output side length in pixels (at least 8).

    Returns
    -------
    np.ndarray
        float32, shape (image_size, image_size), values in [0, 1], white ink on black.
    """
    check_int("image_size", image_size, 8)
    _require_genotype(genotype, "genotype")
    if not text or not text.strip():
        raise ValueError(f"text must contain a visible character, got {text!r}")
    canvas = image_size * _SUPERSAMPLE
    source = _draw_text(genotype, text, em_size=canvas)
    data = _affine_coefficients(genotype, source.size, canvas)
    work = source.transform((canvas,) * 2, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    work = handwriting.elastic(
        work, float(genotype["elastic_alpha"]), float(genotype["elastic_scale"]), int(genotype["noise_seed"])
    )
    work = handwriting.stroke(work, float(genotype["stroke_weight"]))
    image = _degrade(work, image_size, int(genotype["resolution"]), float(genotype["blur"]), int(genotype["levels"]))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(float(genotype["contrast"]) / 255.0)
    noise_std = float(genotype["background_noise"])
    if noise_std > 0:
        # Own generator per candidate: the noise is part of the genotype, not of the run's stream.
        noise_rng = np.random.default_rng(int(genotype["noise_seed"]))
        pixels += noise_rng.normal(0.0, noise_std, pixels.shape).astype(np.float32)
    return np.minimum(np.maximum(pixels, 0.0, out=pixels), 1.0, out=pixels)  # cheaper than clip


def _draw_text(genotype: dict[str, Any], text: str, em_size: int) -> Image.Image:
    """Draw the text tightly cropped to its ink box, with a 2 px black margin (a pen form for a
    ``pen:<n>`` font, see ``coautogen_fl.generation.pen``)."""
    if pen.is_pen_font(str(genotype["font"])):
        width = pen.pen_width(float(genotype["stroke_width"]))
        shape = {key: float(genotype[key]) for key in pen.SHAPE_KEYS}
        return pen.draw_pen(text, str(genotype["font"]), em_size, width, int(genotype["noise_seed"]), shape)
    font = load_font(str(genotype["font"]), em_size)
    stroke = float(genotype["stroke_width"]) * em_size
    box = font.getbbox(text, stroke_width=stroke)  # floats when the stroke is fractional
    left, top = math.floor(box[0]), math.floor(box[1])
    right, bottom = math.ceil(box[2]), math.ceil(box[3])
    pad = 2  # keeps bilinear sampling at the crop edge from smearing ink outwards
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    draw = ImageDraw.Draw(image)
    draw.text((pad - left, pad - top), text, 255, font, stroke_width=stroke, stroke_fill=255)
    return image


def _affine_coefficients(genotype: dict[str, Any], size: tuple[int, int], canvas: int) -> tuple:
    """PIL AFFINE data mapping canvas pixels back to source pixels.

    Forward map: q = centre + t + M (p - source_centre), with M = R(rotation) Sh(shear)
    diag(scale_x, scale_y) * k, where k fits the ink box's longer side to font_size * canvas.
    M is then shrunk and t clamped so the transformed ink box stays inside the canvas.
    """
    src_w, src_h = size  # the cropped text image
    half_w, half_h = (src_w - 4) / 2, (src_h - 4) / 2  # the ink box, minus the 2 px margins
    k = float(genotype["font_size"]) * canvas / max(2 * half_w, 2 * half_h, 1.0)
    theta = math.radians(float(genotype["rotation"]))
    cos, sin = math.cos(theta), math.sin(theta)
    sx, sy, sh = (float(genotype[key]) for key in ("scale_x", "scale_y", "shear"))
    # M = R @ [[1, -sh], [0, 1]] @ diag(sx, sy) * k, written out: 2x2 numpy calls would cost more
    # than the whole rasterisation. Image y points down, so a counter-clockwise turn on screen is
    # R = [[cos, sin], [-sin, cos]], and a positive shear leans the glyph's top to the right.
    m00, m01 = k * cos * sx, k * sy * (sin - cos * sh)
    m10, m11 = -k * sin * sx, k * sy * (cos + sin * sh)
    extent_x = abs(m00) * half_w + abs(m01) * half_h  # half extents of the transformed ink box
    extent_y = abs(m10) * half_w + abs(m11) * half_h
    half = canvas / 2
    fit = min(1.0, half / max(extent_x, extent_y, 1e-9))
    m00, m01, m10, m11 = m00 * fit, m01 * fit, m10 * fit, m11 * fit
    room_x, room_y = half - extent_x * fit, half - extent_y * fit
    centre_x = half + min(max(float(genotype["translate_x"]) * canvas, -room_x), room_x)
    centre_y = half + min(max(float(genotype["translate_y"]) * canvas, -room_y), room_y)
    det = m00 * m11 - m01 * m10
    a, b, d, e = m11 / det, -m01 / det, -m10 / det, m00 / det
    offset_x = src_w / 2 - a * centre_x - b * centre_y
    return (a, b, offset_x, d, e, src_h / 2 - d * centre_x - e * centre_y)


def _degrade(work: Image.Image, image_size: int, resolution: int, blur: float, levels: int = 256) -> Image.Image:
    """Downsample to the scan resolution with its grey levels (and back up), then blur at the
    output size."""
    if resolution < image_size:
        small = handwriting.quantize(work.resize((resolution, resolution), Image.Resampling.BOX), levels)
        image = small.resize((image_size, image_size), Image.Resampling.BILINEAR)
    else:
        image = handwriting.quantize(work.resize((image_size, image_size), Image.Resampling.BOX), levels)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return image


def _require_genotype(genotype: dict[str, Any], owner: str) -> None:
    """Raise if ``genotype`` lacks a glyph key (e.g. it came from another generator)."""
    missing = [k for k in GENOTYPE_KEYS if k not in genotype]
    if missing:
        raise ValueError(
            f"{owner} lacks {missing}: not a glyph genotype; vary and render "
            f"only genotypes made by a GlyphGenerator (keys {list(GENOTYPE_KEYS)})"
        )


class GlyphGenerator(CandidateMaker):
    """Domain-randomised text glyphs; implements the ``Generator`` protocol.

    Parameters
    ----------
    class_names : Sequence[str]
        The text drawn for each label (e.g. ``"0"`` .. ``"9"``); unique, non-blank.
    image_size : int, default 28
        Output side length in pixels (at least 8).
    seed : int, default 0
        Seeds the one numpy Generator all sampling draws from: same seed, same candidates.
    fonts : Sequence[str] or None, default None
        Pen forms (``pen:<n>``) and bundled font names to draw from; None means the ``style``.
    refit : str, default "per_class"
        What ``fit`` moves: ``per_class`` gives every class its own distribution (a "1" and an
        "8" are drawn by different hands), started from the shared fit; ``shared`` fits one
        distribution to all classes' votes (pools the noise of the fewest candidates).
    style : str, default "auto"
        What draws a glyph when ``fonts`` is None: ``pen`` (handwritten pen forms, see
        ``coautogen_fl.generation.pen``), ``fonts`` (every bundled TrueType font that renders
        all class names, see ``bundled_fonts``), ``both``, or ``auto`` (pen forms when every
        class name has them, as the digits do, else fonts).

    Attributes
    ----------
    fonts : tuple[str, ...]
        The fonts (and pen forms) ``random`` picks from uniformly and ``vary`` switches between.
    parameter_ranges : dict[str, tuple[float, float]]
        ``PARAMETER_RANGES`` with the resolution's upper bound set to ``image_size``.
    """

    ID_PREFIX = "glyph"

    def __init__(
        self,
        class_names: Sequence[str],
        image_size: int = 28,
        seed: int = 0,
        fonts: Sequence[str] | None = None,
        refit: str = "per_class",
        style: str = "auto",
    ) -> None:
        names = tuple(str(c) for c in class_names)
        if refit not in ("per_class", "shared"):
            raise ValueError(f"refit must be 'per_class' or 'shared', got {refit!r}")
        if not names or any(not c.strip() for c in names) or len(set(names)) != len(names):
            raise ValueError(
                f"class_names must be a non-empty sequence of unique, non-blank texts, got "
                f"{list(class_names)!r}; for digits pass [str(d) for d in range(10)]"
            )
        check_int("image_size", image_size, 8)
        self.fonts = pen.glyph_fonts(names, fonts, style)
        self.class_names = names
        self.image_size = int(image_size)
        self.seed = seed
        # Resolutions above the image size all mean "sharp"; stop the range at the image size.
        scan = (PARAMETER_RANGES["resolution"][0], self.image_size)
        self.parameter_ranges = {**PARAMETER_RANGES, "resolution": scan}
        self._rng = np.random.default_rng(seed)
        # Broad on purpose: the server cannot look at the private data, so the prior covers
        # many looks and the votes (feedback.evolve=distribution) narrow it down.
        self.distribution = GenotypeDistribution(self.parameter_ranges, self.fonts, "font", INTEGER_PARAMETERS)
        self.refit = refit
        #: Per-class distributions (``refit="per_class"``); a class without one draws from the shared one.
        self.class_distributions: dict[int, GenotypeDistribution] = {}

    def fit(
        self, candidates: Sequence[Candidate], weights: np.ndarray, mix: float = 0.8, min_spread: float = 0.08
    ) -> None:
        """Move the sampling distribution toward the vote-weighted genotypes of ``candidates``
        (see ``GenotypeDistribution.fitted``); later ``random`` calls draw from it. With
        ``refit="per_class"`` each class is also fitted to its own candidates' votes, starting
        from its previous fit (or the shared one before this round's)."""
        weights = np.asarray(weights, dtype=np.float64)
        shared_before = self.distribution
        self.distribution = shared_before.fitted([c.genotype for c in candidates], weights, mix, min_spread)
        if self.refit == "shared":
            return
        labels = np.array([c.label for c in candidates])
        for label in np.unique(labels).tolist():
            members = np.flatnonzero(labels == label)
            base = self.class_distributions.get(label, shared_before)
            fitted = base.fitted([candidates[i].genotype for i in members], weights[members], mix, min_spread)
            if fitted is not base:  # a class whose votes carried no signal keeps what it had
                self.class_distributions[label] = fitted

    def distribution_of(self, label: int) -> GenotypeDistribution:
        """The distribution class ``label`` is drawn from."""
        return self.class_distributions.get(label, self.distribution)

    def render(self, genotype: dict[str, Any], text: str) -> np.ndarray:
        """Re-render a genotype at this generator's image size (see ``render_glyph``)."""
        return render_glyph(genotype, text, self.image_size)

    def random(self, label: int, n: int) -> list[Candidate]:
        """Draw ``n`` fresh candidates of class ``label`` from the current distribution.

        Parameters
        ----------
        label : int
            Class index in ``[0, len(class_names) - 1]``.
        n : int
            Number of candidates (0 gives an empty list).

        Returns
        -------
        list[Candidate]
            Candidates with ``parent_id=None`` and ``round=0``.
        """
        label = self._check_label(label)
        n = check_int("n", n, 0)
        return [self._make(label, self._sample_genotype(label), None, 0) for _ in range(n)]

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One child per parent: Gaussian parameter steps scaled by ``degree``.

        Each numeric parameter moves by N(0, degree * (high - low) * STEP_SCALE), clipped to
        ``parameter_ranges``; the font switches to another with probability 0.5 * degree; the
        noise seed is always new. Degree 0 keeps every other parameter exactly.

        Parameters
        ----------
        candidates : Sequence[Candidate]
            Parents carrying glyph genotypes.
        degree : float
            Spread of the variation, in [0, 1].

        Returns
        -------
        list[Candidate]
            Children in parent order, with the parent's label, ``parent_id`` set and
            ``round = parent.round + 1``.
        """
        degree = check_degree(degree)
        children = []
        for parent in candidates:
            label = self._check_label(parent.label, f"label of candidate {parent.candidate_id}")
            _require_genotype(parent.genotype, f"genotype of candidate {parent.candidate_id}")
            genotype = self._mutate(parent.genotype, degree)
            children.append(self._make(label, genotype, parent.candidate_id, parent.round + 1))
        return children

    def _sample_genotype(self, label: int) -> dict[str, Any]:
        """A draw from the class's current distribution (uniform prior until ``fit``), fixed draw order."""
        genotype = self.distribution_of(label).sample(self._rng)
        genotype["noise_seed"] = int(self._rng.integers(2**31 - 1))
        return genotype

    def _mutate(self, parent: dict[str, Any], degree: float) -> dict[str, Any]:
        """A mutated copy of a parent genotype (see ``vary``)."""
        rng = self._rng
        child = dict(parent)
        others = [f for f in self.fonts if f != parent["font"]]
        if others and rng.random() < 0.5 * degree:
            child["font"] = others[int(rng.integers(len(others)))]
        for name, (low, high) in self.parameter_ranges.items():
            std = degree * (high - low) * STEP_SCALE
            if std == 0:
                continue  # degree 0: keep the value exactly, even if it lies outside the range
            value = min(max(float(parent[name]) + float(rng.normal(0.0, std)), low), high)
            child[name] = int(round(value)) if name in INTEGER_PARAMETERS else value
        child["noise_seed"] = int(rng.integers(2**31 - 1))
        return child

    def _make(self, label: int, genotype: dict[str, Any], parent_id: str | None, round_index: int) -> Candidate:
        """Render a genotype into a candidate with the next id from the counter."""
        return self._candidate(label, genotype, self.render(genotype, self.class_names[label]), parent_id, round_index)
