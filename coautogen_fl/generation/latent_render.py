"""Running a latent generator's G: forward passes of exactly ``batch_size`` rows (zero-padded, so
a candidate's pixels depend only on its own z, label and place in the batch), the start-up probe
and output-shape check, and the conversion of G's output to float images in [0, 1] at the run's
size and channels. :class:`LatentRenderer` is the part of
:class:`~coautogen_fl.generation.latent.LatentGenerator` that does this.

``torch`` is imported inside the methods; importing it costs a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.hub import first_line


class LatentRenderer:
    """Runs G on latents and turns its output into images; a mixin of ``LatentGenerator``, which
    sets the attributes below (see its parameters)."""

    module: Any
    latent_dim: int
    conditional: bool
    output_range: tuple[float, float]
    image_size: int
    channels: int
    device: str
    batch_size: int
    source: str
    progress: bool

    def _probe(self) -> None:
        """One forward pass on zeros: a wrong latent size, label handling or output shape fails
        here, at start-up, with the config key to fix."""
        z = np.zeros((2, self.latent_dim), dtype=np.float32)
        labels = np.zeros(2, dtype=np.int64)
        try:
            out = self._forward(z, labels)
        except Exception as exc:
            shape = f"z of shape (2, {self.latent_dim})" + (" and int64 labels" if self.conditional else "")
            raise GeneratorLoadError(
                f"generator '{self.source or type(self.module).__name__}' failed on {shape}: "
                f"{first_line(exc, with_type=True)}; "
                "check generator.latent_dim, and that G's forward takes class labels as its second argument "
                "exactly when it is class-conditional"
            ) from exc
        self._check_output(out, 2)

    def _check_output(self, out: Any, n: int) -> None:
        import torch

        ok = (
            isinstance(out, torch.Tensor)
            and ((out.ndim == 4 and out.shape[1] in (1, 3)) or out.ndim == 3)
            and out.shape[0] == n
        )
        if not ok:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GeneratorLoadError(
                f"generator '{self.source or type(self.module).__name__}' returned {shape} for {n} latents; a latent "
                "generator must return images (N, C, H, W) with C 1 or 3"
            )

    def _forward(self, z: np.ndarray, labels: np.ndarray) -> Any:
        """G on float32 z (N, D) and int64 labels (N,); the raw output tensor."""
        import torch

        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            if self.conditional:
                yt = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(self.device)
                return self.module(zt, yt)
            return self.module(zt)

    def _to_images(self, out: Any) -> np.ndarray:
        """G's output (N, C, H, W) in ``output_range`` -> float32 (N, S, S) or (N, S, S, 3) in [0, 1]."""
        import torch.nn.functional as F

        x = out.detach().float()
        if x.ndim == 3:
            x = x[:, None]
        low, high = self.output_range
        x = ((x - low) / (high - low)).clamp_(0.0, 1.0)
        if x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        size = self.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(
                0.0, 1.0
            )
        array = x.cpu().numpy().astype(np.float32, copy=False)
        array = array[:, 0] if self.channels == 1 else np.moveaxis(array, 1, -1)
        return np.ascontiguousarray(array)

    def _render_batch(self, z: np.ndarray, labels: np.ndarray, batch: int) -> np.ndarray:
        """Images of up to ``batch`` latents, run as one forward pass of exactly ``batch`` rows
        (zero-padded): on a given machine the pixels then depend only on each row's z, label,
        position and the batch shape, which the genotype records."""
        n = z.shape[0]
        zp = np.zeros((batch, self.latent_dim), dtype=np.float32)
        yp = np.zeros(batch, dtype=np.int64)
        zp[:n], yp[:n] = z, labels
        out = self._forward(zp, yp)
        self._check_output(out, batch)
        return self._to_images(out)[:n]

    def _render(self, z: np.ndarray, labels: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Images of all rows of z in forward passes of ``batch_size``; also (batch, slot) per row."""
        starts = range(0, z.shape[0], self.batch_size)
        if self.progress and z.shape[0]:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="latent generator", unit="batch")
        images: list[np.ndarray] = []
        places: list[tuple[int, int]] = []
        for start in starts:
            stop = min(start + self.batch_size, z.shape[0])
            images.extend(self._render_batch(z[start:stop], labels[start:stop], self.batch_size))
            places.extend((self.batch_size, i) for i in range(stop - start))
        return images, places
