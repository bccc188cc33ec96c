"""Device choice: ``-dev`` (cpu | cuda | auto) and ``-did`` (the CUDA device index)."""

from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The requested device does not exist here; the message names -dev / -did and the fix."""


def resolve_device(device: str = "cpu", device_id: int = 0) -> str:
    """A torch device string; "auto" takes CUDA when present. Asking for CUDA without it is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device=cuda (-dev cuda) was requested but no CUDA GPU is visible; use -dev cpu or -dev auto"
            )
        if not 0 <= device_id < torch.cuda.device_count():
            raise DeviceError(
                f"device_id={device_id} (-did) but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "pick one below that"
            )
        return f"cuda:{device_id}"
    return "cpu"
