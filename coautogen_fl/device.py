"""Device choice: ``-dev`` (cpu | cuda | auto) and ``-did`` (the CUDA device index)."""

from __future__ import annotations

import torch


def resolve_device(device: str = "cpu", device_id: int = 0) -> str:
    """A torch device string; "auto" takes CUDA when present. Asking for CUDA without it is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but no CUDA GPU is visible; use device=cpu or device=auto")
        if not 0 <= device_id < torch.cuda.device_count():
            raise RuntimeError(f"device_id={device_id} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return f"cuda:{device_id}"
    return "cpu"
