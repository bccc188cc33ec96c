"""Tests of the CLIP embedder and the CLIP class filter on a tiny random-weight CLIP model.

The model and processor are built in code (tests/tiny_clip.py), saved with ``save_pretrained`` to
a temp folder, and loaded back through ``load_clip``: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from coautogen_fl.embedding.base import Embedder, EmbedderError  # noqa: E402
from coautogen_fl.embedding.clip import CLIPEmbedder, CLIPFilter, load_clip  # noqa: E402
from coautogen_fl.generation.base import Candidate  # noqa: E402
from coautogen_fl.hub import ModelLoadError  # noqa: E402

from tiny_clip import TINY_CLIP_PROJECTION_DIM, build_tiny_clip  # noqa: E402

NAMES = ["cat", "dog"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="module")
def loaded(clip_folder):
    return load_clip(clip_folder)


@pytest.fixture(scope="module")
def embedder(loaded) -> CLIPEmbedder:
    return CLIPEmbedder(loaded, batch_size=64)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).random((6, 40, 40, 3)).astype(np.float32)


def _candidates(images: np.ndarray, labels: list[int]) -> list[Candidate]:
    return [Candidate(f"c{i}", label, image) for i, (image, label) in enumerate(zip(images, labels))]


# --- loading --------------------------------------------------------------------------------


def test_load_clip_round_trips_the_saved_model(clip_folder, loaded):
    model, processor = loaded
    assert type(model).__name__ == "CLIPModel" and type(processor).__name__ == "CLIPProcessor"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.projection_dim == TINY_CLIP_PROJECTION_DIM


def _assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_missing_folder_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(EmbedderError, match="does not exist") as exc:
        load_clip(str(tmp_path / "nowhere"), config_key="embedder.model")
    _assert_one_line(exc, "embedder.model")


def test_folder_that_is_not_clip_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(str(folder))
    with pytest.raises(EmbedderError, match="not a CLIP model") as exc:
        load_clip(str(folder), config_key="filter.clip_model")
    _assert_one_line(exc, "bert", "filter.clip_model")


def test_unknown_hub_id_offline_is_one_line():
    with pytest.raises(EmbedderError, match="not found locally") as exc:
        load_clip("nobody-xyz/no-such-clip-model", config_key="embedder.model")
    _assert_one_line(exc, "nobody-xyz/no-such-clip-model", "embedder.model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_embedder_error(clip_folder):
    with pytest.raises(EmbedderError, match="CUDA is not available") as exc:
        CLIPEmbedder(clip_folder, device="cuda")
    assert isinstance(exc.value, ModelLoadError)
    _assert_one_line(exc, "device=cpu")


# --- embedder -------------------------------------------------------------------------------


def test_embedder_loads_by_folder_and_gives_unit_rows(clip_folder, rgb):
    emb = CLIPEmbedder(clip_folder)
    assert isinstance(emb, Embedder) and emb.name == "clip"
    out = emb.embed(rgb)
    assert out.shape == (6, TINY_CLIP_PROJECTION_DIM)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # distinct images, distinct features
    assert np.abs(out[0] - out[1]).max() > 1e-4


def test_embed_matches_the_model_on_processed_pixels(embedder, loaded, rgb):
    model, processor = loaded
    pixels = processor(images=list(rgb), do_rescale=False, input_data_format="channels_last", return_tensors="pt")[
        "pixel_values"
    ]
    # the processor normalises [0, 1] pixels (no second /255): values are O(1), not O(1e-3)
    assert pixels.abs().max() > 0.5
    with torch.no_grad():
        raw = model.get_image_features(pixel_values=pixels)
    raw = raw if isinstance(raw, torch.Tensor) else raw.pooler_output
    expected = torch.nn.functional.normalize(raw, dim=1).numpy()
    np.testing.assert_allclose(embedder.embed(rgb), expected, atol=1e-5)


def test_grayscale_equals_its_rgb_copy(embedder):
    gray = np.random.default_rng(1).random((3, 28, 28)).astype(np.float32)
    out_gray = embedder.embed(gray)
    np.testing.assert_allclose(out_gray, embedder.embed(np.repeat(gray[..., None], 3, axis=-1)), atol=1e-6)
    np.testing.assert_allclose(out_gray, embedder.embed(gray[..., None]), atol=1e-6)
    assert out_gray.shape == (3, TINY_CLIP_PROJECTION_DIM)


def test_any_size_is_resized_by_the_processor(embedder):
    for side in (8, 32, 97):
        images = np.random.default_rng(side).random((2, side, side, 3)).astype(np.float32)
        out = embedder.embed(images)
        assert out.shape == (2, TINY_CLIP_PROJECTION_DIM) and np.isfinite(out).all()


def test_embed_is_deterministic_and_batch_size_independent(loaded, embedder, rgb):
    first = embedder.embed(rgb)
    np.testing.assert_array_equal(first, embedder.embed(rgb))
    one_by_one = CLIPEmbedder(loaded, batch_size=1, progress=True).embed(rgb)
    np.testing.assert_allclose(one_by_one, first, atol=1e-5)


def test_embed_rejects_bad_shapes_and_handles_empty(embedder):
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, H, W, 3\)"):
        embedder.embed(np.zeros((2, 8, 8, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        CLIPEmbedder((embedder.model, embedder.processor), batch_size=0)
    assert embedder.embed(np.zeros((0, 8, 8), dtype=np.float32)).shape == (0, TINY_CLIP_PROJECTION_DIM)


# --- filter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_filter(loaded) -> CLIPFilter:
    return CLIPFilter(loaded, NAMES)


def test_filter_probabilities_are_rows_of_a_softmax(clip_filter, rgb):
    assert clip_filter.name == "clip_filter"
    assert clip_filter.text_features.shape == (2, TINY_CLIP_PROJECTION_DIM)
    np.testing.assert_allclose(np.linalg.norm(clip_filter.text_features, axis=1), 1.0, atol=1e-5)
    probs = clip_filter.probabilities(rgb)
    assert probs.shape == (6, 2) and probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # the same as CLIP's own logits_per_image, soft-maxed
    model, processor = clip_filter.embedder.model, clip_filter.embedder.processor
    inputs = processor(
        text=clip_filter.prompts,
        images=list(rgb),
        do_rescale=False,
        input_data_format="channels_last",
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_filter_prompts_and_settings(clip_folder):
    filt = CLIPFilter(clip_folder, ["cat", "dog", "owl"], template="a drawing of a {name}")
    assert filt.prompts == ["a drawing of a cat", "a drawing of a dog", "a drawing of a owl"]
    assert filt.settings() == {
        "model": clip_folder,
        "template": "a drawing of a {name}",
        "threshold": pytest.approx(1 / 3),
    }
    assert CLIPFilter(clip_folder, NAMES, threshold=0.8).settings()["threshold"] == 0.8


def test_keep_passes_own_class_and_fails_other(clip_filter, embedder, rgb, monkeypatch):
    # class 0 "is" image 0 and class 1 "is" image 1: each image must pass with its own label
    # (its cosine to itself is 1, the largest possible) and fail with the other one (C = 2)
    monkeypatch.setattr(clip_filter, "text_features", embedder.embed(rgb[:2]))
    monkeypatch.setattr(clip_filter, "logit_scale", 100.0)
    pool = _candidates(np.stack([rgb[0], rgb[1], rgb[0], rgb[1]]), [0, 1, 1, 0])
    np.testing.assert_array_equal(clip_filter.keep(pool), [True, True, False, False])
    scores = clip_filter.scores(pool)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert scores[0] > 0.5 > scores[2]
    np.testing.assert_allclose(scores[0] + scores[2], 1.0, atol=1e-6)


def test_keep_is_exactly_own_probability_above_one_over_c(loaded, monkeypatch):
    filt = CLIPFilter(loaded, ["a", "b", "c", "d"])
    assert filt.threshold == 0.25
    eps = 1e-4
    table = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],  # exactly chance: not above it
            [0.25 + eps, 0.25 - eps, 0.25, 0.25],
            [0.25 - eps, 0.25 + eps, 0.25, 0.25],
            [0.1, 0.1, 0.7, 0.1],
        ],
        dtype=np.float32,
    )
    monkeypatch.setattr(filt, "probabilities", lambda images: table[: len(images)])
    pool = _candidates(np.zeros((4, 8, 8), dtype=np.float32), [0, 0, 0, 2])
    np.testing.assert_array_equal(filt.keep(pool), [False, True, False, True])
    np.testing.assert_allclose(filt.scores(pool), [0.25, 0.25 + eps, 0.25 - eps, 0.7], atol=1e-7)
    # a higher threshold is used as given
    strict = CLIPFilter(loaded, ["a", "b", "c", "d"], threshold=0.5)
    monkeypatch.setattr(strict, "probabilities", lambda images: table[: len(images)])
    np.testing.assert_array_equal(strict.keep(pool), [False, False, False, True])


def test_filter_argument_errors(loaded, clip_filter, rgb):
    with pytest.raises(ValueError, match="at least two"):
        CLIPFilter(loaded, ["cat"])
    with pytest.raises(ValueError, match="template"):
        CLIPFilter(loaded, NAMES, template="a photo of {label}")
    with pytest.raises(ValueError, match="threshold"):
        CLIPFilter(loaded, NAMES, threshold=1.0)
    with pytest.raises(ValueError, match="label 2 is outside the 2 classes"):
        clip_filter.keep(_candidates(rgb[:1], [2]))
    assert clip_filter.keep([]).shape == (0,)
