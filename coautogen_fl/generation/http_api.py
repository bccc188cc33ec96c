"""Online HTTP API generator: every candidate is one POST to an image endpoint.

Fresh samples are text-to-image requests; variations are image-to-image requests carrying the
parent's pixels (``task_mode="I2I"``) or text-to-image requests with an evolved prompt and a new
seed (``task_mode="T2I"``). Only the standard library talks HTTP (``urllib.request``); PIL decodes.
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
import email.utils
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from coautogen_fl.generation.base import Candidate, CandidateMaker, GeneratorLoadError, MIN_STRENGTH, SEED_HIGH, TASK_MODES, check_int, check_output_spec
from coautogen_fl.generation.imageops import to_output, to_rgb, to_uint8
from coautogen_fl.generation.schedule import check_degree
from coautogen_fl.prompts.base import PromptSource, TemplatePrompts

#: Keys of every genotype this generator writes (i2i adds "strength", variations "parent_prompt").
GENOTYPE_KEYS = ("prompt", "seed", "mode", "endpoint", "prompt_source")
#: Characters of a bad reply quoted in the error.
_SNIPPET_CHARS = 60


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turn redirects into errors: urllib would replay the Authorization header to the new
    host and silently turn the POST into a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, D102
        return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
    timeout_s : float, default 60.0
        Seconds to wait for one reply.
    retries : int, default 3
        Extra attempts after connection errors, timeouts, HTTP 429 and 5xx.
    backoff_s : float, default 1.0
        Wait before retry ``k`` (0-based) is ``backoff_s * 2**k`` unless the reply has Retry-After.
    requests_per_minute : float, default 60.0
        At most this many request starts per minute (retries included); 0 = no limit.
    extra : dict or None, default None
        JSON-serialisable fields merged into every request body (e.g. ``{"model": ...}``); the
        generator's own fields win on a clash.
    progress : bool, default False
        Show a tqdm bar over requests.
    sleep : Callable[[float], None], default time.sleep
        Used for backoff and rate limiting (tests inject a fake).
    clock : Callable[[], float], default time.monotonic
        Monotonic seconds, used for rate limiting.

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
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"generator.api_url must be an http:// or https:// URL, got {url!r}")
        names = check_output_spec(class_names, image_size, channels, task_mode)
        for name, value, low in (("timeout_s", timeout_s, None), ("backoff_s", backoff_s, 0.0),
                                 ("requests_per_minute", requests_per_minute, 0.0)):  # fmt: skip
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
            if not number or (value <= 0 if low is None else value < low):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'}, got {value!r}")
        check_int("retries", retries, 0)
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
        self.api_key_env = str(api_key_env or "")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.requests_per_minute = float(requests_per_minute)
        self.extra = extra
        self.progress = bool(progress)
        self._sleep = sleep
        self._clock = clock
        self._api_key = self._read_api_key()
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self._rng = np.random.default_rng(seed)
        self._last_start: float | None = None

    def _read_api_key(self) -> str | None:
        """The key from ``api_key_env``; errors name the variable, never its value."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise GeneratorLoadError(
                f"API {self.url} needs a key but environment variable {self.api_key_env} is missing or empty; "
                f"set {self.api_key_env}=... or generator.api_key_env='' for an API without a key"
            )
        if any(ord(ch) < 33 or ord(ch) == 127 for ch in key):
            raise GeneratorLoadError(
                f"environment variable {self.api_key_env} holds whitespace or control characters inside the key; "
                f"set {self.api_key_env} to the bare key"
            )
        return key

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
        labels = [self._check_label(c.label, f"label of candidate {c.candidate_id}")
                  for c in candidates]  # fmt: skip
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
            raise ValueError(f"genotype lacks {missing or ['a valid mode']}: not an HTTP API genotype (keys {list(GENOTYPE_KEYS)})")
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

    # -- HTTP ------------------------------------------------------------------------------

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
        body.update(prompt=genotype["prompt"], seed=int(genotype["seed"]), width=self.image_size,
                    height=self.image_size, n=1)  # fmt: skip
        if parent_image is not None:
            body["image"] = encode_png_base64(parent_image)
            body["strength"] = float(genotype["strength"])
        status, content_type, payload = self._post(json.dumps(body).encode("utf-8"))
        return self._decode_reply(status, content_type, payload)

    def _post(self, data: bytes) -> tuple[int, str, bytes]:
        """POST with rate limiting and retries; returns (status, content type, body)."""
        headers = {"Content-Type": "application/json", "Accept": "image/*, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        cause = ""
        for attempt in range(self.retries + 1):
            self._wait_for_slot()
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with self._opener.open(request, timeout=self.timeout_s) as reply:
                    return reply.status, reply.headers.get("Content-Type", ""), reply.read()
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise self._refusal(exc) from exc
                cause, retry_after = f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))
                exc.close()
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                cause = self._describe(exc)
            if attempt < self.retries:
                delay = retry_after if retry_after is not None else self.backoff_s * 2**attempt
                if delay > 0:
                    self._sleep(delay)
        attempts = self.retries + 1
        raise GeneratorLoadError(self._redact(
            f"API {self.url} failed after {attempts} attempt{'s' if attempts > 1 else ''} (last: {cause}); "
            "check that the API is reachable, or raise generator.api_retries / generator.api_timeout_s"
        ))  # fmt: skip

    def _wait_for_slot(self) -> None:
        """Sleep until ``60 / requests_per_minute`` seconds have passed since the last request start."""
        if self.requests_per_minute <= 0:
            return
        interval = 60.0 / self.requests_per_minute
        if self._last_start is not None:
            wait = self._last_start + interval - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_start = self._clock()

    def _describe(self, exc: BaseException) -> str:
        """One-line cause of a connection-level failure."""
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return f"timed out after {self.timeout_s:g} s"
        return " ".join(f"{type(reason).__name__}: {reason}".split())

    def _refusal(self, exc: urllib.error.HTTPError) -> GeneratorLoadError:
        """The error for a 3xx/4xx reply that retrying cannot fix."""
        with exc:
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                body = b""
        where, code = f"API {self.url}", f"HTTP {exc.code}"
        if exc.code in (401, 403) and self.api_key_env:
            message = f"{where} refused the key in {self.api_key_env} ({code}); set {self.api_key_env} to a valid key"
        elif exc.code in (401, 403):
            message = f"{where} requires a key ({code}); put it in an environment variable named by generator.api_key_env"
        elif 300 <= exc.code < 400:
            message = f"{where} redirected ({code}) to {exc.headers.get('Location')!r}; set generator.api_url to the final address"
        else:
            message = f"{where} rejected the request ({code}: {self._snippet(body)}); check generator.api_url and the request fields"
        return GeneratorLoadError(self._redact(message))

    def _decode_reply(self, status: int, content_type: str, payload: bytes) -> np.ndarray:
        """A raw image body or a JSON base64 image -> output image; anything else is an error."""
        media = content_type.split(";", 1)[0].strip().lower()
        raw: bytes | None = None
        if media.startswith("image/") or media == "application/octet-stream":
            raw = payload
        elif media == "application/json" or media.endswith("+json") or payload.lstrip()[:1] == b"{":
            raw = _image_bytes_from_json(payload)
        image = _decode_image(raw) if raw else None
        if image is None or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise GeneratorLoadError(self._redact(
                f"API {self.url} returned a non-image reply (HTTP {status}, content-type {media or 'none'}: "
                f"{self._snippet(payload)}); check generator.api_url and the API's reply format"
            ))  # fmt: skip
        return to_output(image, self.image_size, self.channels)

    @staticmethod
    def _snippet(payload: bytes) -> str:
        """The first characters of a reply body, quoted on one line."""
        text = " ".join(payload[: _SNIPPET_CHARS * 4].decode("utf-8", errors="replace").split())
        return repr(text[:_SNIPPET_CHARS])

    def _redact(self, message: str) -> str:
        """Never let the key into a message, even if a server echoes it back."""
        return message.replace(self._api_key, "***") if getattr(self, "_api_key", None) else message

    # -- helpers ---------------------------------------------------------------------------

    def _genotype(self, prompt: str, mode: str, strength: float | None = None,
                  parent_prompt: str | None = None) -> dict[str, Any]:  # fmt: skip
        """A new genotype with a seed drawn from the generator's rng."""
        seed = int(self._rng.integers(SEED_HIGH))
        genotype = {"prompt": prompt, "seed": seed, "mode": mode, "endpoint": self.url, "prompt_source": self.prompts.settings()}
        if strength is not None:
            genotype["strength"] = float(strength)
        if parent_prompt is not None:
            genotype["parent_prompt"] = parent_prompt
        return genotype

    _make = CandidateMaker._candidate


__all__ = ["HTTPImageGenerator", "GeneratorLoadError", "GENOTYPE_KEYS", "TASK_MODES", "MIN_STRENGTH", "encode_png_base64"]
