"""Captions of public reference images as prompts (the seed project's Img2Cap).

A :class:`Captioner` wraps any transformers image-to-text model (BLIP, BLIP-2, LLaVA, ...) given
as an alias of :data:`CAPTIONER_ALIASES`, a hub id in the local Hugging Face cache or a local
``save_pretrained`` folder; nothing is downloaded at run time. ``caption_folder`` turns an
ImageFolder of public reference images into class-bearing prompts per class, the
``descriptions`` of :class:`~coautogen_fl.prompts.base.TemplatePrompts` (or the extra
descriptions of an LLM source). Decoding is greedy: the same images give the same captions.

``transformers`` and ``torch`` are imported inside the methods: importing them costs seconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from coautogen_fl.config import CAPTIONER_ALIASES  # the seed's names -> hub ids, with the other config names
from coautogen_fl.data import IMAGE_SUFFIXES
from coautogen_fl.generation.base import check_int
from coautogen_fl.generation.imageops import to_rgb, to_uint8
from coautogen_fl.hub import check_device, first_line, resolve_model_source, transformers_dtype

from .llm import PromptError, clean_text, dedupe_key, model_kind

#: The config keys naming the captioner and the reference images, quoted in error messages.
CONFIG_KEY = "prompts.captioner"
REFERENCE_KEY = "prompts.reference"

#: What a chat-style captioner (LLaVA) is asked when no ``prompt`` is given.
DEFAULT_QUESTION = "Describe this image in one short sentence."

# BLIP's well-known filler words ("arafed", "araffe") carry no content.
_FILLER = re.compile(r"\b(?:arafed|araffe|arafe|araf)\b", re.I)


def clean_caption(text: str) -> str:
    """A caption's first sentence without filler words, quotes or extra whitespace."""
    return " ".join(_FILLER.sub(" ", clean_text(text)).split())


def to_pil(image: np.ndarray) -> Any:  # -> PIL.Image.Image
    """An (H, W) or (H, W, 1|3) float image in [0, 1] as an 8-bit RGB PIL image."""
    from PIL import Image

    return Image.fromarray(to_uint8(to_rgb(image)), mode="RGB")


class Captioner:
    """Greedy captions of images by a transformers image-to-text model.

    Parameters
    ----------
    model : str
        An alias of :data:`CAPTIONER_ALIASES`, a hub id in the local cache, or a local folder
        holding the model and its processor.
    device : str, default "cpu"
        torch device; float16 weights on CUDA, float32 elsewhere.
    max_new_tokens : int, default 30
        Tokens per caption.
    prompt : str, default ""
        Text to condition on: BLIP continues it ("a photography of"), a chat-style model
        (LLaVA) is asked it through its chat template. "" = plain captioning (chat-style models
        are asked :data:`DEFAULT_QUESTION`).
    batch_size : int, default 8
        Images per generation call.
    progress : bool, default False
        Show a tqdm bar over batches.
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_new_tokens: int = 30,
        prompt: str = "",
        batch_size: int = 8,
        progress: bool = False,
    ) -> None:
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.device = str(device)
        self.prompt = str(prompt)
        self.progress = bool(progress)
        self.model_name = CAPTIONER_ALIASES.get(model, model)
        self.processor, self.model = self._load(self.model_name)
        self.text = self._text_input()

    def _load(self, model: str) -> tuple[Any, Any]:
        check_device(self.device, PromptError)
        source = resolve_model_source(model, "image captioning model", "config.json", CONFIG_KEY, PromptError)
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto import modeling_auto

        kinds = {"image-text-to-text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
        model_kind(source, model, CONFIG_KEY, kinds, "an image captioning (image-text-to-text) model")
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            captioner = AutoModelForImageTextToText.from_pretrained(
                source, local_files_only=True, **transformers_dtype(self.device)
            )
            captioner = captioner.to(self.device).eval()
        except Exception as exc:
            raise PromptError(
                f"could not load image captioning model '{model}' ({CONFIG_KEY}): {first_line(exc)}"
            ) from exc
        return processor, captioner

    def _text_input(self) -> str | None:
        """The text given with every image: None for plain captioning; with a chat template
        (LLaVA-style models, whose text must hold the image token) the prompt as a user turn
        after the image; otherwise the prompt as it is (BLIP continues it, BLIP-2 answers it; a
        chat-style model without a template needs a prompt holding its image token)."""
        needs_text = getattr(self.processor, "image_token", None) is not None
        if getattr(self.processor, "chat_template", None) and (self.prompt or needs_text):
            content = [{"type": "image"}, {"type": "text", "text": self.prompt or DEFAULT_QUESTION}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        return self.prompt or None

    def _caption_batch(self, images: Sequence[Any]) -> list[str]:
        import torch

        texts = None if self.text is None else [self.text] * len(images)
        inputs = self.processor(
            images=list(images), text=texts, return_tensors="pt", **({"padding": True} if texts else {})
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # A copy: BLIP's generate writes its BOS token into input_ids in place.
        prompt_ids = inputs["input_ids"].clone() if "input_ids" in inputs else None
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        width = 0 if prompt_ids is None else prompt_ids.shape[1]
        if width and output.shape[1] >= width and torch.equal(output[:, :width].cpu(), prompt_ids.cpu()):
            output = output[:, width:]  # decoder-only models (LLaVA) echo their input; BLIP does not
        return [clean_caption(t) for t in self.processor.batch_decode(output, skip_special_tokens=True)]

    def _batch_starts(self, total: int) -> Any:
        starts = range(0, total, self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="captioning", unit="batch")
        return starts

    def _caption_all(self, images: Sequence[Any]) -> list[str]:
        starts = self._batch_starts(len(images))
        return [c for s in starts for c in self._caption_batch(images[s : s + self.batch_size])]

    def caption(self, images: np.ndarray) -> list[str]:
        """One cleaned caption per image ("" when the model writes nothing usable).

        Parameters
        ----------
        images : np.ndarray
            float images in [0, 1], shape (N, H, W) or (N, H, W, 1|3).
        """
        pixels = np.asarray(images)
        if pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[-1] not in (1, 3)):
            raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 1|3), got {pixels.shape}")
        if pixels.size and (not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0):
            raise ValueError("images must be finite floats in [0, 1]")
        return self._caption_all([to_pil(image) for image in pixels])

    def caption_folder(self, folder: str, class_names: Sequence[str], per_class: int = 20) -> dict[int, list[str]]:
        """Class-bearing captions ("{class name}, {caption}", deduped) of public reference images.

        Parameters
        ----------
        folder : str
            An ImageFolder root: ``folder/<class name>/*.png|jpg|...``, one sub-folder per class.
        class_names : Sequence[str]
            The run's class names; label ``i`` reads ``folder/class_names[i]``.
        per_class : int, default 20
            Most images captioned per class (the first ones in file-name order).

        Raises
        ------
        PromptError
            The folder does not exist, a class has no images, or an image cannot be read.
        """
        check_int("per_class", per_class, 1)
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise PromptError(
                f"reference image folder {root} does not exist; set {REFERENCE_KEY} to an ImageFolder "
                "of public images laid out as <root>/<class_name>/*.png"
            )
        names = [str(n) for n in class_names]
        files: list[tuple[int, Path]] = []
        for label, name in enumerate(names):
            class_dir = root / name
            found = (
                sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                if class_dir.is_dir()
                else []
            )
            if not found:
                raise PromptError(
                    f"{REFERENCE_KEY}: class '{name}' has no images in {class_dir} (expected "
                    f"{'/'.join(IMAGE_SUFFIXES)} files); add some or unset {REFERENCE_KEY}"
                )
            files += [(label, f) for f in found[:per_class]]
        captions: dict[int, list[str]] = {label: [] for label in range(len(names))}
        seen: set[tuple[int, str]] = set()
        for start in self._batch_starts(len(files)):  # read lazily: reference images may be large
            chunk = files[start : start + self.batch_size]
            for (label, _), text in zip(chunk, self._caption_batch([_read_rgb(path) for _, path in chunk])):
                prompt = f"{names[label]}, {text}" if text else ""
                if prompt and (label, dedupe_key(prompt)) not in seen:
                    seen.add((label, dedupe_key(prompt)))
                    captions[label].append(prompt)
        return captions

    def settings(self) -> dict[str, Any]:
        return {
            "source": "captioner",
            "model": self.model_name,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
        }


def _read_rgb(path: Path) -> Any:  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PromptError(
            f"cannot read reference image {path} ({first_line(exc)}); replace it or fix {REFERENCE_KEY}"
        ) from None
