"""A generic model of handwriting and scanning for rendered glyphs.

Fonts are rigid; hands are not. Three deformations a pen and a scanner make to any glyph, each a
pure function of its parameters (and of a seed for the random field), so that a genotype still
re-creates its pixels exactly:

- ``elastic``: a smooth random displacement field (Simard et al., 2003), the wobble of a stroke
  drawn by hand; ``alpha`` is its amplitude and ``scale`` its smoothness, both as fractions of
  the image side.
- ``stroke``: a signed change of stroke weight; positive thickens (dilation), negative thins
  (erosion), in units of the image side.
- ``quantize``: the scanner's grey levels (bit depth) at its own resolution.

None of these looks at any private data: they are the votes' parameter space, not a prior tuned to
a data set.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter, map_coordinates


def elastic(image: Image.Image, alpha: float, scale: float, seed: int) -> Image.Image:
    """Warp an "L" image by a smooth random displacement field.

    Parameters
    ----------
    image : PIL.Image.Image
        Square greyscale canvas.
    alpha : float
        Largest displacement as a fraction of the side (0 = unchanged).
    scale : float
        Smoothness: the field's Gaussian std as a fraction of the side (small = wiggly).
    seed : int
        Seeds the field; the same seed gives the same warp.
    """
    if alpha <= 0:
        return image
    side = image.size[0]
    rng = np.random.default_rng([int(seed), 0xE1A5])  # own stream: the sensor noise keeps its draws
    sigma = max(scale * side, 1.0)
    fields = []
    for _ in range(2):
        field = gaussian_filter(rng.uniform(-1.0, 1.0, (side, side)), sigma, mode="reflect")
        peak = float(np.abs(field).max()) or 1.0
        fields.append(field * (alpha * side / peak))
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    pixels = np.asarray(image, dtype=np.float32)
    warped = map_coordinates(pixels, [rows + fields[0], cols + fields[1]], order=1, mode="constant", cval=0.0)
    return Image.fromarray(np.clip(warped, 0, 255).astype(np.uint8), mode="L")


def stroke(image: Image.Image, weight: float) -> Image.Image:
    """Thicken (``weight`` > 0) or thin (< 0) the strokes by ``|weight|`` x side pixels per side."""
    radius = int(round(abs(weight) * image.size[0]))
    if radius == 0:
        return image
    size = 2 * radius + 1
    return image.filter(ImageFilter.MaxFilter(size) if weight > 0 else ImageFilter.MinFilter(size))


def quantize(image: Image.Image, levels: int) -> Image.Image:
    """Reduce an "L" image to ``levels`` evenly spaced grey levels (>= 256 leaves it as is)."""
    if levels >= 256:
        return image
    step = 255.0 / (levels - 1)
    pixels = np.asarray(image, dtype=np.float32)
    return Image.fromarray((np.round(pixels / step) * step).astype(np.uint8), mode="L")
