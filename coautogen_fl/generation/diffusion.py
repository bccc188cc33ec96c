"""Diffusers generator: text-to-image for fresh samples; image-to-image, inpainting or prompt
evolution with a new seed for variations; from any diffusers pipeline (hub id or local folder).

Nothing is downloaded at run time: a hub id must already sit in the local Hugging Face cache
(``huggingface-cli download ID`` once, on a machine with network), otherwise loading fails with a
``GeneratorLoadError`` that names the model and the fix. Every candidate's genotype (prompt, seed,
steps, guidance, mode, model; "strength" for image-to-image, also "mask" and "inpaint_model" for
inpainting) re-creates its pixels exactly with ``DiffusersGenerator.regenerate``. Prompts come
from a ``PromptSource`` (class-name templates by default, an LLM, captions); every genotype
records its ``settings()`` under "prompt_source".

``diffusers`` (and ``torch``) are imported inside the functions: importing them costs seconds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import (
    MIN_STRENGTH,
    SEED_HIGH,
    TASK_MODES,
    Candidate,
    CandidateMaker,
    GeneratorLoadError,
    check_int,
    check_output_spec,
)
from coautogen_fl.generation.diffusers_loading import load_text2image
from coautogen_fl.generation.imageops import to_output as _to_output
from coautogen_fl.generation.inpaint import check_mask as _check_mask
from coautogen_fl.generation.inpaint import (
    denoise_steps,
    inpaint_pipeline,
    native_size,
    paste_back,
    random_mask,
    rgb_batch,
    run_inpaint,
    seeded_generators,
)
from coautogen_fl.generation.schedule import check_degree
from coautogen_fl.hub import first_line
from coautogen_fl.prompts.base import PromptSource, TemplatePrompts

#: Genotype modes: fresh or T2I child, image-to-image child, inpainting child.
GENOTYPE_MODES = ("t2i", "i2i", "inpaint")


#: Keys of every genotype this generator writes (i2i adds "strength"; inpaint adds "strength",
#: "mask" and "inpaint_model"; all add "prompt_source"; T2I children add "parent_prompt").
GENOTYPE_KEYS = ("prompt", "seed", "steps", "guidance", "mode", "model")


#: Tokenizers without a limit report a huge sentinel ``model_max_length``; above this it means "none".
_NO_LIMIT = 10**6


class DiffusersGenerator(CandidateMaker):
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
        Seeds the numpy Generator the per-image seeds (and masks, prompt draws) come from:
        same seed, same candidates.
    task_mode : {"I2I", "T2I"}, default "I2I"
        How ``vary`` works: image-to-image (or inpainting) from the parent's pixels, or the
        parent's prompt evolved by ``prompts`` with a new seed.
    prompt_template : str, default "a photo of {name}"
        Template prompt of class ``label``: ``prompt_template.format(name=class_names[label])``.
    num_inference_steps : int, default 25
        Denoising steps (image-to-image raises them if ``steps * strength < 1``).
    guidance_scale : float, default 7.5
        Classifier-free guidance scale.
    batch_size : int, default 8
        Images per pipeline call.
    safety_checker : bool, default False
        Keep the model's safety checker.
    prompts : PromptSource or None, default None
        Where prompts come from: ``sample(label, rng)`` for fresh candidates, ``evolve`` for
        T2I children. None uses ``TemplatePrompts(class_names, prompt_template)``. The
        attribute may be replaced later (e.g. by an LLM source that calls ``count_tokens``).
    inpaint : float, default 0.0
        Probability, in [0, 1], that an I2I child is an inpainting variation (a random
        rectangle of ``0.1 + 0.4 * degree`` of the area repainted, the rest kept; see
        :mod:`coautogen_fl.generation.inpaint`) instead of plain image-to-image.
    inpaint_model : str, default ""
        "" inpaints with the same weights (``AutoPipelineForInpainting.from_pipe``); otherwise a
        dedicated inpainting pipeline (hub id in the local cache or folder), loaded at once.
    progress : bool, default False
        Show a tqdm bar over batches.

    Attributes
    ----------
    pipe : diffusers.DiffusionPipeline
        The text-to-image pipeline.
    i2i, inpainter : diffusers.DiffusionPipeline
        The image-to-image and inpainting pipelines, made on first use (``from_pipe``: they
        share ``pipe``'s weights) unless ``inpaint_model`` names a dedicated one.
    """

    ID_PREFIX = "diffusers"

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
        prompts: PromptSource | None = None,
        inpaint: float = 0.0,
        inpaint_model: str = "",
        progress: bool = False,
    ) -> None:
        names = check_output_spec(class_names, image_size, channels, task_mode)
        try:
            prompt_template.format(name=names[0])
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"prompt_template must be a format string whose only field is {{name}}, got {prompt_template!r}"
            ) from exc
        check_int("num_inference_steps", num_inference_steps, 1)
        check_int("batch_size", batch_size, 1)
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not np.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(inpaint, bool) or not isinstance(inpaint, (int, float)) or not 0.0 <= inpaint <= 1.0:
            raise ValueError(f"inpaint must be a probability in [0, 1] (generator.inpaint), got {inpaint!r}")
        if prompts is not None and not isinstance(prompts, PromptSource):
            raise ValueError(
                f"prompts must have sample(label, rng), evolve(prompts, labels, rng) and settings(), got {prompts!r}"
            )
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
        self.safety_checker = bool(safety_checker)
        self.prompts: PromptSource = prompts if prompts is not None else TemplatePrompts(names, prompt_template)
        self.inpaint = float(inpaint)
        self.inpaint_model = str(inpaint_model or "")
        self.progress = bool(progress)
        self.pipe = load_text2image(model, device, safety_checker)
        self._i2i = None
        self._inpainter = None
        if self.inpaint_model:  # a dedicated inpainting model loads now: a wrong folder fails at start-up
            self._inpainter = inpaint_pipeline(self.pipe, model, self.inpaint_model, device, self.safety_checker)
        self._rng = np.random.default_rng(seed)

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
                    f"model '{self.model}' has no image-to-image pipeline in diffusers ({first_line(exc)}); "
                    "use task_mode='T2I'"
                ) from exc
            self._i2i.set_progress_bar_config(disable=True)
        return self._i2i

    @property
    def inpainter(self) -> Any:
        """The inpainting pipeline: ``inpaint_model``'s, or ``pipe``'s weights via ``from_pipe``."""
        if self._inpainter is None:
            self._inpainter = inpaint_pipeline(
                self.pipe, self.model, self.inpaint_model, self.device, self.safety_checker
            )
        return self._inpainter

    def native_size(self) -> int:
        """The side length the model generates at (images are resized to ``image_size``)."""
        return native_size(self.pipe)

    @property
    def token_limit(self) -> int | None:
        """Most tokens (special ones included) the text encoder reads; None without a tokenizer."""
        limit = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None

    def count_tokens(self, text: str) -> int:
        """Tokens the pipeline's (first) tokenizer makes of ``text``, special tokens included,
        so a prompt fits the text encoder when ``count_tokens(p) <= token_limit``."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"model '{self.model}' has no tokenizer to count prompt tokens with")
        return len(tokenizer(str(text), truncation=False, verbose=False)["input_ids"])

    def _call(self, genotypes: Sequence[dict[str, Any]], parents: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        """One pipeline call for genotypes of one mode and strength; images at the output size.

        Parent images (i2i, inpaint) may have any size and channel count."""
        first = genotypes[0]
        common = {
            "prompt": [g["prompt"] for g in genotypes],
            "num_inference_steps": int(first["steps"]),
            "guidance_scale": float(first["guidance"]),
            "output_type": "np",
        }
        seeds = [g["seed"] for g in genotypes]
        if first["mode"] == "t2i":
            raw = self.pipe(generator=seeded_generators(seeds), **common).images
        elif first["mode"] == "i2i":
            raw = self.i2i(
                image=rgb_batch(parents, self.native_size()),
                strength=float(first["strength"]),
                generator=seeded_generators(seeds),
                **common,
            ).images
        else:
            raw = run_inpaint(
                self.inpainter,
                common["prompt"],
                seeds,
                parents,
                [g["mask"] for g in genotypes],
                first["strength"],
                first["steps"],
                first["guidance"],
            )
        images = [_to_output(np.asarray(img, dtype=np.float32), self.image_size, self.channels) for img in raw]
        if first["mode"] == "inpaint":  # keep the parent's pixels outside the repainted rectangle
            images = [paste_back(p, img, g["mask"], self.channels) for p, img, g in zip(parents, images, genotypes)]
        return images

    # -- protocol --------------------------------------------------------------------------

    def prompt(self, label: int) -> str:
        """The template prompt of class ``label``."""
        label = self._check_label(label)
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
            Candidates with ``parent_id=None``, ``round=0`` and t2i genotypes, each with its
            own seed and its prompt drawn by ``prompts.sample(label, rng)``.
        """
        self.prompt(label)
        n = check_int("n", n, 0)
        genotypes = [self._genotype(self.prompts.sample(int(label), self._rng), "t2i") for _ in range(n)]
        images = self._run(genotypes, None)
        return [self._make(int(label), g, img, None, 0) for g, img in zip(genotypes, images)]

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One child per parent.

        ``task_mode="I2I"``: from the parent's pixels with the parent's prompt, a new seed and
        ``strength = max(degree, MIN_STRENGTH)``; with probability ``inpaint`` the child
        repaints a random rectangle of ``0.1 + 0.4 * degree`` of the area (genotype mode
        "inpaint"), otherwise it is image-to-image (mode "i2i"). ``task_mode="T2I"``:
        text-to-image with a new seed and the prompt ``prompts.evolve`` makes of the parent's
        (recorded as "parent_prompt"; ``degree`` is validated, not used).

        Parameters
        ----------
        candidates : Sequence[Candidate]
            Parents; a parent without a "prompt" in its genotype uses its class's template prompt.
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
            self._check_label(parent.label, f"label of candidate {parent.candidate_id}")
            prompt = parent.genotype.get("prompt") if isinstance(parent.genotype, dict) else None
            prompts.append(str(prompt) if prompt else self.prompt(parent.label))
        if self.task_mode == "T2I":
            evolved = list(self.prompts.evolve(prompts, [int(c.label) for c in candidates], self._rng))
            if len(evolved) != len(prompts):
                raise ValueError(f"prompt source returned {len(evolved)} prompts for {len(prompts)} parents")
            genotypes = [{**self._genotype(str(p), "t2i"), "parent_prompt": old} for p, old in zip(evolved, prompts)]
            images = self._run(genotypes, None)
        else:
            strength = max(degree, MIN_STRENGTH)
            genotypes = []
            for prompt in prompts:
                # Only draw when inpainting is on, so inpaint=0 keeps the seeds of plain i2i runs.
                if self.inpaint > 0 and self._rng.random() < self.inpaint:
                    genotypes.append(self._genotype(prompt, "inpaint", strength, random_mask(self._rng, degree)))
                else:
                    genotypes.append(self._genotype(prompt, "i2i", strength))
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
            A genotype written by this class (keys ``GENOTYPE_KEYS``, plus "strength" for
            i2i, "strength", "mask" and "inpaint_model" for inpaint).
        parent_image : np.ndarray or None
            The parent's image; required for i2i and inpaint genotypes.

        Returns
        -------
        np.ndarray
            float32 in [0, 1], (image_size, image_size) or (image_size, image_size, 3).
        """
        missing = [k for k in GENOTYPE_KEYS if k not in genotype]
        mode = genotype.get("mode")
        if missing or mode not in GENOTYPE_MODES:
            raise ValueError(
                f"genotype lacks {missing or ['a valid mode']}: not a diffusers genotype (keys {list(GENOTYPE_KEYS)})"
            )
        if genotype["model"] != self.model:
            raise ValueError(f"genotype was made by model '{genotype['model']}', this generator runs '{self.model}'")
        if mode != "t2i":
            if parent_image is None:
                raise ValueError(f"an {mode} genotype needs parent_image (the pixels it was varied from)")
            if "strength" not in genotype:
                raise ValueError(f"{mode} genotype lacks 'strength'")
        if mode == "inpaint":
            _check_mask(genotype.get("mask"))
            if str(genotype.get("inpaint_model", "")) != self.inpaint_model:
                raise ValueError(
                    f"genotype was inpainted with inpaint_model '{genotype.get('inpaint_model', '')}', "
                    f"this generator uses '{self.inpaint_model}'"
                )
        return self._call([genotype], None if parent_image is None else [parent_image])[0]

    # -- helpers ---------------------------------------------------------------------------

    def _genotype(
        self, prompt: str, mode: str, strength: float | None = None, mask: list[float] | None = None
    ) -> dict[str, Any]:
        """A new genotype with a seed drawn from the generator's rng."""
        steps = self.num_inference_steps if strength is None else denoise_steps(self.num_inference_steps, strength)
        genotype: dict[str, Any] = {
            "prompt": prompt,
            "seed": int(self._rng.integers(SEED_HIGH)),
            "steps": steps,
            "guidance": self.guidance_scale,
            "mode": mode,
            "model": self.model,
            "prompt_source": self.prompts.settings(),
        }
        if strength is not None:
            genotype["strength"] = float(strength)
        if mask is not None:
            genotype.update(mask=mask, inpaint_model=self.inpaint_model)
        return genotype

    def _run(self, genotypes: list[dict[str, Any]], parents: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        """Generate images in batches of ``batch_size``, one mode per batch, in genotype order."""
        batches = []
        for mode in GENOTYPE_MODES:
            index = [i for i, g in enumerate(genotypes) if g["mode"] == mode]
            batches.extend(index[s : s + self.batch_size] for s in range(0, len(index), self.batch_size))
        if self.progress and batches:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"diffusers {'t2i' if parents is None else 'i2i'}", unit="batch")
        images: list[Any] = [None] * len(genotypes)
        for batch in batches:
            chunk = self._call([genotypes[i] for i in batch], None if parents is None else [parents[i] for i in batch])
            for i, image in zip(batch, chunk):
                images[i] = image
        return images

    _make = CandidateMaker._candidate


__all__ = [
    "DiffusersGenerator",
    "GeneratorLoadError",
    "load_text2image",
    "GENOTYPE_KEYS",
    "GENOTYPE_MODES",
    "TASK_MODES",
    "MIN_STRENGTH",
]
