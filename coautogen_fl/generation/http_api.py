"""Online HTTP API generator: every candidate is one POST to an image endpoint.

Fresh samples are text-to-image requests; variations are image-to-image requests carrying the
parent's pixels (``task_mode="I2I"``) or text-to-image requests with an evolved prompt and a new
seed (``task_mode="T2I"``). This module builds request bodies and decodes replies (PIL);
``http_transport.HTTPTransport`` (httpx) sends them: key, timeouts, rate limit, retries, errors.
The JSON body is ``{"prompt", "seed", "width", "height", "n": 1}`` (+ ``"image"``, a base64 RGB
PNG of the parent, and ``"strength"`` for i2i, + ``extra``). Accepted replies: a raw image body
(``Content-Type: image/*``) or JSON with a base64 image under ``"image"``, ``"images"[0]`` or
``"data"[0]["b64_json"]`` (OpenAI style), optionally ``data:image/png;base64,``-prefixed. The API
key comes from an environment variable, goes out as ``Authorization: Bearer <key>``, and never
into a genotype or an error message.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any, Callable, Sequence

import httpx
import numpy as np
from PIL import Image

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
from coautogen_fl.generation.http_transport import HTTPTransport, snippet
from coautogen_fl.generation.imageops import to_output, to_rgb, to_uint8
from coautogen_fl.generation.schedule import check_degree
from coautogen_fl.prompts.base import PromptSource, TemplatePrompts

#: Keys of every genotype this generator writes (i2i adds "strength", variations "parent_prompt").
GENOTYPE_KEYS = ("prompt", "seed", "mode", "endpoint", "prompt_source")


def _decode_image(data: bytes) -> np.ndarray | None:
    """Image bytes -> float32 (H, W) or (H, W, 3) in [0, 1]; None when PIL cannot decode them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode.startswith("I"):  # 16/32-bit grayscale
                array = np.asarray(img, dtype=np.float32) / 65535.0
            elif img.mode == "F":
                array = np.nan_to_num(np.asarray(img, dtype=np.float32))
            elif img.mode in ("1", "L", "LA"):
                array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return np.clip(array, 0.0, 1.0)


def _image_bytes_from_json(payload: bytes) -> bytes | None:
    """The base64 image of a JSON reply ("image", "images"[0] or "data"[0]["b64_json"], with or
    without a ``data:...;base64,`` prefix); None when there is none."""
    try:
        reply = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    value = None
    if isinstance(reply, dict):
        images, data = reply.get("images"), reply.get("data")
        if "image" in reply:
            value = reply["image"]
        elif isinstance(images, list) and images:
            value = images[0]
        elif isinstance(data, list) and data and isinstance(data[0], dict):
            value = data[0].get("b64_json")
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().split(",", 1)[-1] if value.strip().startswith("data:") else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def encode_png_base64(image: np.ndarray) -> str:
    """A float [0, 1] (H, W) or (H, W, 3) image as a base64 RGB PNG (what i2i requests send)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(to_rgb(image)), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class HTTPImageGenerator(CandidateMaker):
    """Any online image API reachable by one JSON POST per image; implements ``Generator``.

    Parameters
    ----------
    url : str
        The endpoint (``http://`` or ``https://``) every request is POSTed to.
    class_names : Sequence[str]
        Class names (non-blank); labels index into them.
    image_size : int, default 64
        Requested width and height; replies of any size are resized to it.
    channels : int, default 3
        1 gives grayscale (H, W) images (luminance), 3 gives (H, W, 3).
    seed : int, default 0
        Seeds the numpy Generator that draws request seeds and prompts: same seed, same requests.
    task_mode : {"I2I", "T2I"}, default "I2I"
        How ``vary`` works: image-to-image from the parent's pixels with
        ``strength = max(degree, MIN_STRENGTH)``, or ``prompts.evolve`` with a new seed.
    prompts : PromptSource or None, default None
        Where prompts come from; None = ``TemplatePrompts(class_names)``.
    api_key_env : str, default "COAUTOGEN_API_KEY"
        Environment variable holding the API key (sent as a bearer token); "" = no key.
    timeout_s, retries, backoff_s, requests_per_minute : default 60.0, 3, 1.0, 60.0
        Reply timeout, extra attempts (connection errors, timeouts, 429, 5xx), exponential
        backoff base (``Retry-After`` wins) and request starts per minute (0 = no limit); see
        ``HTTPTransport``, which ``transport`` holds.
    extra : dict or None, default None
        JSON-serialisable fields merged into every request body (e.g. ``{"model": ...}``); the
        generator's own fields win on a clash.
    progress : bool, default False
        Show a tqdm bar over requests.
    sleep, clock : default time.sleep, time.monotonic
        Passed to the transport for backoff and rate limiting (tests inject fakes).

    Raises
    ------
    GeneratorLoadError
        When ``api_key_env`` is set but the variable is missing or empty.
    """

    ID_PREFIX = "api"

    def __init__(
        self,
        url: str,
        class_names: Sequence[str],
        image_size: int = 64,
        channels: int = 3,
        seed: int = 0,
        task_mode: str = "I2I",
        prompts: PromptSource | None = None,
        api_key_env: str = "COAUTOGEN_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        requests_per_minute: float = 60.0,
        extra: dict[str, Any] | None = None,
        progress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = check_output_spec(class_names, image_size, channels, task_mode)
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must be a JSON-serialisable dict ({exc})") from exc
        if prompts is not None and not isinstance(prompts, PromptSource):
            raise ValueError(f"prompts must be a PromptSource (sample, evolve, settings), got {type(prompts).__name__}")
        self.url = url
        self.class_names = names
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.seed = seed
        self.task_mode = task_mode
        self.prompts: PromptSource = prompts if prompts is not None else TemplatePrompts(names)
        self.extra = extra
        self.progress = bool(progress)
        self.transport = HTTPTransport(
            url, api_key_env, timeout_s, retries, backoff_s, requests_per_minute, sleep, clock
        )
        self._rng = np.random.default_rng(seed)

    # -- protocol --------------------------------------------------------------------------

    def random(self, label: int, n: int) -> list[Candidate]:
        """Request ``n`` (>= 0) fresh text-to-image candidates of class ``label``, prompts from
        ``prompts.sample``; they have ``parent_id=None``, ``round=0`` and t2i genotypes."""
        label = self._check_label(label)
        n = check_int("n", n, 0)
        genotypes = [self._genotype(str(self.prompts.sample(label, self._rng)), "t2i") for _ in range(n)]
        images = self._request_all(genotypes, None)
        return [self._make(label, g, img, None, 0) for g, img in zip(genotypes, images)]

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One child per parent (one request each), in parent order, with the parent's label,
        ``parent_id`` and ``round = parent.round + 1``; genotypes record "parent_prompt".

        ``degree`` in [0, 1] is the i2i strength (at least ``MIN_STRENGTH``); T2I validates it but
        the prompt source decides how far prompts move. A parent without a "prompt" in its
        genotype gets ``prompts.sample`` of its class.
        """
        degree = check_degree(degree)
        labels = [self._check_label(c.label, f"label of candidate {c.candidate_id}") for c in candidates]
        parent_prompts = []
        for parent, label in zip(candidates, labels):
            prompt = parent.genotype.get("prompt") if isinstance(parent.genotype, dict) else None
            parent_prompts.append(str(prompt) if prompt else str(self.prompts.sample(label, self._rng)))
        if self.task_mode == "T2I":
            prompts = [str(p) for p in self.prompts.evolve(parent_prompts, labels, self._rng)] if candidates else []
            if len(prompts) != len(parent_prompts):
                raise ValueError(f"prompt source returned {len(prompts)} prompts for {len(parent_prompts)} parents")
            genotypes = [self._genotype(p, "t2i", parent_prompt=pp) for p, pp in zip(prompts, parent_prompts)]
            images = self._request_all(genotypes, None)
        else:
            strength = max(degree, MIN_STRENGTH)
            genotypes = [self._genotype(p, "i2i", strength, parent_prompt=p) for p in parent_prompts]
            images = self._request_all(genotypes, [c.image for c in candidates])
        return [
            self._make(label, g, img, parent.candidate_id, parent.round + 1)
            for parent, label, g, img in zip(candidates, labels, genotypes, images)
        ]

    def regenerate(self, genotype: dict[str, Any], parent_image: np.ndarray | None = None) -> np.ndarray:
        """Re-request a candidate's image from its genotype (keys ``GENOTYPE_KEYS``, + "strength"
        for i2i, which also needs the parent's pixels as ``parent_image``); the same image comes
        back when the API is deterministic in prompt and seed."""
        missing = [k for k in ("prompt", "seed", "mode") if k not in genotype]
        if missing or genotype.get("mode") not in ("t2i", "i2i"):
            raise ValueError(
                f"genotype lacks {missing or ['a valid mode']}: not an HTTP API genotype (keys {list(GENOTYPE_KEYS)})"
            )
        endpoint = genotype.get("endpoint", self.url)
        if endpoint != self.url:
            raise ValueError(f"genotype was made by endpoint '{endpoint}', this generator posts to '{self.url}'")
        if genotype["mode"] == "i2i":
            if parent_image is None:
                raise ValueError("an i2i genotype needs parent_image (the pixels it was varied from)")
            if "strength" not in genotype:
                raise ValueError("i2i genotype lacks 'strength'")
            return self._request(genotype, parent_image)
        return self._request(genotype, None)

    # -- requests --------------------------------------------------------------------------

    def _request_all(self, genotypes: list[dict[str, Any]], parents: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        """One request per genotype, in order (i2i when ``parents`` is given)."""
        indices: Any = range(len(genotypes))
        if self.progress and genotypes:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"API {'i2i' if parents is not None else 't2i'}", unit="image")
        return [self._request(genotypes[i], None if parents is None else parents[i]) for i in indices]

    def _request(self, genotype: dict[str, Any], parent_image: np.ndarray | None) -> np.ndarray:
        """POST one genotype and return the decoded image at ``image_size``/``channels``."""
        body = dict(self.extra)
        body.update(
            prompt=genotype["prompt"], seed=int(genotype["seed"]), width=self.image_size, height=self.image_size, n=1
        )
        if parent_image is not None:
            body["image"] = encode_png_base64(parent_image)
            body["strength"] = float(genotype["strength"])
        return self._decode_reply(self.transport.post_json(body))

    def _decode_reply(self, reply: httpx.Response) -> np.ndarray:
        """A raw image body or a JSON base64 image -> output image; anything else is an error."""
        payload = reply.content
        media = reply.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        raw: bytes | None = None
        if media.startswith("image/") or media == "application/octet-stream":
            raw = payload
        elif media == "application/json" or media.endswith("+json") or payload.lstrip()[:1] == b"{":
            raw = _image_bytes_from_json(payload)
        image = _decode_image(raw) if raw else None
        if image is None or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise GeneratorLoadError(
                self.transport.redact(
                    f"API {self.url} returned a non-image reply (HTTP {reply.status_code}, "
                    f"content-type {media or 'none'}: {snippet(payload)}); "
                    "check generator.api_url and the API's reply format"
                )
            )
        return to_output(image, self.image_size, self.channels)

    # -- helpers ---------------------------------------------------------------------------

    def _genotype(
        self, prompt: str, mode: str, strength: float | None = None, parent_prompt: str | None = None
    ) -> dict[str, Any]:
        """A new genotype with a seed drawn from the generator's rng."""
        seed = int(self._rng.integers(SEED_HIGH))
        genotype = {
            "prompt": prompt,
            "seed": seed,
            "mode": mode,
            "endpoint": self.url,
            "prompt_source": self.prompts.settings(),
        }
        if strength is not None:
            genotype["strength"] = float(strength)
        if parent_prompt is not None:
            genotype["parent_prompt"] = parent_prompt
        return genotype

    _make = CandidateMaker._candidate


__all__ = [
    "HTTPImageGenerator",
    "GeneratorLoadError",
    "GENOTYPE_KEYS",
    "TASK_MODES",
    "MIN_STRENGTH",
    "encode_png_base64",
]
