"""Loading a diffusers text-to-image pipeline by hub id or local folder, offline.

Nothing is downloaded at run time: a local folder loads with ``local_files_only=True``, and a hub
id only from the local Hugging Face cache; anything else is one :class:`GeneratorLoadError` line
naming the model and the fix.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any


#: A Hugging Face hub id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class GeneratorLoadError(RuntimeError):
    """A generator's model could not be loaded (missing locally, unusable device, bad folder)."""


def _is_path_like(model: str) -> bool:
    """True when ``model`` names a filesystem path rather than a hub id."""
    if model.startswith((".", "~")) or os.path.isabs(model):
        return True
    if os.altsep and os.altsep in model:
        return True
    return _HUB_ID.match(model) is None


def _check_device(device: str) -> None:
    """Raise ``GeneratorLoadError`` for a CUDA device on a machine without CUDA."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise GeneratorLoadError(
            f"device '{device}' requested but CUDA is not available (torch {torch.__version__}); "
            "use device=cpu or install a CUDA build of torch"
        )


def load_text2image(model: str, device: str = "cpu", safety_checker: bool = False) -> Any:
    """Load a diffusers text-to-image pipeline from a local folder or the local hub cache.

    Parameters
    ----------
    model : str
        A folder in diffusers' ``save_pretrained`` layout (holding ``model_index.json``) or a
        hub id (``"owner/name"``) already present in the local Hugging Face cache.
    device : str, default "cpu"
        torch device; ``"cuda..."`` loads float16 weights, anything else float32.
    safety_checker : bool, default False
        Keep the model's safety checker; False drops it where the pipeline has one.

    Returns
    -------
    diffusers.DiffusionPipeline
        The text-to-image pipeline (``AutoPipelineForText2Image``), on ``device``, with its
        per-step progress bar disabled.

    Raises
    ------
    GeneratorLoadError
        The folder does not exist or is not a pipeline, the hub id is not cached locally
        (nothing is downloaded), CUDA is requested but unavailable, or loading fails.
    """
    if not isinstance(model, str) or not model.strip():
        raise GeneratorLoadError(f"model must be a hub id or a local folder, got {model!r}")
    _check_device(device)
    import torch
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise GeneratorLoadError(
                f"model folder {local} holds no model_index.json: not a diffusers pipeline "
                "(save one with pipeline.save_pretrained(folder))"
            )
        source = str(local)
    elif _is_path_like(model):
        raise GeneratorLoadError(
            f"model folder {local} does not exist; pass an existing diffusers pipeline folder "
            "(generator.name=/path/to/model) or a hub id"
        )
    else:
        source = model
    try:
        with warnings.catch_warnings():  # huggingface_hub deprecation noise about its own arguments
            warnings.simplefilter("ignore", UserWarning)
            config = DiffusionPipeline.load_config(source, local_files_only=True)
    except Exception as exc:  # huggingface_hub raises several types for "not in the cache"
        raise GeneratorLoadError(
            f"model '{model}' not found locally and nothing is downloaded at run time: download "
            f"it once with `huggingface-cli download {model}` on a machine with network, or pass "
            f"a local folder (generator.name=/path/to/model) [{type(exc).__name__}]"
        ) from exc
    kwargs: dict[str, Any] = {}
    if not safety_checker:
        if "safety_checker" in config:
            kwargs["safety_checker"] = None
        if "requires_safety_checker" in config:
            kwargs["requires_safety_checker"] = False
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype (and warn)
            warnings.simplefilter("ignore", FutureWarning)
            pipe = AutoPipelineForText2Image.from_pretrained(source, local_files_only=True, torch_dtype=dtype, **kwargs)
        pipe = pipe.to(device)
    except Exception as exc:
        raise GeneratorLoadError(f"could not load diffusers model '{model}': {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
