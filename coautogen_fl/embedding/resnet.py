"""ImageNet ResNet-18 features (torchvision), from a local weights file only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import EmbedderError, to_nchw

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for the ImageNet weights
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_resnet18_weights(
    weights: str,
    key: str = "embedder.weights",
    instead: str = "use embedder.name=pixels; embedder.random_weights=true only for tests",
) -> Path:
    """The ImageNet ResNet-18 weights file: ``weights`` if given, else torchvision's cache.
    ``key`` names the setting and ``instead`` the way out, in the error."""
    candidate = Path(weights).expanduser() if weights else Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILE
    if not candidate.is_file():
        raise EmbedderError(
            f"ResNet-18 weights not found at {candidate}. Nothing is downloaded at run time: copy "
            f"torchvision's {RESNET18_FILE} there (or set {key}=/path/to/file.pth), or {instead}"
        )
    return candidate


class ResNet18Embedder:
    """torchvision ResNet-18 penultimate features (512-d) on 64x64 inputs."""

    name = "resnet18"

    def __init__(
        self, weights: str = "", random_weights: bool = False, device: str = "cpu", batch_size: int = 256
    ) -> None:
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
