"""Tests of inpainting variations and the upscaler stage on tiny random-weight pipelines.

Every pipeline (text-to-image, 9-channel inpainting, x4 upscaler, x2 latent upscaler) is built
in code (tests/tiny_diffusers.py), saved with ``save_pretrained`` to a temp folder and loaded
back through the real loading path: nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from coautogen_fl.generation.base import Candidate, GeneratorLoadError  # noqa: E402
from coautogen_fl.generation.diffusion import DiffusersGenerator  # noqa: E402
from coautogen_fl.generation.imageops import resize, to_output  # noqa: E402
from coautogen_fl.generation.inpaint import check_mask, mask_fraction, mask_image, random_mask  # noqa: E402
from coautogen_fl.generation.postprocess import PostProcessedGenerator  # noqa: E402
from coautogen_fl.generation.upscale import Upscaler  # noqa: E402

from tiny_diffusers import (  # noqa: E402
    build_tiny_inpaint_pipeline,
    build_tiny_latent_upscaler,
    build_tiny_pipeline,
    build_tiny_upscaler,
)

NAMES = ["cat", "dog"]
SIZE = 32
UP = 64


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "t2i": str(build_tiny_pipeline(root / "sd")),
        "inpaint": str(build_tiny_inpaint_pipeline(root / "sd-inpaint")),
        "x4": str(build_tiny_upscaler(root / "x4")),
        "latent": str(build_tiny_latent_upscaler(root / "x2-latent")),
    }


def make(dirs: dict[str, str], **overrides: object) -> DiffusersGenerator:
    kwargs = {"image_size": SIZE, "num_inference_steps": 2, "batch_size": 4, "seed": 0, "inpaint": 1.0}
    kwargs.update(overrides)
    return DiffusersGenerator(dirs["t2i"], NAMES, **kwargs)


@pytest.fixture(scope="module")
def parents(dirs: dict[str, str]) -> list[Candidate]:
    return make(dirs, seed=3).random(0, 4)


def mean_sq(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


# -- the mask rule -------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [0.0, 0.3, 1.0])
def test_mask_area_grows_with_degree(degree: float) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0, x1, y1 = random_mask(rng, degree)
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert (x1 - x0) * (y1 - y0) == pytest.approx(0.1 + 0.4 * degree)
    assert mask_fraction(degree) == pytest.approx(0.1 + 0.4 * degree)
    assert random_mask(np.random.default_rng(5), degree) == random_mask(np.random.default_rng(5), degree)


def test_mask_image_hard_and_feathered() -> None:
    hard = mask_image([0.25, 0.5, 0.75, 1.0], 8)
    expected = np.zeros((8, 8), np.float32)
    expected[4:8, 2:6] = 1.0  # rows from y, columns from x
    np.testing.assert_array_equal(hard, expected)
    soft = mask_image([0.0, 0.0, 1.0, 1.0], 8, feather=2)
    assert soft[0, 0] == pytest.approx(0.25) and soft[0, 4] == pytest.approx(0.5) and soft[4, 4] == 1.0
    assert check_mask((0, 0.1, 0.5, 1)) == [0.0, 0.1, 0.5, 1.0]
    for bad in ([0.5, 0, 0.4, 1], [0, 0, 1], [0, 0, 1.2, 1], "box"):
        with pytest.raises(ValueError, match=r"\[x0, y0, x1, y1\]"):
            check_mask(bad)


# -- inpainting variations -----------------------------------------------------------------


def test_inpaint_dedicated_model(dirs: dict[str, str], parents: list[Candidate]) -> None:
    g = make(dirs, inpaint_model=dirs["inpaint"], batch_size=1)  # batch of one: bit-exact regenerate
    assert g.inpainter.unet.config.in_channels == 9
    children = g.vary(parents[:3], 0.5)
    fresh = g.random(0, 3)
    inside_change, outside_change = [], []
    for child, parent, other in zip(children, parents, fresh):
        assert child.image.shape == (SIZE, SIZE, 3) and child.image.dtype == np.float32
        assert 0.0 <= child.image.min() and child.image.max() <= 1.0
        geno = child.genotype
        assert geno["mode"] == "inpaint" and geno["inpaint_model"] == dirs["inpaint"]
        assert geno["strength"] == pytest.approx(0.5) and geno["prompt"] == parent.genotype["prompt"]
        x0, y0, x1, y1 = check_mask(geno["mask"])
        assert (x1 - x0) * (y1 - y0) == pytest.approx(0.1 + 0.4 * 0.5)
        assert geno["prompt_source"] == {"source": "template", "template": "a photo of {name}"}
        assert child.parent_id == parent.candidate_id and child.round == parent.round + 1
        json.dumps(child.index_entry())
        assert mean_sq(child.image, parent.image) < 0.5 * mean_sq(other.image, parent.image)
        inside = mask_image(geno["mask"], SIZE) > 0
        change = (child.image - parent.image) ** 2
        inside_change.append(change[inside].mean())
        outside_change.append(change[~inside].mean())
        np.testing.assert_array_equal(g.regenerate(geno, parent.image), child.image)
    assert np.mean(outside_change) < 0.1 * np.mean(inside_change) and np.mean(inside_change) > 1e-4
    with pytest.raises(ValueError, match="needs parent_image"):
        g.regenerate(children[0].genotype)
    with pytest.raises(ValueError, match="inpaint_model"):
        make(dirs).regenerate(children[0].genotype, parents[0].image)  # from_pipe, not the 9-channel model


def test_inpaint_from_pipe_and_mixed_modes(dirs: dict[str, str], parents: list[Candidate]) -> None:
    a, b = make(dirs, inpaint=0.5, seed=1), make(dirs, inpaint=0.5, seed=1)
    assert a.inpainter.unet is a.pipe.unet and a.inpainter.vae is a.pipe.vae  # same weights, no second load
    children = a.vary(parents, 0.3)
    assert {c.genotype["mode"] for c in children} == {"i2i", "inpaint"}  # p = 0.5: both kinds (seed 1)
    for x, y, parent in zip(children, b.vary(parents, 0.3), parents):
        assert x.genotype == y.genotype
        np.testing.assert_array_equal(x.image, y.image)
        assert x.image.shape == (SIZE, SIZE, 3)
        assert mean_sq(x.image, parent.image) < 0.02
        # Regenerated in a batch of one instead of two: equal up to float rounding.
        np.testing.assert_allclose(a.regenerate(x.genotype, parent.image), x.image, atol=1e-4)
    gray = make(dirs, channels=1)
    child = gray.vary([parents[0]], 1.0)[0]
    assert child.image.shape == (SIZE, SIZE) and child.genotype["mode"] == "inpaint"
    outside = mask_image(child.genotype["mask"], SIZE) == 0
    np.testing.assert_allclose(child.image[outside], to_output(parents[0].image, SIZE, 1)[outside], atol=1e-6)


def test_inpaint_errors(dirs: dict[str, str], tmp_path) -> None:
    missing = tmp_path / "no-inpaint-model"
    with pytest.raises(GeneratorLoadError, match="generator.inpaint_model") as info:
        make(dirs, inpaint_model=str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="inpaint must be a probability"):
            make(dirs, inpaint=bad)
    g = make(dirs)
    genotype = {
        "prompt": "x",
        "seed": 1,
        "steps": 2,
        "guidance": 7.5,
        "mode": "inpaint",
        "model": dirs["t2i"],
        "strength": 0.5,
        "inpaint_model": "",
        "mask": [0.5, 0.0, 0.2, 1.0],
    }
    with pytest.raises(ValueError, match="mask"):
        g.regenerate(genotype, np.zeros((SIZE, SIZE), np.float32))


# -- the upscaler --------------------------------------------------------------------------


def check_upscaled(out: list[Candidate], inputs: list[Candidate], up: Upscaler) -> None:
    assert len(out) == len(inputs)
    for new, old in zip(out, inputs):
        assert new is not old and old.image.shape[0] == SIZE  # the inputs are untouched
        assert new.image.shape == (UP, UP) + old.image.shape[2:] and new.image.dtype == np.float32
        assert 0.0 <= new.image.min() and new.image.max() <= 1.0 and new.image.std() > 0
        assert (new.candidate_id, new.label, new.parent_id, new.round, new.votes) == (
            old.candidate_id,
            old.label,
            old.parent_id,
            old.round,
            old.votes,
        )
        params = new.genotype["upscale"]
        assert {k: params[k] for k in ("model", "steps", "strength", "size")} == {
            "model": up.model,
            "steps": 2,
            "strength": up.strength,
            "size": UP,
        }
        assert {k: v for k, v in new.genotype.items() if k != "upscale"} == old.genotype
        json.dumps(new.index_entry())
    assert len({c.genotype["upscale"]["seed"] for c in out}) == len(out)


# diffusers' Euler scheduler (the latent upscaler's) still calls np.array(tensor, copy=False).
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize(
    "which, pipeline", [("x4", "StableDiffusionUpscalePipeline"), ("latent", "StableDiffusionLatentUpscalePipeline")]
)
def test_super_resolution(dirs: dict[str, str], parents: list[Candidate], which: str, pipeline: str) -> None:
    up = Upscaler(dirs[which], UP, steps=2, batch_size=1, seed=4)
    assert up.route == "super-resolution" and type(up.pipe).__name__ == pipeline
    gray = [Candidate("g", 1, to_output(parents[0].image, SIZE, 1), {"font": "x"}, None, 2, 3.0)]
    inputs = parents[:2] + gray
    out = up.apply(inputs)
    check_upscaled(out, inputs, up)
    for new, old in zip(out, inputs):  # batch of one: bit-exact
        np.testing.assert_array_equal(up.reapply(old.image, new.genotype), new.image)
    again = Upscaler(dirs[which], UP, steps=2, batch_size=2, seed=4).apply(inputs)
    other = Upscaler(dirs[which], UP, steps=2, batch_size=2, seed=5).apply(inputs)
    for x, y, z in zip(out, again, other):
        assert x.genotype == y.genotype and x.genotype["upscale"]["seed"] != z.genotype["upscale"]["seed"]
        np.testing.assert_allclose(x.image, y.image, atol=1e-4)
    with pytest.raises(ValueError, match="not made through an Upscaler"):
        up.reapply(parents[0].image, parents[0].genotype)


def test_img2img_route(dirs: dict[str, str], parents: list[Candidate]) -> None:
    up = Upscaler(dirs["t2i"], UP, steps=2, strength=0.3, batch_size=4)
    assert up.route == "img2img" and type(up.pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    out = up.apply(parents)
    check_upscaled(out, parents, up)
    for new, old in zip(out, parents):
        bicubic = resize(old.image, UP)
        assert mean_sq(new.image, bicubic) < 0.02  # a refinement of the resized image
        np.testing.assert_allclose(up.reapply(old.image, new.genotype), new.image, atol=1e-4)
    plain = Upscaler(dirs["t2i"], UP, strength=0.0).apply(parents[:1])[0]
    np.testing.assert_allclose(plain.image, resize(parents[0].image, UP), atol=1e-6)


def test_upscaler_as_stage(dirs: dict[str, str]) -> None:
    inner = make(dirs, inpaint=0.0, batch_size=1)
    wrapped = PostProcessedGenerator(inner, [Upscaler(dirs["x4"], UP, steps=2, batch_size=1)])
    fresh = wrapped.random(1, 1)[0]
    assert fresh.image.shape == (UP, UP, 3) and "upscale" in fresh.genotype
    np.testing.assert_array_equal(wrapped.regenerate(fresh.genotype), fresh.image)


def test_upscaler_errors(dirs: dict[str, str], tmp_path) -> None:
    missing = tmp_path / "no-upscaler"
    with pytest.raises(GeneratorLoadError, match="postprocess.upscaler") as info:
        Upscaler(str(missing), UP)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    with pytest.raises(GeneratorLoadError, match="DDPMPipeline: neither a super-resolution") as info:
        Upscaler(str(tmp_path / "ddpm"), UP)
    assert "postprocess.upscaler" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="strength"):
        Upscaler(dirs["x4"], UP, strength=1.5)
    with pytest.raises(ValueError, match="size"):
        Upscaler(dirs["x4"], 4)
    up = Upscaler(dirs["x4"], UP, steps=2)
    genotype = {"upscale": {"model": "elsewhere", "steps": 2, "strength": 0.3, "seed": 1, "size": UP}}
    with pytest.raises(ValueError, match="upscaled by 'elsewhere'"):
        up.reapply(np.zeros((SIZE, SIZE), np.float32), genotype)
