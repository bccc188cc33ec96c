"""HTTP transport of the online generators: one JSON POST at a time to one URL, on httpx.

``HTTPTransport`` owns everything between "here is a request body" and "here is a 2xx reply":
the bearer key (read from an environment variable, never written into a message), timeouts, a
client-side rate limit, retries with exponential backoff that honour ``Retry-After``, and one-line
errors naming the problem and the ``generator.api_*`` key that fixes it. What the body holds and
what the reply means is the caller's business (``http_api.HTTPImageGenerator``).

Redirects are never followed: a 3xx reply is an error naming the new address. Following one could
send the key to another host or silently turn the POST into a GET; the fix is to point
``generator.api_url`` at the final address.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import ssl
import time
from typing import Any, Callable

import httpx

from coautogen_fl.generation.base import GeneratorLoadError, check_int

#: Characters of a reply body quoted in an error.
SNIPPET_CHARS = 60


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value: delta-seconds or an HTTP date
    (relative to ``now()``, wall-clock seconds, default ``time.time``); never negative; None when
    the value is absent or unreadable."""
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
    return max(0.0, when.timestamp() - now())


def snippet(payload: bytes) -> str:
    """The first ``SNIPPET_CHARS`` characters of a reply body, quoted, on one line."""
    text = " ".join(payload[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace").split())
    return repr(text[:SNIPPET_CHARS])


def read_api_key(api_key_env: str, url: str) -> str | None:
    """The key in environment variable ``api_key_env`` (None when ``api_key_env`` is ""); errors
    name the variable, never its value.

    Raises
    ------
    GeneratorLoadError
        When the variable is missing or empty, or holds whitespace/control characters inside the key.
    """
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise GeneratorLoadError(
            f"API {url} needs a key but environment variable {api_key_env} is missing or empty; "
            f"set {api_key_env}=... or generator.api_key_env='' for an API without a key"
        )
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in key):
        raise GeneratorLoadError(
            f"environment variable {api_key_env} holds whitespace or control characters inside the key; "
            f"set {api_key_env} to the bare key"
        )
    return key


class HTTPTransport:
    """POSTs JSON to one API endpoint with rate limiting, retries and clear errors.

    Parameters
    ----------
    url : str
        The endpoint (``http://`` or ``https://``); ``generator.api_url``.
    api_key_env : str, default ""
        Environment variable holding the API key, sent as ``Authorization: Bearer <key>`` to
        ``url`` only (redirects are refused); "" = no key (``generator.api_key_env``).
    timeout_s : float, default 60.0
        Seconds allowed for connecting, sending and each wait for reply bytes
        (``generator.api_timeout_s``).
    retries : int, default 3
        Extra attempts after connection errors, timeouts, HTTP 429 and 5xx (``generator.api_retries``).
    backoff_s : float, default 1.0
        Wait before retry ``k`` (0-based) is ``backoff_s * 2**k``, unless the reply has a
        ``Retry-After`` (seconds or HTTP date), which wins (``generator.api_backoff_s``).
    requests_per_minute : float, default 60.0
        At most this many request starts per minute, retries included; 0 = no limit
        (``generator.api_requests_per_minute``).
    sleep : Callable[[float], None], default time.sleep
        Used for backoff and rate limiting (tests inject a fake).
    clock : Callable[[], float], default time.monotonic
        Monotonic seconds, used for rate limiting.

    Raises
    ------
    ValueError
        On a non-http(s) URL or an out-of-range number.
    GeneratorLoadError
        When ``api_key_env`` is set but the variable is missing or empty.
    """

    def __init__(
        self,
        url: str,
        api_key_env: str = "",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        requests_per_minute: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"generator.api_url must be an http:// or https:// URL, got {url!r}")
        for name, value, low in (
            ("timeout_s", timeout_s, None),
            ("backoff_s", backoff_s, 0.0),
            ("requests_per_minute", requests_per_minute, 0.0),
        ):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (value <= 0 if low is None else value < low):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'}, got {value!r}")
        self.url = url
        self.api_key_env = str(api_key_env or "")
        self.timeout_s = float(timeout_s)
        self.retries = check_int("retries", retries, 0)
        self.backoff_s = float(backoff_s)
        self.requests_per_minute = float(requests_per_minute)
        self._sleep = sleep
        self._clock = clock
        self._api_key = read_api_key(self.api_key_env, url)
        self._last_start: float | None = None
        # The system trust store, as the standard library uses (httpx alone would use certifi's);
        # no connect retries in httpx: they would bypass proxy settings and the backoff below.
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout_s), follow_redirects=False, verify=ssl.create_default_context()
        )

    def __repr__(self) -> str:
        return f"HTTPTransport(url={self.url!r}, api_key_env={self.api_key_env!r}, retries={self.retries})"

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __enter__(self) -> HTTPTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post_json(self, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` as JSON and return the 2xx reply (its body read).

        Raises
        ------
        GeneratorLoadError
            At once on a 3xx/4xx reply other than 429; after ``retries + 1`` attempts that met
            connection errors, timeouts, 429 or 5xx (naming the count and the last cause).
        """
        headers = {"Content-Type": "application/json", "Accept": "image/*, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode("utf-8")
        cause = ""
        for attempt in range(self.retries + 1):
            self._wait_for_slot()
            retry_after = None
            try:
                reply = self._client.post(self.url, content=data, headers=headers)
            except httpx.TimeoutException:
                cause = f"timed out after {self.timeout_s:g} s"
            except httpx.RequestError as exc:
                cause = " ".join(f"{type(exc).__name__}: {exc}".split())
            else:
                if 200 <= reply.status_code < 300:
                    return reply
                if reply.status_code != 429 and reply.status_code < 500:
                    raise self._refusal(reply)
                cause = f"HTTP {reply.status_code}"
                retry_after = retry_after_seconds(reply.headers.get("Retry-After"))
            if attempt < self.retries:
                delay = retry_after if retry_after is not None else self.backoff_s * 2**attempt
                if delay > 0:
                    self._sleep(delay)
        attempts = self.retries + 1
        raise GeneratorLoadError(
            self.redact(
                f"API {self.url} failed after {attempts} attempt{'s' if attempts > 1 else ''} (last: {cause}); "
                "check that the API is reachable, or raise generator.api_retries / generator.api_timeout_s"
            )
        )

    def redact(self, message: str) -> str:
        """``message`` with the key replaced by ``***`` (a server may echo it back)."""
        return message.replace(self._api_key, "***") if self._api_key else message

    def _wait_for_slot(self) -> None:
        """Sleep until ``60 / requests_per_minute`` seconds have passed since the last request start."""
        if self.requests_per_minute <= 0:
            return
        if self._last_start is not None:
            wait = self._last_start + 60.0 / self.requests_per_minute - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_start = self._clock()

    def _refusal(self, reply: httpx.Response) -> GeneratorLoadError:
        """The error for a 3xx/4xx reply that retrying cannot fix."""
        where, code = f"API {self.url}", f"HTTP {reply.status_code}"
        if reply.status_code in (401, 403) and self.api_key_env:
            message = f"{where} refused the key in {self.api_key_env} ({code}); set {self.api_key_env} to a valid key"
        elif reply.status_code in (401, 403):
            message = (
                f"{where} requires a key ({code}); put it in an environment variable named by generator.api_key_env"
            )
        elif 300 <= reply.status_code < 400:
            message = (
                f"{where} redirected ({code}) to {reply.headers.get('Location')!r}; redirects are not followed "
                "(they could carry the key elsewhere); set generator.api_url to the final address"
            )
        elif reply.status_code == 404:
            message = f"{where} does not exist ({code}: {snippet(reply.content)}); check the path in generator.api_url"
        else:
            message = (
                f"{where} rejected the request ({code}: {snippet(reply.content)}); "
                "check generator.api_url and the request fields"
            )
        return GeneratorLoadError(self.redact(message))


__all__ = ["SNIPPET_CHARS", "HTTPTransport", "read_api_key", "retry_after_seconds", "snippet"]
