"""Diffusers generator: text-to-image for fresh samples, image-to-image (or re-seeded
text-to-image) for variations, from any diffusers pipeline given as a hub id or a local folder.

Nothing is downloaded at run time: a hub id must already sit in the local Hugging Face cache
(``huggingface-cli download ID`` once, on a machine with network), otherwise loading fails with a
``GeneratorLoadError`` that names the model and the fix. Every candidate's genotype (prompt, seed,
steps, guidance, mode, model, and for image-to-image the strength) re-creates its pixels exactly
with ``DiffusersGenerator.regenerate``.

``diffusers`` (and ``torch``) are imported inside the functions: importing them costs seconds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import Candidate, GeneratorLoadError, check_int
from coautogen_fl.generation.diffusers_loading import load_text2image
from coautogen_fl.generation.imageops import resize as _resize
from coautogen_fl.generation.imageops import to_output as _to_output
from coautogen_fl.generation.schedule import check_degree

#: Task modes of ``vary``: "I2I" = image-to-image from the parent's pixels, "T2I" = the parent's
#: prompt with a new seed.
TASK_MODES = ("I2I", "T2I")

#: Lowest image-to-image strength ``vary`` uses (degree 0 would leave the parent unchanged).
MIN_STRENGTH = 0.05

#: Keys of every genotype this generator writes (i2i genotypes add "strength").
GENOTYPE_KEYS = ("prompt", "seed", "steps", "guidance", "mode", "model")


#: Per-image seeds are drawn from [0, _SEED_HIGH).
_SEED_HIGH = 2**31 - 1


def _i2i_steps(steps: int, strength: float) -> int:
    """Inference steps so image-to-image denoises at least once (diffusers runs
    ``int(steps * strength)`` of them; zero would fail)."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


class DiffusersGenerator:
    """Any diffusers text-to-image model; implements the ``Generator`` protocol.

    Parameters
    ----------
    model : str
        Hub id (already in the local cache) or local pipeline folder; see ``load_text2image``.
    class_names : Sequence[str]
        Class names, put into ``prompt_template`` as ``{name}``; non-blank.
    image_size : int, default 64
        Output side length; images are generated at the model's own size and resized.
    channels : int, default 3
        1 gives grayscale (H, W) images, 3 gives (H, W, 3).
    device : str, default "cpu"
        torch device; float16 on CUDA, float32 elsewhere.
    seed : int, default 0
        Seeds the numpy Generator the per-image seeds are drawn from: same seed, same candidates.
    task_mode : {"I2I", "T2I"}, default "I2I"
        How ``vary`` works: image-to-image from the parent's pixels, or the parent's prompt
        with a new seed.
    prompt_template : str, default "a photo of {name}"
        Prompt of class ``label`` is ``prompt_template.format(name=class_names[label])``.
    num_inference_steps : int, default 25
        Denoising steps (image-to-image raises them if ``steps * strength < 1``).
    guidance_scale : float, default 7.5
        Classifier-free guidance scale.
    batch_size : int, default 8
        Images per pipeline call.
    safety_checker : bool, default False
        Keep the model's safety checker.
    progress : bool, default False
        Show a tqdm bar over batches.

    Attributes
    ----------
    pipe : diffusers.DiffusionPipeline
        The text-to-image pipeline.
    i2i : diffusers.DiffusionPipeline
        The image-to-image pipeline sharing ``pipe``'s weights (``from_pipe``), made on first use.
    """

    def __init__(
        self,
        model: str,
        class_names: Sequence[str],
        image_size: int = 64,
        channels: int = 3,
        device: str = "cpu",
        seed: int = 0,
        task_mode: str = "I2I",
        prompt_template: str = "a photo of {name}",
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        batch_size: int = 8,
        safety_checker: bool = False,
        progress: bool = False,
    ) -> None:
        names = tuple(str(c) for c in class_names)
        if not names or any(not c.strip() for c in names):
            raise ValueError(f"class_names must be a non-empty sequence of non-blank names, got {list(class_names)!r}")
        check_int("image_size", image_size, 8)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if task_mode not in TASK_MODES:
            raise ValueError(f"task_mode must be one of {TASK_MODES}, got {task_mode!r}")
        try:
            prompt_template.format(name=names[0])
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"prompt_template must be a format string whose only field is {{name}}, got {prompt_template!r}"
            ) from exc
        check_int("num_inference_steps", num_inference_steps, 1)
        check_int("batch_size", batch_size, 1)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.model = model
        self.class_names = names
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.device = device
        self.seed = seed
        self.task_mode = task_mode
        self.prompt_template = prompt_template
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.batch_size = int(batch_size)
        self.progress = bool(progress)
        self.pipe = load_text2image(model, device, safety_checker)
        self._i2i = None
        self._rng = np.random.default_rng(seed)
        self._counter = 0

    # -- pipelines -------------------------------------------------------------------------

    @property
    def i2i(self) -> Any:
        """The image-to-image pipeline, built from the text-to-image one (no second load)."""
        if self._i2i is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._i2i = AutoPipelineForImage2Image.from_pipe(self.pipe)
            except Exception as exc:
                raise GeneratorLoadError(
                    f"model '{self.model}' has no image-to-image pipeline in diffusers ({exc}); "
                    "use task_mode='T2I'"
                ) from exc
            self._i2i.set_progress_bar_config(disable=True)
        return self._i2i

    def native_size(self) -> int:
        """The side length the model generates at (images are resized to ``image_size``)."""
        pipe = self.pipe
        scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        for name in ("unet", "transformer"):
            module = getattr(pipe, name, None)
            sample = getattr(getattr(module, "config", None), "sample_size", None)
            if isinstance(sample, (list, tuple)):
                sample = sample[0]
            if isinstance(sample, int) and sample > 0:
                default = getattr(pipe, "default_sample_size", None)
                return int((default if name == "transformer" and default else sample) * scale)
        return 512

    def _t2i(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float) -> np.ndarray:
        """One text-to-image pipeline call; returns (N, H, W, 3) float32 in [0, 1]."""
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=list(prompts),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            generator=generators,
            output_type="np",
        )
        return np.asarray(out.images, dtype=np.float32)

    def _img2img(self, prompts: Sequence[str], seeds: Sequence[int], images: Sequence[np.ndarray],
                 strength: float, steps: int, guidance: float) -> np.ndarray:  # fmt: skip
        """One image-to-image pipeline call from parent images of any size/channels."""
        import torch

        size = self.native_size()
        batch = []
        for image in images:
            image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"parent image must have shape (H, W) or (H, W, 3), got {image.shape}")
            batch.append(_resize(image, size) if image.shape[:2] != (size, size) else image)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        out = self.i2i(
            prompt=list(prompts),
            image=np.stack(batch),
            strength=strength,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            generator=generators,
            output_type="np",
        )
        return np.asarray(out.images, dtype=np.float32)

    # -- protocol --------------------------------------------------------------------------

    def prompt(self, label: int) -> str:
        """The prompt of class ``label``."""
        label = check_int("label", label, 0, len(self.class_names) - 1)
        return self.prompt_template.format(name=self.class_names[label])

    def random(self, label: int, n: int) -> list[Candidate]:
        """Draw ``n`` fresh text-to-image candidates of class ``label``.

        Parameters
        ----------
        label : int
            Class index in ``[0, len(class_names) - 1]``.
        n : int
            Number of candidates (0 gives an empty list).

        Returns
        -------
        list[Candidate]
            Candidates with ``parent_id=None``, ``round=0`` and t2i genotypes, each with its own seed.
        """
        prompt = self.prompt(label)
        n = check_int("n", n, 0)
        genotypes = [self._genotype(prompt, "t2i") for _ in range(n)]
        images = self._run(genotypes, None)
        return [self._make(int(label), g, img, None, 0) for g, img in zip(genotypes, images)]

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One child per parent.

        ``task_mode="I2I"``: image-to-image from the parent's pixels with the parent's prompt,
        ``strength = max(degree, MIN_STRENGTH)`` and a new seed. ``task_mode="T2I"``: the
        parent's prompt, text-to-image with a new seed (``degree`` is validated, not used).

        Parameters
        ----------
        candidates : Sequence[Candidate]
            Parents; a parent without a "prompt" in its genotype uses its class prompt.
        degree : float
            Variation strength, in [0, 1].

        Returns
        -------
        list[Candidate]
            Children in parent order, with the parent's label, ``parent_id`` set and
            ``round = parent.round + 1``.
        """
        degree = check_degree(degree)
        prompts = []
        for parent in candidates:
            check_int(f"label of candidate {parent.candidate_id}", parent.label, 0, len(self.class_names) - 1)
            prompt = parent.genotype.get("prompt") if isinstance(parent.genotype, dict) else None
            prompts.append(str(prompt) if prompt else self.prompt(parent.label))
        if self.task_mode == "T2I":
            genotypes = [self._genotype(p, "t2i") for p in prompts]
            images = self._run(genotypes, None)
        else:
            strength = max(degree, MIN_STRENGTH)
            genotypes = [self._genotype(p, "i2i", strength) for p in prompts]
            images = self._run(genotypes, [c.image for c in candidates])
        return [
            self._make(int(parent.label), g, img, parent.candidate_id, parent.round + 1)
            for parent, g, img in zip(candidates, genotypes, images)
        ]

    def regenerate(self, genotype: dict[str, Any], parent_image: np.ndarray | None = None) -> np.ndarray:
        """Re-create a candidate's pixels from its genotype.

        A candidate generated in a batch of one (``batch_size=1``) comes back bit for bit; one
        generated in a larger batch comes back up to float rounding (~1e-6: CPU/GPU kernels
        accumulate in a batch-size-dependent order).

        Parameters
        ----------
        genotype : dict
            A genotype written by this class (keys ``GENOTYPE_KEYS``, plus "strength" for i2i).
        parent_image : np.ndarray or None
            The parent's image; required for an i2i genotype.

        Returns
        -------
        np.ndarray
            float32 in [0, 1], (image_size, image_size) or (image_size, image_size, 3).
        """
        missing = [k for k in GENOTYPE_KEYS if k not in genotype]
        if missing or genotype.get("mode") not in ("t2i", "i2i"):
            raise ValueError(f"genotype lacks {missing or ['a valid mode']}: not a diffusers genotype (keys {list(GENOTYPE_KEYS)})")
        if genotype["model"] != self.model:
            raise ValueError(f"genotype was made by model '{genotype['model']}', this generator runs '{self.model}'")
        if genotype["mode"] == "i2i":
            if parent_image is None:
                raise ValueError("an i2i genotype needs parent_image (the pixels it was varied from)")
            if "strength" not in genotype:
                raise ValueError("i2i genotype lacks 'strength'")
            image = self._img2img([genotype["prompt"]], [genotype["seed"]], [parent_image],
                                  float(genotype["strength"]), genotype["steps"], genotype["guidance"])[0]  # fmt: skip
        else:
            image = self._t2i([genotype["prompt"]], [genotype["seed"]], genotype["steps"], genotype["guidance"])[0]
        return _to_output(image, self.image_size, self.channels)

    # -- helpers ---------------------------------------------------------------------------

    def _genotype(self, prompt: str, mode: str, strength: float | None = None) -> dict[str, Any]:
        """A new genotype with a seed drawn from the generator's rng."""
        steps = self.num_inference_steps if strength is None else _i2i_steps(self.num_inference_steps, strength)
        genotype: dict[str, Any] = {
            "prompt": prompt,
            "seed": int(self._rng.integers(_SEED_HIGH)),
            "steps": steps,
            "guidance": self.guidance_scale,
            "mode": mode,
            "model": self.model,
        }
        if strength is not None:
            genotype["strength"] = float(strength)
        return genotype

    def _run(self, genotypes: list[dict[str, Any]], parents: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        """Generate images for genotypes in batches of ``batch_size`` (i2i when ``parents``)."""
        starts = range(0, len(genotypes), self.batch_size)
        if self.progress and len(genotypes):
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"diffusers {'i2i' if parents is not None else 't2i'}", unit="batch")
        images: list[np.ndarray] = []
        for start in starts:
            chunk = genotypes[start:start + self.batch_size]
            prompts = [g["prompt"] for g in chunk]
            seeds = [g["seed"] for g in chunk]
            if parents is None:
                raw = self._t2i(prompts, seeds, chunk[0]["steps"], chunk[0]["guidance"])
            else:
                raw = self._img2img(prompts, seeds, parents[start:start + self.batch_size],
                                    chunk[0]["strength"], chunk[0]["steps"], chunk[0]["guidance"])  # fmt: skip
            images.extend(_to_output(img, self.image_size, self.channels) for img in raw)
        return images

    def _make(self, label: int, genotype: dict[str, Any], image: np.ndarray, parent_id: str | None,
              round_index: int) -> Candidate:  # fmt: skip
        """Wrap an image into a candidate with the next id from the counter."""
        candidate_id = f"diffusers-{self._counter:07d}"
        self._counter += 1
        return Candidate(candidate_id, label, image, genotype, parent_id, round_index)


__all__ = ["DiffusersGenerator", "GeneratorLoadError", "load_text2image", "GENOTYPE_KEYS", "TASK_MODES", "MIN_STRENGTH"]
