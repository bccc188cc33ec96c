"""Tiny random-weight latent generators G(z, y) and G(z) for the latent generator tests.

Built in code with fixed seeds (no download), small enough to run hundreds of forward passes in
well under a second. The ``build_*`` factories are what ``generator.factory`` names in the tests
("tests.tiny_latent_models:build_conditional"): they take no arguments. Not a test module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from coautogen_fl.generation.latent import LatentGenerator

#: Latent size and class count of ``ConditionalG`` built by ``build_conditional``.
LATENT_DIM = 8
NUM_CLASSES = 3
#: Latent size of ``UnconditionalG`` built by ``build_unconditional`` (stored as ``nz``).
NZ = 6


class ConditionalG(nn.Module):
    """G(z, y): a label embedding joined to z, a linear layer to 32x4x4, two transposed
    convolutions up to ``channels`` x 16 x 16, tanh (outputs in [-1, 1]). Scriptable."""

    def __init__(self, latent_dim: int = LATENT_DIM, num_classes: int = NUM_CLASSES, channels: int = 1) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.gain = 8.0  # random weights give faint images; this spreads them over [-1, 1]
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(2 * latent_dim, 32 * 4 * 4)
        self.up = nn.Sequential(
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, 2, 1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.ConvTranspose2d(16, channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(-1, 32, 4, 4)
        return torch.tanh(self.gain * self.up(h))


class UnconditionalG(nn.Module):
    """G(z) with its latent size as ``nz`` (DCGAN's name): linear -> 3 x 8 x 8, tanh."""

    def __init__(self, nz: int = NZ, channels: int = 3, size: int = 8) -> None:
        super().__init__()
        self.nz = nz
        self.channels = channels
        self.size = size
        self.net = nn.Sequential(nn.Linear(nz, 64), nn.ReLU(), nn.Linear(64, channels * size * size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(-1, self.channels, self.size, self.size)


class SigmoidG(nn.Module):
    """G(z) with outputs in [0, 1] (sigmoid) and no latent-size attribute (needs latent_dim)."""

    def __init__(self, latent_dim: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 16 * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(z)).view(-1, 1, 16, 16)


def _seeded(build, seed: int) -> nn.Module:
    """Build with fixed initial weights without touching the caller's global torch RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def build_conditional() -> nn.Module:
    """The conditional grayscale G(z, y): latent_dim 8, 3 classes, 1 x 16 x 16."""
    return _seeded(ConditionalG, 0)


def build_conditional_rgb() -> nn.Module:
    """The conditional G(z, y) with 3 output channels."""
    return _seeded(lambda: ConditionalG(channels=3), 1)


def build_unconditional() -> nn.Module:
    """The unconditional G(z): nz 6, 3 x 8 x 8."""
    return _seeded(UnconditionalG, 2)


def build_sigmoid() -> nn.Module:
    """G(z) in [0, 1] without a latent-size attribute (latent_dim 4)."""
    return _seeded(SigmoidG, 3)


def build_broken() -> nn.Module:
    """A factory that fails."""
    raise RuntimeError("this factory always fails")


def build_not_a_module() -> int:
    """A factory that returns something other than a module."""
    return 3


#: Not callable: a factory string naming it must fail.
NOT_CALLABLE = 3


NAMES = ["zero", "one", "two"]


def make(module: nn.Module | None = None, **kwargs) -> LatentGenerator:
    """A generator around the conditional G (16 x 16 grayscale) unless told otherwise."""
    settings = {"image_size": 16, "seed": 0, "source": "tiny"}
    settings.update(kwargs)
    return LatentGenerator(build_conditional() if module is None else module, NAMES, **settings)


def reference_output(module: nn.Module, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """G's raw output for ``z`` (and labels), computed directly: what the generator must reproduce."""
    with torch.no_grad():
        args = (torch.from_numpy(z),) if labels is None else (torch.from_numpy(z), torch.from_numpy(labels))
        return module(*args).numpy()
