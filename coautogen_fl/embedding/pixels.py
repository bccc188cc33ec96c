"""Raw-pixel features: the embedder that needs no weights."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from .base import to_nchw


class PixelEmbedder:
    """Raw pixels, area-downsampled to ``size`` x ``size`` (default 14) and flattened.

    Downsampling first makes nearest-neighbour votes robust to one-pixel shifts. With
    ``standardize`` (default True) each vector is centred and scaled to unit norm, so that a
    vote goes to the candidate of the most similar *shape*: raw L2 favours faint, blurry blobs
    that sit near the mean image of every class.
    """

    name = "pixels"

    def __init__(self, size: int = 14, standardize: bool = True) -> None:
        self.size = size
        self.standardize = standardize

    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = to_nchw(images)
        features = F.adaptive_avg_pool2d(batch, self.size).flatten(1)
        if self.standardize:
            features = features - features.mean(1, keepdim=True)
            features = features / (features.norm(dim=1, keepdim=True) + 1e-8)
        return features.numpy().astype(np.float32)
