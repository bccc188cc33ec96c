"""Tests of the HTTP transport (retries, Retry-After, rate limit, redirects, errors) against the
fake image API of tests/fake_image_api.py, served on 127.0.0.1 from a thread of this process (its
handler plus a few endpoints these tests need); nothing leaves the machine, nothing really waits.
"""

from __future__ import annotations

import email.utils
import os
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest

from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.generation.http_transport import HTTPTransport, retry_after_seconds

from fake_image_api import FakeTime, Handler, State

KEY = "sk-transport-7d2e9b41"
KEY_ENV = "COAUTOGEN_TEST_TRANSPORT_KEY"


class TransportTestHandler(Handler):
    """The fake API plus ``/wait?seconds=N`` (429 with ``Retry-After: N`` on the first call per
    prompt+seed, then a PNG), ``/down`` (always 503, no Retry-After), ``/redirect?to=URL&status=S``
    and ``/echo`` (400 quoting the Authorization header); every POST's path and token is logged."""

    def _route(self, path: str, query: dict[str, str], body: dict, token: str) -> None:
        state = self.state
        with state.lock:
            state.tokens.append((path, token))
        if path == "/wait":
            with state.lock:
                state.flaky[("wait", body["prompt"], body["seed"])] += 1
                first = state.flaky[("wait", body["prompt"], body["seed"])] == 1
            if first:
                return self._json(429, {"error": "slow down"}, {"Retry-After": query["seconds"]})
            path = "/v1/images"
        if path == "/down":
            return self._json(503, {"error": "down"})
        if path == "/redirect":
            return self._json(int(query.get("status", 307)), {}, {"Location": query["to"]})
        if path == "/echo":
            return self._json(400, {"error": f"bad token {token}"})
        super()._route(path, query, body, token)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, State]]:
    """(base URL, shared state) of the fake API; its thread is stopped and its socket closed in
    teardown, also when a test fails."""
    state = State(KEY, slow_seconds=5.0)
    state.tokens = []  # type: ignore[attr-defined]
    handler = type("BoundHandler", (TransportTestHandler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="fake-image-api", daemon=True)
    thread.start()
    old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    os.environ.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))


def body(prompt: str, seed: int = 1) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "width": 8, "height": 8, "n": 1}


def transport(url: str, **overrides: Any) -> HTTPTransport:
    kwargs: dict[str, Any] = {"api_key_env": "", "requests_per_minute": 0, "retries": 0}
    kwargs.update(overrides)
    return HTTPTransport(url, **kwargs)


def posts(state: State, path: str) -> int:
    with state.lock:
        return state.posts[path]


def test_429_with_retry_after_waits_the_stated_delay(server: tuple[str, State]) -> None:
    base, state = server
    fake = FakeTime()
    before = posts(state, "/wait")
    with transport(base + "/wait?seconds=7", retries=2, backoff_s=30.0, sleep=fake.sleep, clock=fake.clock) as t:
        reply = t.post_json(body("retry-after"))
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "image/png"
    assert fake.sleeps == [7.0]  # Retry-After, not the 30 s backoff
    assert posts(state, "/wait") - before == 2


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("3", now=lambda: now) == 3.0
    assert retry_after_seconds(email.utils.formatdate(now + 12, usegmt=True), now=lambda: now) == pytest.approx(12.0)
    assert retry_after_seconds(email.utils.formatdate(now - 60, usegmt=True), now=lambda: now) == 0.0
    assert retry_after_seconds("-5") == 0.0
    for unreadable in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(unreadable) is None


def test_503_twice_then_200_takes_three_requests(server: tuple[str, State]) -> None:
    base, state = server
    fake = FakeTime()
    before = posts(state, "/flaky")
    with transport(base + "/flaky", retries=3, backoff_s=30.0, sleep=fake.sleep, clock=fake.clock) as t:
        assert t.post_json(body("flaky-503")).status_code == 200
    assert posts(state, "/flaky") - before == 3
    assert fake.sleeps == []  # the fake says Retry-After: 0


def test_exhausted_retries_name_the_attempts_and_back_off_exponentially(server: tuple[str, State]) -> None:
    base, state = server
    fake = FakeTime()
    before = posts(state, "/down")
    with transport(base + "/down", retries=2, backoff_s=0.5, sleep=fake.sleep, clock=fake.clock) as t:
        with pytest.raises(
            GeneratorLoadError, match=r"failed after 3 attempts \(last: HTTP 503\).*generator.api_retries"
        ) as info:
            t.post_json(body("down"))
    assert "\n" not in str(info.value) and base + "/down" in str(info.value)
    assert posts(state, "/down") - before == 3
    assert fake.sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_to_another_host_is_refused_and_the_key_stays_home(
    server: tuple[str, State], status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    monkeypatch.setenv(KEY_ENV, KEY)
    elsewhere = f"http://localhost:{urlparse(base).port}/v1/images"
    with state.lock:
        seen = len(state.tokens)
    before = posts(state, "/v1/images")
    with transport(f"{base}/redirect?status={status}&to={elsewhere}", api_key_env=KEY_ENV, retries=2) as t:
        with pytest.raises(
            GeneratorLoadError, match=rf"redirected \(HTTP {status}\) to '{elsewhere}'.*set generator.api_url"
        ) as info:
            t.post_json(body("redirect"))
    assert KEY not in str(info.value)
    assert posts(state, "/v1/images") == before  # the other host never saw the request
    with state.lock:
        assert state.tokens[seen:] == [("/redirect", f"Bearer {KEY}")]  # one attempt, key only to api_url


def test_same_host_redirect_is_refused_too(server: tuple[str, State]) -> None:
    base, state = server
    before = posts(state, "/v1/images")
    with transport(f"{base}/redirect?status=302&to={base}/v1/images") as t:
        with pytest.raises(GeneratorLoadError, match=r"redirected \(HTTP 302\)"):
            t.post_json(body("same-host"))
    assert posts(state, "/v1/images") == before


def test_rate_limit_spaces_request_starts(server: tuple[str, State]) -> None:
    base, state = server
    fake = FakeTime()
    before = posts(state, "/v1/images")
    with transport(base + "/v1/images", requests_per_minute=30, sleep=fake.sleep, clock=fake.clock) as t:
        for i in range(3):
            t.post_json(body(f"rate {i}"))
        assert fake.sleeps == [pytest.approx(2.0), pytest.approx(2.0)]
        fake.now += 1.5  # time since the last start counts towards the interval
        t.post_json(body("rate 3"))
        assert fake.sleeps[-1] == pytest.approx(0.5) and len(fake.sleeps) == 3
    assert posts(state, "/v1/images") - before == 4


def test_client_errors_name_the_fix_without_retrying(
    server: tuple[str, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    monkeypatch.setenv(KEY_ENV, "sk-wrong-1234")
    fake = FakeTime()
    with transport(base + "/auth", api_key_env=KEY_ENV, retries=3, sleep=fake.sleep) as t:
        with pytest.raises(
            GeneratorLoadError, match=rf"refused the key in {KEY_ENV} \(HTTP 401\); set {KEY_ENV} to a valid key"
        ):
            t.post_json(body("auth"))
    with transport(base + "/auth", retries=3, sleep=fake.sleep) as t:
        with pytest.raises(GeneratorLoadError, match=r"requires a key \(HTTP 401\).*generator.api_key_env"):
            t.post_json(body("auth"))
    before = posts(state, "/nope")
    with transport(base + "/nope", retries=3, sleep=fake.sleep) as t:
        with pytest.raises(
            GeneratorLoadError, match=rf"API {base}/nope does not exist \(HTTP 404.*check the path in generator.api_url"
        ):
            t.post_json(body("404"))
    assert posts(state, "/nope") - before == 1 and fake.sleeps == []
    with transport(base + "/echo", api_key_env=KEY_ENV) as t:  # a server echoing the key
        with pytest.raises(
            GeneratorLoadError, match=r"rejected the request \(HTTP 400: .*bad token Bearer \*\*\*"
        ) as info:
            t.post_json(body("echo"))
        assert "sk-wrong-1234" not in str(info.value) and "sk-wrong-1234" not in repr(t)


def test_construction_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="generator.api_url"):
        transport("ftp://example.org/x")
    for name, value in (("timeout_s", 0), ("backoff_s", -1.0), ("requests_per_minute", float("nan")), ("retries", -1)):
        with pytest.raises(ValueError, match=name):
            transport("http://127.0.0.1:9/x", **{name: value})
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(GeneratorLoadError, match=f"set {KEY_ENV}=... or generator.api_key_env=''"):
        transport("http://127.0.0.1:9/x", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "sk a")
    with pytest.raises(GeneratorLoadError, match="whitespace or control characters") as info:
        transport("http://127.0.0.1:9/x", api_key_env=KEY_ENV)
    assert "sk a" not in str(info.value)
