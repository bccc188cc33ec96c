"""Upscaling as a post-processing stage: any generator's candidates to ``size`` x ``size``.

Two routes, chosen by the loaded pipeline's class:

- super-resolution (``StableDiffusionUpscalePipeline``, the x4 upscaler;
  ``StableDiffusionLatentUpscalePipeline``, the x2 latent upscaler): the candidate is resized
  (bicubic) to ``size / factor``, the input that gives ``size`` back, and upscaled with its
  prompt;
- image-to-image (the "SD upscale" approach): the candidate is resized (bicubic) to ``size``
  and refined by image-to-image at ``strength``. A text-to-image pipeline is turned into its
  image-to-image sibling with ``AutoPipelineForImage2Image.from_pipe`` (same weights).

Either way the output is resized to exactly ``size`` x ``size`` and keeps the input's channel
count. Every candidate's parameters (model, steps, strength, guidance, seed, size) go into its
genotype under ``"upscale"``, so :meth:`Upscaler.reapply` re-creates the pixels from the
un-upscaled image.

``diffusers`` and ``torch`` are imported inside the functions.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import SEED_HIGH, Candidate, GeneratorLoadError, check_int
from coautogen_fl.generation.diffusers_loading import load_pipeline
from coautogen_fl.generation.imageops import to_output
from coautogen_fl.generation.inpaint import denoise_steps, rgb_batch, seeded_generators

#: Super-resolution pipeline classes (and subclasses) called with the low-res image and the
#: prompt. Output / input side: the x4 upscaler's VAE scale factor; 2 for the latent upscaler.
SUPER_RESOLUTION = ("StableDiffusionUpscalePipeline", "StableDiffusionLatentUpscalePipeline")

#: The config key naming the upscaler, quoted in errors.
CONFIG_KEY = "postprocess.upscaler"


def _is_super_resolution(pipe: Any) -> bool:
    from diffusers import StableDiffusionLatentUpscalePipeline, StableDiffusionUpscalePipeline

    return isinstance(pipe, (StableDiffusionUpscalePipeline, StableDiffusionLatentUpscalePipeline))


def _takes_image_and_strength(pipe: Any) -> bool:
    """True for a plain image-to-image pipeline: ``image`` and ``strength``, no required mask."""
    params = inspect.signature(pipe.__call__).parameters
    return "image" in params and "strength" in params and "mask_image" not in params


class Upscaler:
    """A post-processing stage that upscales candidates with a diffusers pipeline.

    Parameters
    ----------
    model : str
        Hub id (already in the local cache) or local pipeline folder: a super-resolution,
        image-to-image or text-to-image pipeline.
    size : int
        Output side length (>= 8).
    device : str, default "cpu"
        torch device; float16 on CUDA, float32 elsewhere.
    steps : int, default 20
        Denoising steps (the image-to-image route raises them if ``steps * strength < 1``).
    strength : float, default 0.3
        How much the image-to-image route may change the resized image, in [0, 1] (0 = the
        bicubic resize alone); recorded but unused by super-resolution pipelines.
    guidance_scale : float, default 0.0
        Classifier-free guidance scale (<= 1 disables guidance: one pass per step).
    batch_size : int, default 4
        Images per pipeline call.
    seed : int, default 0
        Seeds the numpy Generator the per-image seeds are drawn from.
    progress : bool, default False
        Show a tqdm bar over batches.

    Attributes
    ----------
    pipe : diffusers.DiffusionPipeline
        The pipeline that runs (the image-to-image sibling of a text-to-image model).
    route : {"super-resolution", "img2img"}
        Which of the two routes ``pipe`` takes.
    """

    name = "upscale"

    def __init__(
        self,
        model: str,
        size: int,
        device: str = "cpu",
        steps: int = 20,
        strength: float = 0.3,
        guidance_scale: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.size = check_int("size", size, 8)
        self.steps = check_int("steps", steps, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1] (postprocess.upscale_strength), got {strength!r}")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, numbers.Real)
            or not np.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.model = model
        self.device = device
        self.strength = float(strength)
        self.guidance_scale = float(guidance_scale)
        self.progress = bool(progress)
        self.pipe, self.route = self._load(model, device)
        self._rng = np.random.default_rng(self.seed)

    @staticmethod
    def _load(model: str, device: str) -> tuple[Any, str]:
        """The pipeline and its route; a pipeline that can do neither is a GeneratorLoadError."""
        pipe = load_pipeline(model, device, auto_class="DiffusionPipeline", config_key=CONFIG_KEY)
        kind = type(pipe).__name__
        if _is_super_resolution(pipe):
            return pipe, "super-resolution"
        if _takes_image_and_strength(pipe):
            return pipe, "img2img"
        from diffusers import AutoPipelineForImage2Image

        try:  # a text-to-image model: its image-to-image sibling shares the weights
            i2i = AutoPipelineForImage2Image.from_pipe(pipe)
        except Exception:
            i2i = None
        if i2i is None or not _takes_image_and_strength(i2i):
            raise GeneratorLoadError(
                f"{CONFIG_KEY}='{model}' is a {kind}: "
                f"neither a super-resolution pipeline ({', '.join(SUPER_RESOLUTION)}) "
                f"nor one diffusers can run image-to-image; set {CONFIG_KEY} to an upscaler or a Stable Diffusion model"
            )
        i2i.set_progress_bar_config(disable=True)
        return i2i, "img2img"

    # -- stage protocol ----------------------------------------------------------------------

    def apply(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """New candidates (same ids, labels, parents, rounds, votes) with upscaled images; each
        genotype gets ``"upscale": {"model", "steps", "strength", "guidance", "seed", "size"}``."""
        params = [self._params(int(self._rng.integers(SEED_HIGH))) for _ in candidates]
        starts = range(0, len(candidates), self.batch_size)
        if self.progress and len(candidates):
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"upscale ({self.route})", unit="batch")
        images: list[np.ndarray] = []
        for start in starts:
            chunk = candidates[start : start + self.batch_size]
            images.extend(
                self.upscale(
                    [c.image for c in chunk],
                    [_prompt(c.genotype) for c in chunk],
                    params[start : start + self.batch_size],
                )
            )
        return [
            Candidate(c.candidate_id, c.label, image, {**c.genotype, self.name: p}, c.parent_id, c.round, c.votes)
            for c, image, p in zip(candidates, images, params)
        ]

    def reapply(self, image: np.ndarray, genotype: dict[str, Any]) -> np.ndarray:
        """Re-create the upscaled image from the un-upscaled ``image`` and the full genotype
        (bit for bit when it was upscaled in a batch of one, else up to float rounding)."""
        params = genotype.get(self.name)
        if not isinstance(params, dict) or any(k not in params for k in ("model", "steps", "strength", "seed", "size")):
            raise ValueError(f"genotype lacks '{self.name}' parameters: it was not made through an Upscaler stage")
        if params["model"] != self.model:
            raise ValueError(f"genotype was upscaled by '{params['model']}', this stage runs '{self.model}'")
        return self.upscale([image], [_prompt(genotype)], [params])[0]

    # -- upscaling ---------------------------------------------------------------------------

    def upscale(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], params: Sequence[dict[str, Any]]
    ) -> list[np.ndarray]:
        """One pipeline call: ``images`` (any size, (H, W) or (H, W, 3)) upscaled with their
        prompts and parameters (steps, strength and guidance of the first are used for all).

        Returns
        -------
        list[np.ndarray]
            float32 in [0, 1], (size, size) or (size, size, 3) like each input, ``size`` from
            the parameters.
        """
        if not images:
            return []
        first = params[0]
        size = int(first["size"])
        common = {
            "prompt": [str(p) for p in prompts],
            "num_inference_steps": int(first["steps"]),
            "output_type": "np",
            "guidance_scale": float(first.get("guidance", self.guidance_scale)),
            "generator": seeded_generators([p["seed"] for p in params]),
        }
        strength = float(first["strength"])
        if self.route == "super-resolution":
            upscaled = self.pipe(image=rgb_batch(images, self._low_res_side(size)), **common).images
        elif strength > 0:
            common["num_inference_steps"] = denoise_steps(int(first["steps"]), strength)
            upscaled = self.pipe(image=rgb_batch(images, size), strength=strength, **common).images
        else:  # strength 0: nothing to refine, the bicubic resize is the result
            upscaled = rgb_batch(images, size)
        return [
            to_output(np.asarray(up, dtype=np.float32), size, 1 if np.ndim(src) == 2 else 3)
            for up, src in zip(upscaled, images)
        ]

    def _low_res_side(self, size: int) -> int:
        """The input side a super-resolution pipeline turns into (about) ``size``: ``size /
        factor``, rounded to a multiple of the VAE's scale factor (diffusers' image processor
        crops other sides)."""
        from diffusers import StableDiffusionLatentUpscalePipeline

        multiple = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        factor = 2 if isinstance(self.pipe, StableDiffusionLatentUpscalePipeline) else multiple
        return max(multiple, int(round(size / factor / multiple)) * multiple)

    def _params(self, seed: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "steps": self.steps,
            "strength": self.strength,
            "guidance": self.guidance_scale,
            "seed": seed,
            "size": self.size,
        }


def _prompt(genotype: Any) -> str:
    """A candidate's prompt ("" when its generator records none, e.g. procedural glyphs)."""
    return str(genotype.get("prompt") or "") if isinstance(genotype, dict) else ""


__all__ = ["Upscaler", "SUPER_RESOLUTION", "CONFIG_KEY"]
