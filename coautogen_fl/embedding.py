"""Embedders: the public feature space in which private samples vote for candidates.

The server embeds candidates and each site embeds its private data with the same embedder
(built from the same run config), so distances are comparable across sites.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .config import EmbedderConfig

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for the ImageNet weights
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbedderError(RuntimeError):
    """An embedder cannot be built; the message names the missing piece and the fix."""


@runtime_checkable
class Embedder(Protocol):
    """Maps images (float32 in [0, 1], (N, H, W[, C])) to float32 features (N, D)."""

    name: str

    def embed(self, images: np.ndarray) -> np.ndarray:
        ...


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) float array -> (N, C, H, W) float32 tensor."""
    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if tensor.ndim == 3:
        return tensor.unsqueeze(1)
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {tuple(tensor.shape)}")


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


def resolve_resnet18_weights(weights: str) -> Path:
    """The ImageNet ResNet-18 weights file: ``weights`` if given, else torchvision's cache."""
    candidate = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILE
    if not candidate.is_file():
        raise EmbedderError(
            f"ResNet-18 weights not found at {candidate}. Nothing is downloaded at run time: copy "
            f"torchvision's {RESNET18_FILE} there (or set embedder.weights=/path/to/file.pth), or "
            "use embedder.name=pixels; embedder.random_weights=true only for tests"
        )
    return candidate


class ResNet18Embedder:
    """torchvision ResNet-18 penultimate features (512-d) on 64x64 inputs."""

    name = "resnet18"

    def __init__(self, weights: str = "", random_weights: bool = False, device: str = "cpu", batch_size: int = 256) -> None:
        from torchvision.models import resnet18

        model = resnet18(weights=None)
        if not random_weights:
            state = torch.load(resolve_resnet18_weights(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = to_nchw(images)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        features = []
        for chunk in batch.split(self.batch_size):
            chunk = F.interpolate(chunk, size=64, mode="bilinear", align_corners=False)
            features.append(self.model(((chunk - mean) / std).to(self.device)).cpu())
        return torch.cat(features).numpy().astype(np.float32)


def build_embedder(cfg: EmbedderConfig, device: str = "cpu") -> Embedder:
    """The embedder named by ``embedder.name`` (``-cue``)."""
    if cfg.name == "pixels":
        return PixelEmbedder(cfg.pixel_size, cfg.standardize)
    if cfg.name == "resnet18":
        return ResNet18Embedder(cfg.weights, cfg.random_weights, device, cfg.batch_size)
    raise EmbedderError(f"unknown embedder '{cfg.name}'; choose pixels or resnet18")
