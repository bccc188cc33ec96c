"""Tests of the online HTTP API generator against a local fake API (tests/fake_image_api.py).

The fake server runs as a real subprocess on 127.0.0.1 (one per module), so requests go through
httpx, sockets and HTTP exactly as they would against a real API; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from coautogen_fl.generation.base import Candidate, Generator, GeneratorLoadError
from coautogen_fl.generation.http_api import GENOTYPE_KEYS, MIN_STRENGTH, HTTPImageGenerator
from coautogen_fl.hub import ModelLoadError

from fake_image_api import FakeTime

NAMES = ["cat", "dog"]
SIZE = 24
SERVER_KEY = "sk-test-5e3c1a9f"
KEY_ENV = "COAUTOGEN_TEST_HTTP_KEY"


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    """Base URL of a fake API subprocess; stopped by PID in teardown, also when a test fails."""
    script = Path(__file__).with_name("fake_image_api.py")
    env = dict(os.environ, FAKE_API_KEY=SERVER_KEY, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--slow-seconds", "5"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("PORT "), f"fake API did not start (got {line!r}, exit code {proc.poll()})"
        old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
        os.environ.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        try:
            yield f"http://127.0.0.1:{int(line.split()[1])}"
        finally:
            for key, value in old.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        assert proc.returncode is not None
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def make(url: str, **overrides: Any) -> HTTPImageGenerator:
    kwargs: dict[str, Any] = {"image_size": SIZE, "api_key_env": "", "requests_per_minute": 0, "retries": 0}
    kwargs.update(overrides)
    return HTTPImageGenerator(url, NAMES, **kwargs)


class SuffixPrompts:
    """A prompt source whose evolve is recognisable in the genotype and the request."""

    def __init__(self) -> None:
        self.evolved: list[list[str]] = []

    def sample(self, label: int, rng: np.random.Generator) -> str:
        return f"{NAMES[label]} #{int(rng.integers(1000))}"

    def evolve(self, prompts: Sequence[str], labels: Sequence[int], rng: np.random.Generator) -> list[str]:
        self.evolved.append(list(prompts))
        return [f"{p}, evolved" for p in prompts]

    def settings(self) -> dict[str, Any]:
        return {"source": "suffix"}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("path", ["/v1/images", "/v1/json"])
def test_random_shapes_ranges_and_genotypes(api: str, channels: int, path: str) -> None:
    gen = make(api + path, channels=channels)
    assert isinstance(gen, Generator)
    cands = gen.random(1, 3)
    shape = (SIZE, SIZE) if channels == 1 else (SIZE, SIZE, 3)
    assert [c.candidate_id for c in cands] == ["api-0000000", "api-0000001", "api-0000002"]
    for c in cands:
        assert c.image.shape == shape and c.image.dtype == np.float32
        assert 0.0 <= c.image.min() and c.image.max() <= 1.0 and c.image.std() > 0.01
        assert c.label == 1 and c.parent_id is None and c.round == 0
        assert set(GENOTYPE_KEYS) <= set(c.genotype) and c.genotype["mode"] == "t2i"
        assert c.genotype["endpoint"] == api + path and c.genotype["prompt"] == "a photo of dog"
        assert c.genotype["prompt_source"] == {"source": "template", "template": "a photo of {name}"}
        json.dumps(c.genotype)
    assert len({c.genotype["seed"] for c in cands}) == 3
    assert not np.allclose(cands[0].image, cands[1].image)
    assert gen.random(0, 0) == []
    last = get_json(api + "/last")["body"]
    assert {k: last[k] for k in ("width", "height", "n")} == {"width": SIZE, "height": SIZE, "n": 1}


@pytest.mark.parametrize("style", ["image", "images", "datauri"])
def test_every_json_reply_style_decodes_to_the_same_image(api: str, style: str) -> None:
    reference = make(api + "/v1/images", seed=5).random(0, 1)[0].image
    assert np.array_equal(make(f"{api}/v1/json?style={style}", seed=5).random(0, 1)[0].image, reference)


def test_gray_is_luminance_of_colour(api: str) -> None:
    rgb = make(api + "/v1/images", seed=9).random(0, 1)[0].image
    gray = make(api + "/v1/images", seed=9, channels=1).random(0, 1)[0].image
    np.testing.assert_allclose(gray, rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), atol=1e-5)


def test_same_seed_same_images_and_genotypes(api: str) -> None:
    runs = []
    for _ in range(2):
        gen = make(api + "/v1/images", seed=3)
        parents = gen.random(0, 2)
        children = gen.vary(parents, 0.4)
        runs.append(parents + children)
    for a, b in zip(*runs):
        assert a.genotype == b.genotype and a.candidate_id == b.candidate_id
        assert np.array_equal(a.image, b.image)
    other = make(api + "/v1/images", seed=4).random(0, 2)
    assert [c.genotype["seed"] for c in other] != [c.genotype["seed"] for c in runs[0][:2]]


def test_regenerate_round_trip_t2i_and_i2i(api: str) -> None:
    gen = make(api + "/v1/json", seed=1)
    parent = gen.random(0, 1)[0]
    child = gen.vary([parent], 0.5)[0]
    fresh = make(api + "/v1/json", seed=99)
    assert np.array_equal(fresh.regenerate(json.loads(json.dumps(parent.genotype))), parent.image)
    assert np.array_equal(fresh.regenerate(child.genotype, parent_image=parent.image), child.image)
    with pytest.raises(ValueError, match="needs parent_image"):
        fresh.regenerate(child.genotype)
    with pytest.raises(ValueError, match="endpoint"):
        make(api + "/v1/images").regenerate(parent.genotype)
    with pytest.raises(ValueError, match="not an HTTP API genotype"):
        fresh.regenerate({"seed": 1})


def test_i2i_child_resembles_parent_at_low_strength(api: str) -> None:
    gen = make(api + "/v1/images", seed=2)
    parents = gen.random(0, 4)
    children = gen.vary(parents, 0.1)
    last = get_json(api + "/last")["body"]
    assert last["strength"] == pytest.approx(0.1) and last["image_chars"] > 100
    unrelated = gen.random(0, 4)
    for parent, child, other in zip(parents, children, unrelated):
        assert child.parent_id == parent.candidate_id and child.round == 1 and child.label == 0
        g = child.genotype
        assert (
            g["mode"] == "i2i"
            and g["strength"] == pytest.approx(0.1)
            and g["parent_prompt"] == parent.genotype["prompt"]
        )
        assert np.abs(child.image - parent.image).mean() < 0.5 * np.abs(other.image - parent.image).mean()
    assert gen.vary(parents[:1], 0.0)[0].genotype["strength"] == MIN_STRENGTH
    with pytest.raises(ValueError, match="degree"):
        gen.vary(parents, 1.5)


def test_t2i_vary_uses_prompt_source_evolve(api: str) -> None:
    prompts = SuffixPrompts()
    gen = make(api + "/v1/images", task_mode="T2I", prompts=prompts, extra={"model": "fake-1", "seed": -1})
    parents = gen.random(1, 2)
    assert all(p.genotype["prompt"].startswith("dog #") for p in parents)
    children = gen.vary(parents, 0.3)
    assert prompts.evolved == [[p.genotype["prompt"] for p in parents]]
    for parent, child in zip(parents, children):
        assert child.genotype["prompt"] == parent.genotype["prompt"] + ", evolved"
        assert child.genotype["parent_prompt"] == parent.genotype["prompt"]
        assert child.genotype["mode"] == "t2i" and child.genotype["prompt_source"] == {"source": "suffix"}
        assert child.genotype["seed"] != parent.genotype["seed"]
    last = get_json(api + "/last")["body"]
    # extra fields reach the API, the generator's own fields win on a clash, no image in t2i
    assert last["prompt"] == children[-1].genotype["prompt"] and last["model"] == "fake-1"
    assert last["seed"] == children[-1].genotype["seed"] and last["image_chars"] == 0


@pytest.mark.parametrize("path", ["/garbage", "/broken", "/v1/json?style=none"])
def test_non_image_reply_is_a_one_line_error(api: str, path: str) -> None:
    gen = make(api + path)
    with pytest.raises(GeneratorLoadError, match=r"returned a non-image reply \(HTTP 200") as info:
        gen.random(0, 1)
    message = str(info.value)
    assert "\n" not in message and api + path in message
    assert "check generator.api_url and the API's reply format" in message
    if path == "/garbage":
        assert "content-type text/html: '<!DOCTYPE html> <html><body><h1>Welcome" in message
    assert isinstance(info.value, ModelLoadError)


def test_flaky_api_retried_then_succeeds(api: str) -> None:
    before = get_json(api + "/count")["paths"].get("/flaky", 0)
    fake = FakeTime()
    gen = make(api + "/flaky", retries=3, backoff_s=30.0, sleep=fake.sleep, clock=fake.clock)
    image = gen.random(0, 1)[0].image
    assert get_json(api + "/count")["paths"]["/flaky"] - before == 3
    assert fake.sleeps == []  # Retry-After: 0 is honoured instead of the 30 s / 60 s backoff
    assert np.array_equal(image, make(api + "/v1/images").random(0, 1)[0].image)


def test_retries_exhausted_and_exponential_backoff(api: str) -> None:
    fake = FakeTime()
    gen = make(api + "/flaky?status=429", seed=11, retries=1, sleep=fake.sleep, clock=fake.clock)
    with pytest.raises(GeneratorLoadError, match=r"failed after 2 attempts \(last: HTTP 429\)") as info:
        gen.random(0, 1)
    assert "\n" not in str(info.value)
    # a refused connection (nothing listens on the port once this socket is closed) backs off 0.5, 1, 2 s
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/images"
    fake = FakeTime()
    with pytest.raises(GeneratorLoadError, match=r"failed after 4 attempts \(last: .*(Refused|refused)"):
        make(dead, retries=3, backoff_s=0.5, sleep=fake.sleep, clock=fake.clock).random(0, 1)
    assert fake.sleeps == [0.5, 1.0, 2.0]


def test_client_error_fails_at_once(api: str) -> None:
    before = get_json(api + "/count")["paths"].get("/bad-request", 0)
    fake = FakeTime()
    with pytest.raises(GeneratorLoadError, match=r"rejected the request \(HTTP 400: .*unknown field"):
        make(api + "/bad-request", retries=3, sleep=fake.sleep, clock=fake.clock).random(0, 1)
    assert get_json(api + "/count")["paths"]["/bad-request"] - before == 1 and fake.sleeps == []


def test_slow_api_times_out_quickly(api: str) -> None:
    start = time.monotonic()
    with pytest.raises(GeneratorLoadError, match=r"failed after 1 attempt \(last: timed out after 0.3 s\)"):
        make(api + "/slow", timeout_s=0.3, retries=0).random(0, 1)
    assert time.monotonic() - start < 3.0


def test_refused_key_names_the_variable_not_the_key(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong-0000")
    gen = make(api + "/auth", api_key_env=KEY_ENV, retries=2)
    with pytest.raises(GeneratorLoadError, match=f"refused the key in {KEY_ENV} \\(HTTP 401\\)") as info:
        gen.random(0, 1)
    assert "sk-wrong-0000" not in str(info.value) and "sk-wrong-0000" not in repr(gen)
    monkeypatch.setenv(KEY_ENV, SERVER_KEY)
    cands = make(api + "/auth", api_key_env=KEY_ENV).random(0, 2)
    assert get_json(api + "/last")["authorized"] is True
    assert all(SERVER_KEY not in json.dumps(c.genotype) for c in cands)


def test_missing_key_env_fails_at_construction(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(GeneratorLoadError, match=f"set {KEY_ENV}=... or generator.api_key_env=''") as info:
        make(api + "/v1/images", api_key_env=KEY_ENV)
    assert "\n" not in str(info.value)
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(GeneratorLoadError, match=KEY_ENV):
        make(api + "/v1/images", api_key_env=KEY_ENV)


def test_rate_limit_spaces_request_starts(api: str) -> None:
    fake = FakeTime()
    gen = make(api + "/v1/images", requests_per_minute=30, sleep=fake.sleep, clock=fake.clock)
    gen.random(0, 3)
    assert fake.sleeps == [pytest.approx(2.0), pytest.approx(2.0)]
    fake.now += 1.5  # time passed since the last request counts towards the interval
    gen.random(0, 1)
    assert fake.sleeps[-1] == pytest.approx(0.5)
    fake.now += 10.0
    gen.random(0, 1)
    assert len(fake.sleeps) == 3
    unlimited = FakeTime()
    make(api + "/v1/images", requests_per_minute=0, sleep=unlimited.sleep, clock=unlimited.clock).random(0, 3)
    assert unlimited.sleeps == []


def test_invalid_arguments(api: str) -> None:
    with pytest.raises(ValueError, match="generator.api_url"):
        make("")
    with pytest.raises(ValueError, match="generator.api_url"):
        make("file:///etc/passwd")
    with pytest.raises(ValueError, match="task_mode"):
        make(api, task_mode="X")
    with pytest.raises(ValueError, match="requests_per_minute"):
        make(api, requests_per_minute=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        make(api, timeout_s=0)
    with pytest.raises(ValueError, match="extra"):
        make(api, extra={"x": object()})
    with pytest.raises(ValueError, match="label"):
        make(api).random(2, 1)
    with pytest.raises(ValueError, match="label of candidate"):
        make(api).vary([Candidate("x", 5, np.zeros((SIZE, SIZE), np.float32))], 0.5)


def test_built_from_the_run_config(api: str) -> None:
    """-sgen HTTP with generator.api_* keys reaches the same generator (key-less endpoint)."""
    from coautogen_fl.config import load_config
    from coautogen_fl.generation import build_generator

    cfg = load_config(
        overrides=[
            "generator.name=HTTP",
            f"generator.api_url={api}/v1/images",
            "generator.api_key_env=''",
            "data.image_size=16",
            "data.channels=3",
            "generator.api_retries=0",
        ]
    )
    generator = build_generator(cfg, ["cat", "dog"])
    assert isinstance(generator, HTTPImageGenerator)
    children = generator.vary(generator.random(1, 2), 0.3)
    assert [c.image.shape for c in children] == [(16, 16, 3)] * 2
    assert all(c.genotype["mode"] == "i2i" and c.genotype["prompt"] == "a photo of dog" for c in children)
