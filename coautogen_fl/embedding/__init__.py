"""Embedders: the public feature space in which private samples vote for candidates.

The server embeds candidates and each site embeds its private data with the same embedder
(built from the same run config), so distances are comparable across sites.
"""

from __future__ import annotations

from coautogen_fl.config import EmbedderConfig
from coautogen_fl.registry import RegistryError, call_plugin, resolve

from .base import Embedder, EmbedderError, to_nchw
from .pixels import PixelEmbedder
from .resnet import RESNET18_FILE, ResNet18Embedder, resolve_resnet18_weights


def build_embedder(cfg: EmbedderConfig, device: str = "cpu") -> Embedder:
    """The embedder named by ``embedder.name`` (``-cue``): pixels, resnet18, clip, or a plug-in
    (an entry point in the ``coautogen_fl.embedders`` group or ``"pkg.module:Class"``, called with
    ``from_config(cfg, {"device": device})``, ``Class(device=device)`` or ``fn(cfg, {"device": device})``)."""
    try:
        resolved = resolve("embedder", cfg.name)
    except RegistryError as exc:
        raise EmbedderError(str(exc)) from None
    if resolved.value == "pixels":
        return PixelEmbedder(cfg.pixel_size, cfg.standardize, cfg.appearance)
    if resolved.value == "resnet18":
        return ResNet18Embedder(cfg.weights, cfg.random_weights, device, cfg.batch_size)
    if resolved.value == "clip":
        from .clip import CLIPEmbedder

        return CLIPEmbedder(cfg.model, device=device, batch_size=cfg.batch_size)
    embedder = call_plugin(resolved.value, cfg, {"device": device})  # type: ignore[arg-type]
    if not callable(getattr(embedder, "embed", None)):
        raise EmbedderError(
            f"embedder.name={cfg.name!r} built {type(embedder).__name__}, which has no embed(images) method"
        )
    return embedder


__all__ = [
    "Embedder",
    "EmbedderError",
    "PixelEmbedder",
    "ResNet18Embedder",
    "RESNET18_FILE",
    "build_embedder",
    "resolve_resnet18_weights",
    "to_nchw",
]
