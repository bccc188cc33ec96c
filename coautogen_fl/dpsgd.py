"""Per-example DP-SGD (opacus) for the downstream classifier: what a site runs in ``-tt real`` /
``-tt mix``, and what the pooled reference (simulations/dpsgd_baseline.py) runs centrally.

Each step samples a Poisson batch at a PUBLIC sample rate ``q`` (each private image joins
independently with probability ``q``), clips every example's gradient to ``max_grad_norm``,
sums, and adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` (opacus'
``DPOptimizer``). The optimiser steps on that noised SUM: dividing by the batch's expected size
``q * n`` would put the site's private size ``n`` into the weights that leave it (Adam is
invariant to the gradient's scale, so nothing is lost; for SGD, ``lr`` is per summed gradient).

The noise and the sampling both come from a ``torch.Generator`` seeded from ``os.urandom`` on
every call, never from a configured seed, and opacus' ``secure_mode`` noise (four draws per
value, the floating-point attack fix) is on; opacus' PrivacyEngine ``secure_mode`` would need
the torchcsprng package, which the optimizer-level flag does not.

Accounting: ``noise_for_epsilon`` calibrates with opacus' PRV accountant (numerical composition
of the privacy-loss distributions, an upper bound within its 0.01 epsilon error: tight for
subsampled Gaussians, where RDP gives ~8 % more epsilon at these settings, e.g. 0.97 for PRV's
0.90 at noise 14.8, rate 0.5, 50 steps); the site ledger composes with the same accountant.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .downstream import images_to_tensor

#: Optimisers a site may be asked to run (both wrapped by opacus' DPOptimizer).
DP_OPTIMIZERS = ("adam", "sgd")
#: opacus' accountant for calibration and for the ledger's composition (see the module docstring).
DP_ACCOUNTANT = "prv"


@dataclass(frozen=True)
class DPSGDSettings:
    """One site's local DP-SGD run.

    Parameters
    ----------
    noise_multiplier : float
        Noise std in units of ``max_grad_norm``, > 0.
    sample_rate : float
        Poisson sampling probability of each private example per step, 0 < q <= 1 (public).
    steps : int
        Optimiser steps, >= 1.
    max_grad_norm : float (default: 1.0)
        Per-example gradient clipping bound (L2), > 0.
    lr : float (default: 1e-2)
        Learning rate.
    optimizer : str (default: "adam")
        One of :data:`DP_OPTIMIZERS`.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float = 1.0
    lr: float = 1e-2
    optimizer: str = "adam"

    def validate(self) -> "DPSGDSettings":
        """Raise ValueError naming the first setting out of range; returns self."""
        checks = (
            (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0, "noise_multiplier", "> 0"),
            (0.0 < self.sample_rate <= 1.0, "sample_rate", "in (0, 1]"),
            (int(self.steps) == self.steps and self.steps >= 1, "steps", "an integer >= 1"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "> 0"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "> 0"),
            (self.optimizer in DP_OPTIMIZERS, "optimizer", f"one of {DP_OPTIMIZERS}"),
        )
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"DP-SGD {name} must be {rule} (got {getattr(self, name)!r})")
        return self


def entropy_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from 64 bits of the operating system's entropy."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier with which ``steps`` Poisson-sampled steps spend ``epsilon`` at ``delta``.

    Calibrated with opacus' PRV accountant (as the site ledger composes); the root is found by
    :func:`coautogen_fl.privacy.split.plan_noise`'s secant steps, a few PRV evaluations, where
    opacus' ``get_noise_multiplier`` bisection needs ~12 s at a 1e-3 tolerance.

    Parameters
    ----------
    epsilon, delta : float
        Target, epsilon > 0, 0 < delta < 1.
    sample_rate : float
        Poisson sampling probability, 0 < q <= 1.
    steps : int
        Number of steps, >= 1.
    """
    from .privacy.split import plan_noise

    return plan_noise(epsilon, delta, 0, 0.0, sample_rate, int(steps), 1).training


def check_private_model(model: nn.Module) -> None:
    """Raise ValueError if opacus cannot compute exact per-example gradients of ``model`` (e.g.
    BatchNorm, which mixes the examples of a batch): a site checks before it charges its ledger."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"the model cannot be trained with per-example DP-SGD: {errors[0]}")


def _optimizer(params, settings: DPSGDSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr)
    return torch.optim.Adam(params, lr=settings.lr)


def dp_train(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, settings: DPSGDSettings, *, device: str = "cpu"
) -> nn.Module:
    """Train ``model`` in place with per-example DP-SGD (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        A classifier without BatchNorm (opacus needs per-example independence), e.g. the "cnn".
    images, labels : np.ndarray
        The private examples: (N, H, W[, C]) in [0, 1], (N,) integers. N may be 0 (only noise).
    settings : DPSGDSettings
        Noise, public sample rate, steps, clipping, optimiser.
    device : str (default: "cpu")

    Returns
    -------
    torch.nn.Module
        The same model, trained, in eval mode.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    settings.validate()
    x = images_to_tensor(images) if len(images) else torch.zeros((0, 1, 1, 1))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    work = GradSampleModule(copy.deepcopy(model).to(device))  # hooks stay on the copy
    generator = entropy_generator()
    optimizer = DPOptimizer(
        _optimizer(work.parameters(), settings),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=1,
        loss_reduction="sum",
        generator=generator,
        secure_mode=True,
    )
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    work.train()
    with warnings.catch_warnings():
        # opacus' hooks warn that the input needs no gradient: true, and harmless (images are data).
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _ in range(int(settings.steps)):
            chosen = torch.rand(len(y), generator=generator) < settings.sample_rate
            xb, yb = x[chosen].to(device), y[chosen].to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(yb):
                loss_fn(work(xb), yb).backward()
            else:  # an empty Poisson batch still steps, on noise alone, so the step count stays public
                for p in work.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            optimizer.step()
    model.load_state_dict(work._module.state_dict())
    model.eval()
    return model


def clipped_gradient_sum(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    sample_rate: float,
    max_grad_norm: float,
    *,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """One central-mode DP-SGD step's share of a site: the sum, over one Poisson batch of its
    private examples (each joins with the public probability ``sample_rate``, drawn from OS
    entropy), of every example's gradient clipped to L2 norm ``max_grad_norm``. No noise: the site
    sends it only to a server its node config trusts, which adds the noise once to the sum of all
    sites (the pooled DP-SGD step; one example moves the sum by at most ``max_grad_norm``).

    Returns
    -------
    dict of str to np.ndarray
        float32 sums keyed by ``model.named_parameters()`` names; zeros for an empty batch.
    """
    from opacus import GradSampleModule

    names = [name for name, _ in model.named_parameters()]
    work = GradSampleModule(copy.deepcopy(model).to(device))
    params = list(work._module.parameters())
    chosen = torch.rand(len(labels), generator=entropy_generator()) < sample_rate
    sums = [torch.zeros_like(p) for p in params]
    if bool(chosen.any()):
        x = images_to_tensor(images)[chosen].to(device)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))[chosen].to(device)
        work.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            nn.CrossEntropyLoss(reduction="sum")(work(x), y).backward()
        per_example = [p.grad_sample.reshape(len(y), -1) for p in params]
        norms = torch.cat(per_example, dim=1).norm(dim=1)
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = [(scale.view(-1, *([1] * (p.grad_sample.dim() - 1))) * p.grad_sample).sum(0) for p in params]
    return {name: g.detach().cpu().numpy().astype(np.float32) for name, g in zip(names, sums)}


def public_steps(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int, lr: float, batch_size: int, seed: int
) -> nn.Module:
    """``steps`` plain Adam steps on public (synthetic) data: post-processing, no privacy cost.

    Parameters
    ----------
    model : torch.nn.Module
    images, labels : np.ndarray
        Public examples: (N, H, W[, C]) in [0, 1], (N,) integers.
    steps : int
        Optimiser steps; 0 returns the model unchanged.
    lr : float
    batch_size : int
    seed : int
        Seeds the batch draws (public data: reproducible on purpose).
    """
    if steps <= 0 or len(images) == 0:
        return model
    x, y = images_to_tensor(images), torch.as_tensor(np.asarray(labels, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(int(steps)):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=generator)
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    return model
