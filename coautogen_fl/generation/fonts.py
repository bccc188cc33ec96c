"""The TrueType fonts the procedural glyph generator may draw with.

Only matplotlib's bundled fonts are used (``matplotlib.get_data_path()/fonts/ttf``): they ship
with the package, so every machine has the same files and renderings are reproducible. System
fonts are never consulted (they differ between machines and may be absent).

A font file existing is not enough: several bundled fonts are symbol or "display" fonts that map
digits to parentheses, arrows, empty outlines or a fallback box. ``bundled_fonts`` keeps only the
fonts whose glyphs for the requested texts are real, distinct and legible.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.ft2font import FaceFlags, FT2Font
from PIL import Image, ImageDraw, ImageFont

#: A private-use code point no font in the bundle draws; its rendering is the font's
#: ".notdef" box (or nothing), which a usable glyph must differ from.
MISSING_GLYPH = "\U0010fffd"

#: Pixel size used only to probe fonts; large enough that distinct glyphs never collide.
_PROBE_SIZE = 48

#: PostScript glyph names of the characters we can check by name. A symbol font can map the
#: code point of "0" to a glyph called e.g. "parenlefttp": it renders, and renders distinctly,
#: but it is not a zero. Letters are named after themselves.
_DIGIT_NAMES = dict(zip("0123456789", "zero one two three four five six seven eight nine".split()))


class NoUsableFontError(RuntimeError):
    """No bundled font renders every requested text sample."""


def font_dir() -> Path:
    """The folder holding matplotlib's bundled TrueType fonts.

    Returns
    -------
    Path
        ``matplotlib.get_data_path()/fonts/ttf``.
    """
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_path(name: str) -> Path:
    """The TTF file of one bundled font.

    Parameters
    ----------
    name : str
        The font's file stem, e.g. ``"DejaVuSans"``.

    Returns
    -------
    Path
        The existing ``.ttf`` file.

    Raises
    ------
    ValueError
        If matplotlib bundles no font of that name.
    """
    path = font_dir() / f"{name}.ttf"
    if not path.is_file():
        available = sorted(p.stem for p in font_dir().glob("*.ttf"))
        raise ValueError(
            f"font {name!r} is not among matplotlib's bundled fonts in {font_dir()}; choose one of {available}"
        )
    return path


def select_fonts(text_samples: Sequence[str], names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The fonts a generator may use for these texts.

    Parameters
    ----------
    text_samples : Sequence[str]
        The texts that must be legible (a run's class names).
    names : Sequence[str] or None, default None
        Requested font names; None means every font ``bundled_fonts(text_samples)`` keeps.

    Returns
    -------
    tuple[str, ...]
        Font names, duplicates removed, in the given (or sorted) order.

    Raises
    ------
    ValueError
        If ``names`` is empty or holds a font that cannot render every sample.
    """
    usable = bundled_fonts(text_samples)
    if names is None:
        return tuple(usable)
    chosen = tuple(dict.fromkeys(names))
    bad = [f for f in chosen if f not in usable]
    if not chosen or bad:
        raise ValueError(
            f"fonts {bad or list(names)} cannot render {list(text_samples)}; "
            f"pass None or a non-empty subset of {list(usable)}"
        )
    return chosen


@functools.lru_cache(maxsize=256)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A bundled font at one pixel size, cached (loading costs far more than drawing).

    Parameters
    ----------
    name : str
        Font name (file stem), e.g. ``"DejaVuSans"``.
    size : int
        Em size in pixels.

    Returns
    -------
    ImageFont.FreeTypeFont
        The loaded font; shared between callers, so do not mutate it.
    """
    return ImageFont.truetype(str(font_path(name)), size)


def bundled_fonts(text_samples: Sequence[str] = tuple("0123456789")) -> dict[str, Path]:
    """Bundled fonts that really render every text sample.

    A font is kept when (1) every character of every sample is in its character map, (2) the
    glyph name of each digit or ASCII letter names that character (symbol fonts reuse these
    code points for other shapes), (3) each sample renders with ink, (4) the samples render
    pairwise differently and (5) each character renders differently from the font's drawing of
    a surely-missing glyph. The result is cached per distinct tuple of samples.

    Parameters
    ----------
    text_samples : Sequence[str], default ``tuple("0123456789")``
        The texts that must be legible, e.g. a run's class names.

    Returns
    -------
    dict[str, Path]
        Font name (file stem) -> TTF path, sorted by name. A fresh dict on every call.

    Raises
    ------
    ValueError
        If ``text_samples`` is empty or holds a blank sample.
    NoUsableFontError
        If no bundled font passes (names the folder searched).
    """
    samples = tuple(dict.fromkeys(str(s) for s in text_samples))  # dedupe, keep order
    if not samples or any(not s.strip() for s in samples):
        raise ValueError(f"text_samples must be non-empty strings with visible characters, got {text_samples!r}")
    # Copy so callers cannot mutate the cached mapping.
    return dict(_bundled_fonts_cached(samples))


@functools.lru_cache(maxsize=32)
def _bundled_fonts_cached(samples: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    """Probe every bundled TTF once per tuple of samples (the expensive part)."""
    folder = font_dir()
    kept = tuple(
        (path.stem, path) for path in sorted(folder.glob("*.ttf"), key=lambda p: p.stem) if _font_renders(path, samples)
    )
    if not kept:
        raise NoUsableFontError(
            f"no font in {folder} renders all of {list(samples)}; these fonts are provided by "
            "matplotlib's package data (reinstall matplotlib if the folder is empty), and the "
            "texts must use characters the DejaVu/STIX/Computer Modern fonts cover"
        )
    return kept


def _font_renders(path: Path, samples: tuple[str, ...]) -> bool:
    """True if the font at ``path`` draws every sample legibly (see ``bundled_fonts``)."""
    chars = sorted({c for s in samples for c in s if not c.isspace()})
    try:
        face = FT2Font(str(path))
        font = ImageFont.truetype(str(path), _PROBE_SIZE)
    except (OSError, RuntimeError):  # unreadable file: skip it rather than fail the run
        return False
    if not all(_glyph_is_named_for(face, c) for c in chars):
        return False
    renders = [_render_probe(font, s) for s in samples]
    if any(not r.any() for r in renders):
        return False
    if len({r.tobytes() for r in renders}) != len(renders):
        return False
    missing = _render_probe(font, MISSING_GLYPH).tobytes()
    return all(_render_probe(font, c).tobytes() != missing for c in chars)


def _glyph_is_named_for(face: FT2Font, char: str) -> bool:
    """The font maps ``char`` to a glyph, and (if checkable) a glyph named for ``char``."""
    index = face.get_char_index(ord(char))
    if not index:
        return False
    expected = _DIGIT_NAMES.get(char, char if char.isascii() and char.isalpha() else None)
    if expected is None or not (face.face_flags & FaceFlags.GLYPH_NAMES):
        return True  # no name to compare against: rely on the rendering checks
    base = face.get_glyph_name(index).split(".")[0]  # ".alt"/".sc" suffixes are variants
    # "<name>oldstyle" is Adobe's legacy name for old-style figures: still the same digit.
    return base in (expected, f"{expected}oldstyle", f"uni{ord(char):04X}", f"u{ord(char):04X}")


def _render_probe(font: ImageFont.FreeTypeFont, text: str) -> np.ndarray:
    """Render ``text`` centred on a black square canvas big enough for any probe text."""
    width = _PROBE_SIZE * (2 + len(text))
    image = Image.new("L", (width, 2 * _PROBE_SIZE), 0)
    ImageDraw.Draw(image).text((width / 2, _PROBE_SIZE), text, fill=255, font=font, anchor="mm")
    return np.asarray(image)
