"""Tests of the diffusers generator on a tiny random-weight Stable Diffusion pipeline.

The pipeline is built in code (tests/tiny_diffusers.py), saved with ``save_pretrained`` to a temp
folder, and loaded back through the generator's real loading path: nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from coautogen_fl.generation.base import Candidate, Generator  # noqa: E402
from coautogen_fl.generation.diffusion import (  # noqa: E402
    GENOTYPE_KEYS,
    MIN_STRENGTH,
    DiffusersGenerator,
    GeneratorLoadError,
    load_text2image,
)

from tiny_diffusers import build_tiny_pipeline  # noqa: E402

NAMES = ["cat", "dog"]
SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd"))


def make(model_dir: str, **overrides: object) -> DiffusersGenerator:
    kwargs = {"image_size": SIZE, "num_inference_steps": 2, "batch_size": 4, "seed": 0}
    kwargs.update(overrides)
    return DiffusersGenerator(model_dir, NAMES, **kwargs)


@pytest.fixture(scope="module")
def gen(model_dir: str) -> DiffusersGenerator:
    return make(model_dir)


def mean_sq(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.mark.parametrize("channels, shape", [(1, (SIZE, SIZE)), (3, (SIZE, SIZE, 3))])
def test_random_shapes_dtype_range(model_dir: str, channels: int, shape: tuple) -> None:
    g = make(model_dir, channels=channels)
    assert isinstance(g, Generator)
    cands = g.random(1, 5)  # two batches of 4 + 1
    assert len(cands) == 5
    assert len({c.candidate_id for c in cands}) == 5
    for c in cands:
        assert isinstance(c, Candidate)
        assert c.image.shape == shape and c.image.dtype == np.float32
        assert 0.0 <= c.image.min() and c.image.max() <= 1.0 and c.image.std() > 0
        assert c.label == 1 and c.parent_id is None and c.round == 0
        assert set(GENOTYPE_KEYS) <= set(c.genotype)
        assert c.genotype["prompt"] == "a photo of dog"
        assert c.genotype["mode"] == "t2i" and c.genotype["steps"] == 2
        assert c.genotype["model"] == model_dir
        json.dumps(c.index_entry())
    assert len({c.genotype["seed"] for c in cands}) == 5
    assert g.random(0, 0) == []


def test_prompt_template_and_label_checks(model_dir: str) -> None:
    g = make(model_dir, prompt_template="a drawing of the digit {name}")
    assert g.random(0, 1)[0].genotype["prompt"] == "a drawing of the digit cat"
    with pytest.raises(ValueError, match="label"):
        g.random(2, 1)
    with pytest.raises(ValueError, match="n must be"):
        g.random(0, -1)
    with pytest.raises(ValueError, match="prompt_template"):
        make(model_dir, prompt_template="a photo of {label}")
    with pytest.raises(ValueError, match="task_mode"):
        make(model_dir, task_mode="X2Y")
    with pytest.raises(ValueError, match="channels"):
        make(model_dir, channels=2)


def test_deterministic_under_seed(model_dir: str) -> None:
    a, b, other = make(model_dir, seed=7), make(model_dir, seed=7), make(model_dir, seed=8)
    ca, cb, co = a.random(0, 3), b.random(0, 3), other.random(0, 3)
    for x, y in zip(ca, cb):
        assert x.candidate_id == y.candidate_id and x.genotype == y.genotype
        np.testing.assert_array_equal(x.image, y.image)
    va, vb = a.vary(ca, 0.5), b.vary(cb, 0.5)
    for x, y in zip(va, vb):
        assert x.genotype == y.genotype
        np.testing.assert_array_equal(x.image, y.image)
    assert [c.genotype["seed"] for c in co] != [c.genotype["seed"] for c in ca]
    assert all(mean_sq(x.image, y.image) > 1e-4 for x, y in zip(ca, co))


def test_regenerate_round_trip(model_dir: str, gen: DiffusersGenerator) -> None:
    single = make(model_dir, batch_size=1)  # batch of one: bit-exact
    parents = single.random(0, 2)
    for c in parents:
        np.testing.assert_array_equal(single.regenerate(c.genotype), c.image)
    for child, parent in zip(single.vary(parents, 0.3), parents):
        np.testing.assert_array_equal(single.regenerate(child.genotype, parent.image), child.image)
    # Batched: equal up to float rounding (kernels accumulate in a batch-size-dependent order).
    batched = gen.random(1, 3)
    for c in batched:
        np.testing.assert_allclose(gen.regenerate(c.genotype), c.image, atol=1e-4)
    with pytest.raises(ValueError, match="parent_image"):
        single.regenerate(single.vary(parents[:1], 0.3)[0].genotype)
    with pytest.raises(ValueError, match="not a diffusers genotype"):
        gen.regenerate({"font": "DejaVuSans"})


def test_i2i_low_strength_stays_near_parent(gen: DiffusersGenerator) -> None:
    parents = gen.random(0, 4)
    children = gen.vary(parents, 0.1)
    fresh = gen.random(0, 4)
    near = np.mean([mean_sq(c.image, p.image) for c, p in zip(children, parents)])
    far = np.mean([mean_sq(f.image, p.image) for f, p in zip(fresh, parents)])
    assert near < 0.5 * far  # tiny model: ~0.006 vs ~0.054
    for child, parent in zip(children, parents):
        assert child.parent_id == parent.candidate_id and child.label == parent.label
        assert child.round == parent.round + 1
        assert child.genotype["mode"] == "i2i" and child.genotype["strength"] == pytest.approx(0.1)
        assert child.genotype["prompt"] == parent.genotype["prompt"]
        assert child.genotype["seed"] != parent.genotype["seed"]
        assert int(child.genotype["steps"] * child.genotype["strength"]) >= 1
    zero = gen.vary(parents[:1], 0.0)[0]
    assert zero.genotype["strength"] == pytest.approx(MIN_STRENGTH)


def test_i2i_from_grayscale_parent(model_dir: str) -> None:
    g = make(model_dir, channels=1)
    parents = g.random(1, 2)
    children = g.vary(parents, 0.5)
    assert all(c.image.shape == (SIZE, SIZE) for c in children)


def test_t2i_vary_keeps_prompt(model_dir: str) -> None:
    g = make(model_dir, task_mode="T2I")
    parents = g.random(1, 3)
    parents[0].genotype["prompt"] = "an evolved prompt"
    children = g.vary(parents, 0.7)
    for child, parent in zip(children, parents):
        assert child.genotype["prompt"] == parent.genotype["prompt"]
        assert child.genotype["mode"] == "t2i" and "strength" not in child.genotype
        assert child.genotype["seed"] != parent.genotype["seed"]
        assert child.parent_id == parent.candidate_id and child.label == 1
        np.testing.assert_allclose(g.regenerate(child.genotype), child.image, atol=1e-4)


@pytest.mark.parametrize("degree", [-0.1, 1.5, math.nan, "0.5"])
def test_bad_degree(gen: DiffusersGenerator, degree: object) -> None:
    parents = [Candidate("p", 0, np.zeros((SIZE, SIZE, 3), np.float32), {"prompt": "x"})]
    with pytest.raises(ValueError, match="degree"):
        gen.vary(parents, degree)  # type: ignore[arg-type]


def test_progress_bar(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    g = make(model_dir, progress=True, batch_size=1)
    g.random(0, 2)
    assert "batch" in capsys.readouterr().err


def test_missing_folder(tmp_path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(GeneratorLoadError, match="does not exist") as info:
        load_text2image(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(GeneratorLoadError, match="does not exist"):
        DiffusersGenerator("./no-such-model-dir", NAMES)


def test_folder_without_pipeline(tmp_path) -> None:
    with pytest.raises(GeneratorLoadError, match="model_index.json"):
        load_text2image(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "coautogen-test-org/no-such-diffusion-model"
    with pytest.raises(GeneratorLoadError) as info:
        DiffusersGenerator(model, NAMES)
    message = str(info.value)
    assert model in message and f"huggingface-cli download {model}" in message
    assert "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(model_dir: str) -> None:
    with pytest.raises(GeneratorLoadError, match="CUDA is not available"):
        make(model_dir, device="cuda")
    with pytest.raises(GeneratorLoadError, match="cuda:1"):
        load_text2image(model_dir, device="cuda:1")


def test_loaded_pipeline_settings(gen: DiffusersGenerator) -> None:
    assert gen.pipe.dtype == torch.float32
    assert getattr(gen.pipe, "safety_checker", None) is None
    assert gen.native_size() == 64
    # The image-to-image pipeline shares the text-to-image weights (no second load).
    assert gen.i2i.unet is gen.pipe.unet and gen.i2i.vae is gen.pipe.vae


class VariantPrompts:
    """A fake prompt source: numbered fresh prompts, children append " variant"."""

    def __init__(self) -> None:
        self.evolved: list[tuple[list[str], list[int]]] = []

    def sample(self, label: int, rng: np.random.Generator) -> str:
        return f"{NAMES[label]} number {int(rng.integers(1000))}"

    def evolve(self, prompts, labels, rng: np.random.Generator) -> list[str]:
        self.evolved.append((list(prompts), list(labels)))
        return [p + " variant" for p in prompts]

    def settings(self) -> dict:
        return {"source": "fake"}


def test_prompt_source_sample_and_evolve(model_dir: str) -> None:
    g = make(model_dir, task_mode="T2I", batch_size=1)
    default = g.random(0, 1)[0]
    assert default.genotype["prompt_source"] == {"source": "template", "template": "a photo of {name}"}
    g.prompts = VariantPrompts()  # replaceable after construction, as the run's prompt wiring does
    parents = g.random(1, 2)
    assert all(p.genotype["prompt"].startswith("dog number ") for p in parents)
    assert all(p.genotype["prompt_source"] == {"source": "fake"} for p in parents)
    assert g.prompt(1) == "a photo of dog"  # the template prompt stays available
    children = g.vary(parents, 0.5)
    assert g.prompts.evolved == [([p.genotype["prompt"] for p in parents], [1, 1])]
    for child, parent in zip(children, parents):
        assert child.genotype["prompt"] == parent.genotype["prompt"] + " variant"
        assert child.genotype["parent_prompt"] == parent.genotype["prompt"]
        assert child.genotype["prompt_source"] == {"source": "fake"}
        np.testing.assert_array_equal(g.regenerate(child.genotype), child.image)
    # Same seed and source: same prompts (drawn from the generator's rng), same pixels.
    twin = make(model_dir, task_mode="T2I", batch_size=1)
    twin.random(0, 1)
    twin.prompts = VariantPrompts()
    assert [c.genotype for c in twin.random(1, 2)] == [c.genotype for c in parents]


def test_i2i_keeps_parent_prompt(model_dir: str) -> None:
    source = VariantPrompts()
    g = make(model_dir, prompts=source)
    parents = g.random(0, 2)
    children = g.vary(parents, 0.3)
    assert source.evolved == []  # image-to-image children keep their parent's prompt
    assert [c.genotype["prompt"] for c in children] == [p.genotype["prompt"] for p in parents]
    assert all(c.genotype["mode"] == "i2i" and "parent_prompt" not in c.genotype for c in children)
    with pytest.raises(ValueError, match="prompts must have sample"):
        make(model_dir, prompts="a photo of {name}")


def test_token_counting(gen: DiffusersGenerator) -> None:
    assert gen.token_limit == 77
    assert gen.count_tokens("") == 2  # start and end tokens
    short, long = gen.count_tokens("a cat"), gen.count_tokens("a photo of a cat " * 30)
    assert short == len(gen.pipe.tokenizer("a cat").input_ids) and short < gen.token_limit < long
