"""Inpainting variations, and the helpers every image-conditioned diffusers call shares.

An inpainting child repaints one random rectangle of its parent and keeps the rest. The rule
for the rectangle, drawn from the generator's rng:

- its area is ``mask_fraction(degree) = 0.1 + 0.4 * degree`` of the image (10 % at degree 0,
  50 % at degree 1), so larger degrees repaint more;
- its aspect ratio is log-uniform: width ``a ** u`` and height ``a ** (1 - u)`` (fractions of
  the image side, ``a`` the area fraction, ``u ~ U[0, 1]``), so both lie in [a, 1];
- its top-left corner is uniform over the positions that keep it inside the image.

It is stored in the genotype as ``"mask": [x0, y0, x1, y1]``, fractions of the image side. The
pipeline repaints it at the child's strength; then the pixels outside the rectangle are copied
back from the parent (a short linear ramp just inside the rectangle's border hides the seam).
That paste-back is deliberate: the VAE round trip alone would blur the whole image, and a
4-channel model used for inpainting (``from_pipe`` of a text-to-image checkpoint) only blends
latents, so without it the "unchanged" part would drift too.

``diffusers`` and ``torch`` are imported inside the functions.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.generation.diffusers_loading import load_pipeline
from coautogen_fl.generation.imageops import resize, to_output, to_rgb
from coautogen_fl.hub import first_line

#: Mask area at degree 0, and its growth per unit of degree (0.1 + 0.4 * degree of the image).
MIN_MASK_FRACTION = 0.1
MASK_FRACTION_SLOPE = 0.4


def denoise_steps(steps: int, strength: float) -> int:
    """Inference steps so an image-conditioned call denoises at least once (diffusers runs
    ``int(steps * strength)`` of them; zero would fail)."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


def native_size(pipe: Any) -> int:
    """The side length a diffusers pipeline generates at by default (512 when unknown)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        sample = getattr(getattr(module, "config", None), "sample_size", None)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        if isinstance(sample, int) and sample > 0:
            default = getattr(pipe, "default_sample_size", None)
            return int((default if name == "transformer" and default else sample) * scale)
    return 512


def rgb_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Images of any size and channel count -> (N, size, size, 3) float32 in [0, 1]."""
    rgb = [to_rgb(image) for image in images]  # raises for shapes other than (H, W) / (H, W, 3)
    return np.stack([image if image.shape[:2] == (size, size) else resize(image, size) for image in rgb])


def seeded_generators(seeds: Sequence[int]) -> list:
    """One CPU ``torch.Generator`` per image (CPU noise is the same on every device)."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


# -- the mask ------------------------------------------------------------------------------


def mask_fraction(degree: float) -> float:
    """Fraction of the image area an inpainting child repaints: ``0.1 + 0.4 * degree``."""
    return MIN_MASK_FRACTION + MASK_FRACTION_SLOPE * float(degree)


def random_mask(rng: np.random.Generator, degree: float) -> list[float]:
    """A random rectangle ``[x0, y0, x1, y1]`` (fractions of the side) covering
    ``mask_fraction(degree)`` of the image; see the module docstring for the rule."""
    area = mask_fraction(degree)
    u = float(rng.random())
    width, height = area**u, area ** (1.0 - u)
    x0 = float(rng.random()) * (1.0 - width)
    y0 = float(rng.random()) * (1.0 - height)
    return [x0, y0, min(1.0, x0 + width), min(1.0, y0 + height)]


def _span(low: float, high: float, size: int) -> tuple[int, int]:
    """Pixel rows/columns [start, stop) a fractional interval covers (at least one)."""
    start = min(size - 1, max(0, int(math.floor(low * size))))
    return start, max(start + 1, min(size, int(math.ceil(high * size))))


def check_mask(mask: Any) -> list[float]:
    """Validate a genotype's ``[x0, y0, x1, y1]`` (0 <= x0 < x1 <= 1, same for y)."""
    valid = isinstance(mask, (list, tuple)) and len(mask) == 4
    box = [float(v) for v in mask] if valid else []
    if not valid or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
        raise ValueError(
            f"inpaint genotype 'mask' must be [x0, y0, x1, y1] fractions with 0 <= x0 < x1 <= 1 "
            f"and 0 <= y0 < y1 <= 1, got {mask!r}"
        )
    return box


def mask_image(mask: Sequence[float], size: int, feather: int = 1) -> np.ndarray:
    """The rectangle as a (size, size) float32 weight map: 0 outside, 1 inside, ramping up over
    ``feather`` pixels inside the border (``feather=1`` gives a hard mask)."""
    weights = []
    for low, high in ((mask[1], mask[3]), (mask[0], mask[2])):  # rows (y), then columns (x)
        start, stop = _span(low, high, size)
        index = np.arange(size)
        edge = np.minimum(index - start + 1, stop - index)  # 1 on the border pixels, <= 0 outside
        weights.append(np.clip(edge / max(1, feather), 0.0, 1.0))
    return np.outer(weights[0], weights[1]).astype(np.float32)


def paste_back(parent: np.ndarray, child: np.ndarray, mask: Sequence[float], channels: int) -> np.ndarray:
    """``child`` inside the rectangle, ``parent`` (converted to the child's size and channels)
    outside, with a linear ramp of ~3 % of the side just inside the border."""
    size = child.shape[0]
    weight = mask_image(mask, size, feather=max(1, round(size / 32)))
    if child.ndim == 3:
        weight = weight[..., None]
    base = to_output(parent, size, channels)
    return np.clip(base * (1.0 - weight) + child * weight, 0.0, 1.0).astype(np.float32)


# -- the pipeline --------------------------------------------------------------------------


def inpaint_pipeline(
    pipe: Any, model: str, inpaint_model: str = "", device: str = "cpu", safety_checker: bool = False
) -> Any:
    """The inpainting pipeline of a generator.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        The generator's text-to-image pipeline.
    model : str
        Its model id or folder, for messages.
    inpaint_model : str, default ""
        "" reuses ``pipe``'s weights (``AutoPipelineForInpainting.from_pipe``, no second load);
        otherwise a dedicated inpainting pipeline (hub id in the local cache or a folder),
        loaded with :func:`load_pipeline` under the config key ``generator.inpaint_model``.
    device : str, default "cpu"
        torch device of a dedicated pipeline.
    safety_checker : bool, default False
        Keep a dedicated pipeline's safety checker.

    Raises
    ------
    GeneratorLoadError
        The dedicated pipeline cannot be loaded, or diffusers has no inpainting pipeline for
        ``pipe``.
    """
    if inpaint_model:
        return load_pipeline(
            inpaint_model, device, safety_checker, "AutoPipelineForInpainting", "generator.inpaint_model"
        )
    from diffusers import AutoPipelineForInpainting

    try:
        inpainter = AutoPipelineForInpainting.from_pipe(pipe)
    except Exception as exc:
        raise GeneratorLoadError(
            f"model '{model}' has no inpainting pipeline in diffusers ({first_line(exc)}); set generator.inpaint_model "
            "to an inpainting model or generator.inpaint=0"
        ) from exc
    inpainter.set_progress_bar_config(disable=True)
    return inpainter


def run_inpaint(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    parents: Sequence[np.ndarray],
    masks: Sequence[Sequence[float]],
    strength: float,
    steps: int,
    guidance: float,
) -> np.ndarray:
    """One inpainting pipeline call at the pipeline's native size, without paste-back.

    Returns
    -------
    np.ndarray
        (N, size, size, 3) float32 in [0, 1], ``size = native_size(pipe)``.
    """
    size = native_size(pipe)
    out = pipe(
        prompt=list(prompts),
        image=rgb_batch(parents, size),
        mask_image=np.stack([mask_image(m, size) for m in masks])[..., None],
        strength=float(strength),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        generator=seeded_generators(seeds),
        height=size,
        width=size,
        output_type="np",
    )
    return np.asarray(out.images, dtype=np.float32)


__all__ = [
    "MIN_MASK_FRACTION",
    "MASK_FRACTION_SLOPE",
    "mask_fraction",
    "random_mask",
    "check_mask",
    "mask_image",
    "paste_back",
    "inpaint_pipeline",
    "run_inpaint",
    "denoise_steps",
    "native_size",
    "rgb_batch",
    "seeded_generators",
]
