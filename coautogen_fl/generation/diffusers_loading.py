"""Loading diffusers pipelines by hub id or local folder, offline.

Nothing is downloaded at run time: a local folder loads with ``local_files_only=True``, and a hub
id only from the local Hugging Face cache (see :mod:`coautogen_fl.hub`); anything else is one
:class:`GeneratorLoadError` line naming the model and the fix.
"""

from __future__ import annotations

import warnings
from typing import Any

from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.hub import check_device, first_line, resolve_model_source, torch_dtype_for


def load_pipeline(
    model: str,
    device: str = "cpu",
    safety_checker: bool = False,
    auto_class: str = "AutoPipelineForText2Image",
    config_key: str = "generator.name",
) -> Any:
    """Load a diffusers pipeline from a local folder or the local hub cache.

    Parameters
    ----------
    model : str
        A folder in diffusers' ``save_pretrained`` layout (holding ``model_index.json``) or a
        hub id (``"owner/name"``) already present in the local Hugging Face cache.
    device : str, default "cpu"
        torch device; ``"cuda..."`` loads float16 weights, anything else float32.
    safety_checker : bool, default False
        Keep the model's safety checker; False drops it where the pipeline has one.
    auto_class : str, default "AutoPipelineForText2Image"
        The diffusers class that loads it: an ``AutoPipeline...`` class, or ``"DiffusionPipeline"``
        for pipelines the auto classes do not map (e.g. super-resolution).
    config_key : str, default "generator.name"
        The config key naming the model, quoted in error messages.

    Returns
    -------
    diffusers.DiffusionPipeline
        The pipeline on ``device`` with its per-step progress bar disabled.

    Raises
    ------
    GeneratorLoadError
        The folder does not exist or is not a pipeline, the hub id is not cached locally
        (nothing is downloaded), CUDA is requested but unavailable, or loading fails.
    """
    check_device(device, GeneratorLoadError)
    source = resolve_model_source(model, "diffusers pipeline", "model_index.json", config_key, GeneratorLoadError)
    import diffusers
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # huggingface_hub deprecation noise about its own arguments
        warnings.simplefilter("ignore", UserWarning)
        config = DiffusionPipeline.load_config(source, local_files_only=True)
    kwargs: dict[str, Any] = {}
    if not safety_checker:
        if "safety_checker" in config:
            kwargs["safety_checker"] = None
        if "requires_safety_checker" in config:
            kwargs["requires_safety_checker"] = False
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype (and warn)
            warnings.simplefilter("ignore", FutureWarning)
            loader = getattr(diffusers, auto_class)
            pipe = loader.from_pretrained(source, local_files_only=True, torch_dtype=torch_dtype_for(device), **kwargs)
        pipe = pipe.to(device)
    except Exception as exc:
        raise GeneratorLoadError(f"could not load diffusers model '{model}' ({config_key}): {first_line(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text2image(model: str, device: str = "cpu", safety_checker: bool = False) -> Any:
    """A text-to-image pipeline (``AutoPipelineForText2Image``); see :func:`load_pipeline`."""
    return load_pipeline(model, device, safety_checker, "AutoPipelineForText2Image")
