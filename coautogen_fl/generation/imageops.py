"""Image conversions every generator shares: float [0, 1] arrays, resizing, channel counts."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: ITU-R BT.601 luma weights: RGB -> grayscale.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float image to ``size`` x ``size`` channel by channel
    (bicubic, clipped to [0, 1])."""
    image = np.asarray(image, dtype=np.float32)
    planes = image[..., None] if image.ndim == 2 else image
    out = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[..., c]), mode="F").resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        for c in range(planes.shape[-1])
    ]
    resized = np.clip(np.stack(out, axis=-1), 0.0, 1.0).astype(np.float32)
    return resized[..., 0] if image.ndim == 2 else resized


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3) float image -> (H, W, 3) float32 in [0, 1]."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
    return image


def to_output(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Any (H, W[, C]) float image -> float32 (image_size, image_size) when ``channels`` is 1
    (luma) or (image_size, image_size, 3) when 3, in [0, 1]."""
    rgb = to_rgb(image)
    if rgb.shape[0] != image_size or rgb.shape[1] != image_size:
        rgb = resize(rgb, image_size)
    if channels == 1:
        return np.clip(rgb @ LUMA, 0.0, 1.0).astype(np.float32)
    return rgb


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] image -> uint8 [0, 255] (rounded), e.g. for PNG files or PIL."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
