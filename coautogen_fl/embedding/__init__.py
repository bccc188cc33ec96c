"""Embedders: the public feature space in which private samples vote for candidates.

The server embeds candidates and each site embeds its private data with the same embedder
(built from the same run config), so distances are comparable across sites.
"""

from __future__ import annotations

from coautogen_fl.config import EmbedderConfig

from .base import Embedder, EmbedderError, to_nchw
from .pixels import PixelEmbedder
from .resnet import RESNET18_FILE, ResNet18Embedder, resolve_resnet18_weights


def build_embedder(cfg: EmbedderConfig, device: str = "cpu") -> Embedder:
    """The embedder named by ``embedder.name`` (``-cue``)."""
    if cfg.name == "pixels":
        return PixelEmbedder(cfg.pixel_size, cfg.standardize)
    if cfg.name == "resnet18":
        return ResNet18Embedder(cfg.weights, cfg.random_weights, device, cfg.batch_size)
    raise EmbedderError(f"unknown embedder '{cfg.name}'; choose pixels or resnet18")


__all__ = ["Embedder", "EmbedderError", "PixelEmbedder", "ResNet18Embedder", "RESNET18_FILE", "build_embedder",
           "resolve_resnet18_weights", "to_nchw"]
