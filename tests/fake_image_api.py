"""A local fake image API for the HTTP generator tests (http.server from the standard library).

Run ``python tests/fake_image_api.py --port 0``; it prints ``PORT <n>`` once it listens. Images are
deterministic in (prompt, seed): a smooth colour field drawn from a hash of both; an
image-to-image request blends the sent image with that field by ``strength``, so children at low
strength resemble their parents.

POST endpoints (JSON body with prompt, seed, width, height, n=1 [, image, strength]):
``/v1/images`` raw PNG; ``/v1/json`` JSON base64 (``?style=image|images|data|datauri|none``);
``/garbage`` an HTML page; ``/broken`` image/png that is not a PNG; ``/flaky`` 503 (or
``?status=429``) with ``Retry-After: 0`` on the first 2 calls per prompt+seed, then a PNG;
``/slow`` sleeps ``--slow-seconds`` first; ``/auth`` 401 unless ``Authorization: Bearer
$FAKE_API_KEY``; ``/bad-request`` 400. GET ``/count``: POSTs received (total and per path);
GET ``/last``: the last POST body (image replaced by its length) and whether it carried a token.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image


def field_image(prompt: str, seed: int, width: int, height: int) -> np.ndarray:
    """A deterministic smooth RGB field in [0, 1] for (prompt, seed)."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode("utf-8")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    smooth = Image.fromarray(coarse, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class FakeTime:
    """A clock that only moves when someone sleeps (or a test advances it): the transport's
    rate limit and backoff, tested without waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class State:
    """Counters shared by the handler threads."""

    def __init__(self, api_key: str, slow_seconds: float) -> None:
        self.lock = threading.Lock()
        self.posts: Counter[str] = Counter()
        self.flaky: Counter[tuple[str, int]] = Counter()
        self.last: dict = {}
        self.api_key = api_key
        self.slow_seconds = slow_seconds


class Handler(BaseHTTPRequestHandler):
    state: State  # set on the subclass made in main()

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
            pass

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(payload).encode("utf-8"), headers)

    def do_GET(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        with self.state.lock:
            if path == "/count":
                return self._json(200, {"posts": sum(self.state.posts.values()), "paths": dict(self.state.posts)})
            if path == "/last":
                return self._json(200, self.state.last)
        self._json(404, {"error": f"no GET {path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        token = self.headers.get("Authorization", "")
        try:
            body = json.loads(raw)
            prompt, seed, width, height = body["prompt"], body["seed"], body["width"], body["height"]
            valid = (
                isinstance(prompt, str)
                and all(isinstance(v, int) for v in (seed, width, height))
                and body.get("n") == 1
            )
        except (ValueError, KeyError, TypeError):
            valid = False
        with self.state.lock:
            self.state.posts[url.path] += 1
            if valid:
                summary = {k: v for k, v in body.items() if k != "image"}
                summary["image_chars"] = len(body.get("image") or "")
                self.state.last = {"path": url.path, "body": summary, "authorized": token.startswith("Bearer ")}
        if not valid:
            return self._json(400, {"error": "need JSON with prompt (str), seed, width, height (int) and n=1"})
        self._route(url.path, query, body, token)

    def _route(self, path: str, query: dict[str, str], body: dict, token: str) -> None:
        if path == "/garbage":
            return self._send(
                200,
                "text/html; charset=utf-8",
                b"<!DOCTYPE html>\n<html><body><h1>Welcome to nginx!</h1></body></html>",
            )
        if path == "/broken":
            return self._send(200, "image/png", b"\x89PNG definitely not an image")
        if path == "/bad-request":
            return self._json(400, {"error": "unknown field 'width'"})
        if path == "/auth" and token != f"Bearer {self.state.api_key}":
            return self._json(401, {"error": "invalid api key", "echo": token})
        if path == "/flaky":
            with self.state.lock:
                self.state.flaky[(body["prompt"], body["seed"])] += 1
                calls = self.state.flaky[(body["prompt"], body["seed"])]
            if calls <= 2:
                return self._json(int(query.get("status", 503)), {"error": "busy"}, {"Retry-After": "0"})
        if path == "/slow":
            time.sleep(self.state.slow_seconds)
        if path not in ("/v1/images", "/v1/json", "/auth", "/flaky", "/slow"):
            return self._json(404, {"error": f"no POST {path}"})
        image = self._render(body)
        if path != "/v1/json":
            return self._send(200, "image/png", png_bytes(image))
        encoded = base64.b64encode(png_bytes(image)).decode("ascii")
        style = query.get("style", "data")
        replies = {
            "image": {"image": encoded},
            "images": {"images": [encoded]},
            "data": {"created": 0, "data": [{"b64_json": encoded}]},
            "datauri": {"image": f"data:image/png;base64,{encoded}"},
            "none": {"created": 0, "data": []},
        }
        self._json(200, replies[style])

    def _render(self, body: dict) -> np.ndarray:
        width, height = body["width"], body["height"]
        fresh = field_image(body["prompt"], body["seed"], width, height)
        if not body.get("image"):
            return fresh
        with Image.open(io.BytesIO(base64.b64decode(body["image"]))) as sent:
            parent = (
                np.asarray(sent.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                / 255.0
            )
        strength = float(body.get("strength", 0.5))
        return (1.0 - strength) * parent + strength * fresh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="how long /slow sleeps")
    args = parser.parse_args(argv)
    handler = type("BoundHandler", (Handler,), {"state": State(os.environ.get("FAKE_API_KEY", ""), args.slow_seconds)})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
