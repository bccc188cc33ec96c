"""Where a pretrained model comes from: a local folder or the local Hugging Face cache, never the
network. Every loader (diffusers pipelines, CLIP, LLMs, captioners) resolves its model here so
that a missing model is always the same one-line error naming the model and the fix.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

#: A Hugging Face hub id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ModelLoadError(RuntimeError):
    """A model could not be loaded (missing locally, unusable device, bad folder)."""


def is_path_like(model: str) -> bool:
    """True when ``model`` names a filesystem path rather than a hub id."""
    if model.startswith((".", "~")) or os.path.isabs(model):
        return True
    if os.altsep and os.altsep in model:
        return True
    return _HUB_ID.match(model) is None


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message (ANSI colours dropped, at most 300
    characters), for one-line errors; the exception's type name when the message is empty.
    ``with_type`` prefixes the type name ("OSError: ...")."""
    text = _ANSI.sub("", str(exc)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= 300 else line[:297] + "..."
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line


def joined_lines(exc: BaseException) -> str:
    """An exception's whole message on one line (ANSI colours dropped, whitespace collapsed, at
    most 300 characters): for messages whose detail is spread over lines (e.g. torch's state-dict
    size mismatches)."""
    detail = " ".join(_ANSI.sub("", str(exc)).split())
    return detail if len(detail) <= 300 else detail[:297] + "..."


def check_device(device: str, error: type[ModelLoadError] = ModelLoadError) -> None:
    """Raise ``error`` (a :class:`ModelLoadError`) for a CUDA device on a machine without CUDA."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise error(
            f"device '{device}' requested but CUDA is not available (torch {torch.__version__}); "
            "use device=cpu (-dev cpu) or install a CUDA build of torch"
        )


def resolve_model_source(
    model: str, what: str, marker: str, config_key: str, error: type[ModelLoadError] = ModelLoadError
) -> str:
    """The local path to load ``model`` from, without touching the network.

    Parameters
    ----------
    model : str
        A local folder (``save_pretrained`` layout) or a hub id already in the local cache.
    what : str
        What the model is, for messages ("diffusers pipeline", "CLIP model", ...).
    marker : str
        A file every such folder holds ("model_index.json" for diffusers, "config.json" for
        transformers).
    config_key : str
        The config key that names the model, for the fix in the message.
    error : type, default ModelLoadError
        The exception class raised (a subclass, so callers can catch their own kind).

    Returns
    -------
    str
        A local folder holding ``marker``.

    Raises
    ------
    ModelLoadError
        The folder does not exist or lacks ``marker``, or the hub id is not in the local cache.
    """
    if not isinstance(model, str) or not model.strip():
        raise error(f"{config_key} must be a hub id or a local folder, got {model!r}")
    local = Path(model).expanduser()
    if local.exists():
        if not (local / marker).is_file():
            raise error(
                f"model folder {local} holds no {marker}: not a {what} "
                f"(save one with .save_pretrained(folder)), or fix {config_key}"
            )
        return str(local)
    if is_path_like(model):
        raise error(
            f"model folder {local} does not exist; pass an existing {what} folder "
            f"({config_key}=/path/to/model) or a hub id"
        )
    try:
        from huggingface_hub import snapshot_download

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            folder = snapshot_download(model, local_files_only=True)
    except Exception as exc:  # huggingface_hub raises several types for "not in the cache"
        raise error(
            f"{what} '{model}' not found locally and nothing is downloaded at run time: download "
            f"it once with `huggingface-cli download {model}` on a machine with network, or pass "
            f"a local folder ({config_key}=/path/to/model) [{type(exc).__name__}]"
        ) from exc
    if not (Path(folder) / marker).is_file():
        raise error(f"cached '{model}' holds no {marker}: it is not a {what}; fix {config_key}")
    return folder


def torch_dtype_for(device: str):  # -> torch.dtype
    """float16 on CUDA (half the memory, the usual choice for diffusion), float32 elsewhere."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32


def read_model_config(
    source: str, model: str, config_key: str, error: type[ModelLoadError] = ModelLoadError
) -> dict[str, Any]:
    """The ``config.json`` of a resolved transformers model folder, read before any weights load
    (to refuse the wrong kind of model in one line)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"cannot read the config.json of '{model}' ({first_line(exc)}); fix {config_key}") from exc
    if not isinstance(config, dict):
        raise error(f"the config.json of '{model}' is not a JSON object; fix {config_key}")
    return config


def transformers_dtype(device: str) -> dict[str, Any]:
    """``from_pretrained`` keyword for :func:`torch_dtype_for`: transformers >= 4.56 takes
    ``dtype=``, older versions only ``torch_dtype=``."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype_for(device)}
