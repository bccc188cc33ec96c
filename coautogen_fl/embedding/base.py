"""What every embedder is: images in, float32 feature rows out, in one public feature space."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from coautogen_fl.hub import ModelLoadError


class EmbedderError(ModelLoadError):
    """An embedder cannot be built; the message names the missing piece and the fix."""


@runtime_checkable
class Embedder(Protocol):
    """Maps images (float32 in [0, 1], (N, H, W[, C])) to float32 features (N, D)."""

    name: str

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) float array -> (N, C, H, W) float32 tensor."""
    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if tensor.ndim == 3:
        return tensor.unsqueeze(1)
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {tuple(tensor.shape)}")
