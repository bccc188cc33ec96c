"""Raw-pixel features: the embedder that needs no weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import to_nchw

#: Scale of the appearance statistics (mean, std, share of pixels above 0.5, high-frequency
#: energy) at ``appearance=1``: between a faint, thin glyph and a bright, thick scan they differ by
#: about 0.2, 0.2, 0.25 and 0.04, which these scales turn into 0.4-0.5 each, about half the
#: distance between two unrelated shapes (unit vectors), so shape still leads the vote.
APPEARANCE_SCALE = (2.0, 2.0, 2.0, 4.0)


def appearance_statistics(batch: torch.Tensor) -> torch.Tensor:
    """(N, 4) per image: mean, std, share of values above 0.5, mean absolute difference from the
    3x3 local mean (sensor noise and sharp edges), over all channels of an NCHW batch in [0, 1]."""
    smooth = F.avg_pool2d(batch, 3, 1, 1, count_include_pad=False)
    return torch.stack(
        [
            batch.mean((1, 2, 3)),
            batch.flatten(1).std(1, unbiased=False),
            (batch > 0.5).float().mean((1, 2, 3)),
            (batch - smooth).abs().mean((1, 2, 3)),
        ],
        1,
    )


class PixelEmbedder:
    """Raw pixels, area-downsampled to ``size`` x ``size`` (default 14) and flattened.

    Downsampling first makes nearest-neighbour votes robust to one-pixel shifts. With
    ``standardize`` (default True) each vector is centred and scaled to unit norm, so that a
    vote goes to the candidate of the most similar *shape*: raw L2 favours faint, blurry blobs
    that sit near the mean image of every class. Standardised shapes do not see ink intensity,
    stroke weight or sensor noise; ``appearance`` > 0 appends four statistics of them (see
    :func:`appearance_statistics`, scaled by ``APPEARANCE_SCALE`` times ``appearance``), so the
    votes also prefer candidates that look like the private images (default 0: shape only).
    """

    name = "pixels"

    def __init__(self, size: int = 14, standardize: bool = True, appearance: float = 0.0) -> None:
        if not appearance >= 0:
            raise ValueError(f"embedder.appearance must be >= 0 (got {appearance!r}); 0 = shape only")
        self.size = size
        self.standardize = standardize
        self.appearance = float(appearance)

    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = to_nchw(images)
        features = F.adaptive_avg_pool2d(batch, self.size).flatten(1)
        if self.standardize:
            features = features - features.mean(1, keepdim=True)
            features = features / (features.norm(dim=1, keepdim=True) + 1e-8)
        if self.appearance > 0:
            scale = torch.tensor(APPEARANCE_SCALE) * self.appearance
            features = torch.cat([features, appearance_statistics(batch) * scale], 1)
        return features.numpy().astype(np.float32)
