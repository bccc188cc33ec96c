"""CLIP image features, and the CLIP class filter of He et al. (ICLR 2023).

``CLIPEmbedder`` maps images to L2-normalised CLIP image features: a public feature space in
which private samples vote for candidates. ``CLIPFilter`` is the zero-shot filter of He et al.,
"Is synthetic data from generative models ready for image recognition?": a synthetic candidate
is kept when CLIP, shown the prompts of every class, gives the candidate's own class a
probability above chance (1 / number of classes).

Nothing is downloaded at run time: the model is a local folder (``save_pretrained`` layout) or a
hub id already in the local Hugging Face cache (see :mod:`coautogen_fl.hub`). ``transformers``
and ``torch`` are imported inside the functions: importing them costs seconds.

Pixels reach the processor as float32 in [0, 1], channels last, with ``do_rescale=False``: the
processor resizes, centre-crops and normalises them with the model's own mean/std, but must not
divide by 255 again (its default assumes uint8 input).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import Candidate, check_int, stack_images
from coautogen_fl.hub import check_device, first_line, read_model_config, resolve_model_source, transformers_dtype

from .base import EmbedderError

#: ``model_type`` of a transformers CLIP config.
CLIP_MODEL_TYPE = "clip"


def _check_clip_config(source: str, model: str, config_key: str) -> None:
    """Refuse a folder whose ``config.json`` is not a CLIP model, before loading any weights."""
    model_type = read_model_config(source, model, config_key, EmbedderError).get("model_type")
    if model_type != CLIP_MODEL_TYPE:
        raise EmbedderError(
            f"'{model}' is a {model_type or 'untyped'} model, not a CLIP model (model_type '{CLIP_MODEL_TYPE}'); "
            f"set {config_key} to a CLIP model folder or hub id"
        )


def load_clip(model: str, device: str = "cpu", config_key: str = "embedder.model") -> tuple[Any, Any]:
    """Load a CLIP model and its processor from a local folder or the local hub cache.

    Parameters
    ----------
    model : str
        A folder holding a transformers ``CLIPModel`` and ``CLIPProcessor`` (``save_pretrained``
        layout) or a hub id (``"openai/clip-vit-base-patch32"``) already in the local cache.
    device : str, default "cpu"
        torch device; ``"cuda..."`` loads float16 weights, anything else float32.
    config_key : str, default "embedder.model"
        The config key naming the model, quoted in error messages.

    Returns
    -------
    tuple of (transformers.CLIPModel, transformers.CLIPProcessor)
        The model in eval mode on ``device``, and its processor.

    Raises
    ------
    EmbedderError
        One line: the folder does not exist or is not a CLIP model, the hub id is not cached
        locally (nothing is downloaded), CUDA is requested but unavailable, or loading fails.
    """
    check_device(device, EmbedderError)
    source = resolve_model_source(model, "CLIP model", "config.json", config_key, EmbedderError)
    _check_clip_config(source, model, config_key)
    from transformers import CLIPModel, CLIPProcessor

    try:
        with warnings.catch_warnings():  # huggingface_hub / transformers deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            clip = CLIPModel.from_pretrained(source, local_files_only=True, **transformers_dtype(device))
            processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except Exception as exc:
        raise EmbedderError(f"could not load CLIP model '{model}' ({config_key}): {first_line(exc)}") from exc
    return clip.eval().to(device), processor


def _loaded(model: str | tuple[Any, Any], device: str) -> tuple[Any, Any, str]:
    """(model, processor, name) from a name to load or an already loaded pair."""
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError(f"model must be a name or a (CLIPModel, CLIPProcessor) pair, got a {len(model)}-tuple")
        clip, processor = model
        return clip, processor, str(getattr(clip, "name_or_path", "") or type(clip).__name__)
    clip, processor = load_clip(model, device)
    return clip, processor, model


def _projected(output: Any):  # -> torch.Tensor
    """transformers 4 returns the projected features, transformers 5 an output whose
    ``pooler_output`` holds them."""
    return output if hasattr(output, "norm") else output.pooler_output


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, 1) or (N, H, W, 3) -> float32 (N, H, W, 3)."""
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 3), got {batch.shape}")
    if batch.shape[-1] == 1:  # grayscale: the same intensity in R, G and B
        batch = np.repeat(batch, 3, axis=-1)
    return batch


class CLIPEmbedder:
    """L2-normalised CLIP image features (``get_image_features``); an ``Embedder``.

    Parameters
    ----------
    model : str or tuple of (CLIPModel, CLIPProcessor)
        Hub id (in the local cache) or local folder, see :func:`load_clip`; or a pair already
        loaded (shared with a :class:`CLIPFilter`), used on its own device.
    device : str, default "cpu"
        torch device to load onto; float16 on CUDA, float32 elsewhere.
    batch_size : int, default 64
        Images per forward pass; features do not depend on it.
    progress : bool, default False
        Show a tqdm bar over batches.

    Notes
    -----
    Input images are float32 in [0, 1] of any size, (N, H, W) grayscale (copied into the three
    channels) or (N, H, W, 3) RGB. They go to the processor channels-last with
    ``do_rescale=False`` (already in [0, 1]); it resizes and crops them to the model's input.
    """

    name = "clip"

    def __init__(
        self, model: str | tuple[Any, Any], device: str = "cpu", batch_size: int = 64, progress: bool = False
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.model, self.processor, self.model_name = _loaded(model, device)
        self.device = self.model.device
        self.progress = bool(progress)

    @property
    def dim(self) -> int:
        """Feature dimension (the model's projection dimension)."""
        return int(self.model.config.projection_dim)

    def _pixel_values(self, chunk: np.ndarray):  # -> torch.Tensor
        inputs = self.processor(
            images=list(chunk), do_rescale=False, input_data_format="channels_last", return_tensors="pt"
        )
        return inputs["pixel_values"].to(self.device, dtype=self.model.dtype)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm image features.

        Parameters
        ----------
        images : np.ndarray
            float32 in [0, 1], shape (N, H, W) or (N, H, W, 3), any H and W.

        Returns
        -------
        np.ndarray
            float32 (N, D), each row of L2 norm 1.
        """
        import torch

        batch = _to_rgb(images)
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        starts: Any = range(0, len(batch), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="clip embed", unit="batch")
        features = []
        with torch.inference_mode():
            for start in starts:
                pixels = self._pixel_values(batch[start : start + self.batch_size])
                features.append(_projected(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        out = torch.cat(features)
        # normalise in float32 after the (possibly float16) forward pass
        return torch.nn.functional.normalize(out, dim=1).numpy().astype(np.float32)


class CLIPFilter:
    """Keep a candidate when CLIP's zero-shot probability of its own class exceeds chance.

    The CLIP filter of He et al. (ICLR 2023): every class name becomes a prompt, each image's
    cosine similarities to the prompts, times CLIP's logit scale, are soft-maxed over classes,
    and a candidate passes when the probability of its own label exceeds ``threshold``
    (1 / number of classes by default).

    Parameters
    ----------
    model : str or tuple of (CLIPModel, CLIPProcessor)
        Hub id (in the local cache) or local folder, see :func:`load_clip`; or a pair already
        loaded (e.g. shared with a :class:`CLIPEmbedder`), used on its own device.
    class_names : Sequence[str]
        Class names, at least two, non-blank; index = label.
    template : str, default "a photo of {name}"
        The prompt of class ``label`` is ``template.format(name=class_names[label])``.
    device : str, default "cpu"
        torch device to load onto; float16 on CUDA, float32 elsewhere.
    batch_size : int, default 64
        Images per forward pass.
    threshold : float or None, default None
        Probability the own class must exceed, in [0, 1); None = 1 / len(class_names).

    Attributes
    ----------
    text_features : np.ndarray
        float32 (C, D), the unit-norm features of the class prompts, computed once.
    logit_scale : float
        CLIP's learned temperature (already exponentiated) multiplying cosine similarities.
    """

    name = "clip_filter"

    def __init__(
        self,
        model: str | tuple[Any, Any],
        class_names: Sequence[str],
        template: str = "a photo of {name}",
        device: str = "cpu",
        batch_size: int = 64,
        threshold: float | None = None,
    ) -> None:
        names = tuple(str(c) for c in class_names)
        if len(names) < 2 or any(not c.strip() for c in names):
            raise ValueError(f"class_names must hold at least two non-blank names, got {list(class_names)!r}")
        try:
            prompts = [template.format(name=name) for name in names]
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"template must be a format string whose only field is {{name}}, got {template!r}"
            ) from exc
        if threshold is None:
            threshold = 1.0 / len(names)
        elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1) or None (= 1/#classes), got {threshold!r}")
        self.class_names = names
        self.template = template
        self.prompts = prompts
        self.threshold = float(threshold)
        self.embedder = CLIPEmbedder(model, device, batch_size)
        self.text_features = self._text_features(prompts)
        self.logit_scale = float(self.embedder.model.logit_scale.detach().float().exp().item())

    def _text_features(self, prompts: list[str]) -> np.ndarray:
        import torch

        model = self.embedder.model
        tokens = self.embedder.processor(
            text=prompts,
            padding=True,
            truncation=True,
            max_length=model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        with torch.inference_mode():
            output = model.get_text_features(
                input_ids=tokens["input_ids"].to(self.embedder.device),
                attention_mask=tokens["attention_mask"].to(self.embedder.device),
            )
        features = _projected(output).float().cpu()
        return torch.nn.functional.normalize(features, dim=1).numpy().astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Zero-shot class probabilities.

        Parameters
        ----------
        images : np.ndarray
            float32 in [0, 1], shape (N, H, W) or (N, H, W, 3).

        Returns
        -------
        np.ndarray
            float32 (N, C), each row a softmax over the class prompts (sums to 1).
        """
        features = self.embedder.embed(images).astype(np.float64)
        logits = self.logit_scale * features @ self.text_features.astype(np.float64).T
        logits -= logits.max(axis=1, keepdims=True)  # stable softmax
        weights = np.exp(logits)
        return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)

    def scores(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Probability of each candidate's own label, float32 (N,): ranks them when too few pass."""
        if len(candidates) == 0:
            return np.zeros(0, dtype=np.float32)
        labels = np.array([int(c.label) for c in candidates])
        bad = labels[(labels < 0) | (labels >= len(self.class_names))]
        if bad.size:
            raise ValueError(
                f"candidate label {int(bad[0])} is outside the {len(self.class_names)} classes of the filter"
            )
        probabilities = self.probabilities(stack_images(candidates))
        return probabilities[np.arange(len(labels)), labels]

    def keep(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Boolean mask (N,): True where the own-label probability exceeds ``threshold``."""
        return self.scores(candidates) > self.threshold

    def settings(self) -> dict[str, Any]:
        """What decides the filter's verdicts, for logs and run records."""
        return {"model": self.embedder.model_name, "template": self.template, "threshold": self.threshold}
