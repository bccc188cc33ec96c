"""Tests of the embedders (pixels, ResNet-18) and the weights resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coautogen_fl.config import EmbedderConfig
from coautogen_fl.embedding import (
    RESNET18_FILE,
    Embedder,
    EmbedderError,
    PixelEmbedder,
    ResNet18Embedder,
    build_embedder,
    resolve_resnet18_weights,
    to_nchw,
)
from coautogen_fl.embedding.pixels import appearance_statistics
from coautogen_fl.rater import vote_histogram


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)


# --- pixels ---------------------------------------------------------------------------------


def test_pixel_embedder_shape_and_block_means(images):
    emb = PixelEmbedder(14, standardize=False)
    out = emb.embed(images)
    assert out.shape == (5, 14 * 14)
    assert out.dtype == np.float32
    # 28 -> 14 is an exact 2x2 average
    blocks = images.reshape(5, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(5, -1)
    np.testing.assert_allclose(out, blocks, atol=1e-6)


@pytest.mark.parametrize("size", [2, 7, 10])
def test_pixel_embedder_sizes(images, size):
    out = PixelEmbedder(size, standardize=False).embed(images)
    assert out.shape == (5, size * size)
    # area averaging preserves each image's mean brightness when the size divides 28
    if 28 % size == 0:
        np.testing.assert_allclose(out.mean(1), images.reshape(5, -1).mean(1), atol=1e-5)


def test_pixel_embedder_three_channel_input(images):
    rgb = np.stack([images, images * 0.5, np.zeros_like(images)], axis=-1)
    out = PixelEmbedder(7, standardize=False).embed(rgb)
    assert out.shape == (5, 3 * 7 * 7)
    per_channel = out.reshape(5, 3, 7 * 7)  # channel-major: (C, size, size) flattened
    grey = PixelEmbedder(7, standardize=False).embed(images)
    np.testing.assert_allclose(per_channel[:, 0], grey, atol=1e-6)
    np.testing.assert_allclose(per_channel[:, 1], grey * 0.5, atol=1e-6)
    np.testing.assert_array_equal(per_channel[:, 2], 0.0)


def test_pixel_embedder_is_robust_to_one_pixel_shifts(images):
    emb = PixelEmbedder(7, standardize=False)
    shifted = np.roll(images, 1, axis=2)
    near = np.linalg.norm(emb.embed(images) - emb.embed(shifted), axis=1)
    raw = np.linalg.norm((images - shifted).reshape(5, -1), axis=1)
    assert np.all(near < 0.5 * raw)


def test_to_nchw_rejects_bad_shapes():
    assert to_nchw(np.zeros((2, 4, 4))).shape == (2, 1, 4, 4)
    assert to_nchw(np.zeros((2, 4, 4, 3))).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"got \(4, 4\)"):
        to_nchw(np.zeros((4, 4)))


def test_build_embedder_pixels_and_unknown():
    emb = build_embedder(EmbedderConfig(name="pixels", pixel_size=5))
    assert isinstance(emb, PixelEmbedder)
    assert isinstance(emb, Embedder)
    assert emb.size == 5
    with pytest.raises(EmbedderError, match="embedder.name='clipp' is not valid; use one of pixels, resnet18, clip"):
        build_embedder(EmbedderConfig(name="clipp"))


# --- ResNet-18 ------------------------------------------------------------------------------


def test_resnet18_random_weights_gives_512_features(images):
    emb = ResNet18Embedder(random_weights=True, batch_size=2)  # batches of 2: 3 chunks for 5 images
    assert isinstance(emb, Embedder)
    out = emb.embed(images)
    assert out.shape == (5, 512)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    # chunking does not change features: each image embeds the same alone (eval mode)
    np.testing.assert_allclose(emb.embed(images[2:3])[0], out[2], rtol=1e-4, atol=1e-5)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    np.testing.assert_allclose(emb.embed(rgb), out, rtol=1e-4, atol=1e-5)  # grey = 3 equal channels


def test_missing_weights_path_names_path_and_key(tmp_path):
    missing = tmp_path / "weights" / "resnet.pth"
    with pytest.raises(EmbedderError) as info:
        resolve_resnet18_weights(str(missing))
    assert str(missing) in str(info.value)
    assert "embedder.weights" in str(info.value)
    with pytest.raises(EmbedderError, match="embedder.weights"):
        build_embedder(EmbedderConfig(name="resnet18", weights=str(missing)))


def test_default_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / RESNET18_FILE
    with pytest.raises(EmbedderError) as info:
        resolve_resnet18_weights("")
    assert str(expected) in str(info.value)
    expected.parent.mkdir()
    expected.write_bytes(b"")
    assert resolve_resnet18_weights("") == expected


def test_weights_file_loads_through_the_real_path(tmp_path, images):
    from torchvision.models import resnet18

    torch.manual_seed(123)
    reference = resnet18(weights=None)
    state = reference.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    emb = build_embedder(EmbedderConfig(name="resnet18", weights=str(path), batch_size=4))
    assert isinstance(emb, ResNet18Embedder)
    features = emb.embed(images)

    # the same state dict built by hand, with the documented preprocessing
    reference.fc = torch.nn.Identity()
    reference.eval()
    batch = torch.as_tensor(images).unsqueeze(1).expand(-1, 3, -1, -1)
    batch = F.interpolate(batch, size=64, mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((batch - mean) / std).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

    # and the loaded weights matter: another initialisation embeds differently
    torch.manual_seed(7)
    other = ResNet18Embedder(random_weights=True).embed(images)
    assert np.abs(other - features).max() > 1e-2


def _stroke(intensity: float, width: int) -> np.ndarray:
    """One 28x28 vertical bar (a "1") of the given ink intensity and width."""
    image = np.zeros((28, 28), dtype=np.float32)
    image[4:24, 14 - width // 2 : 14 - width // 2 + width] = intensity
    return image


def test_appearance_statistics_measure_intensity_contrast_ink_share_and_noise():
    flat = np.full((1, 28, 28), 0.5, dtype=np.float32)
    checker = (np.indices((28, 28)).sum(0) % 2).astype(np.float32)[None]
    stats = appearance_statistics(to_nchw(np.concatenate([flat, checker]))).numpy()
    np.testing.assert_allclose(stats[0], [0.5, 0.0, 0.0, 0.0], atol=1e-6)  # grey: no contrast, no ink, no noise
    np.testing.assert_allclose(stats[1, :3], [0.5, 0.5, 0.5], atol=1e-6)
    assert 0.44 < stats[1, 3] < 0.46  # all high frequency: 4/9 from each 3x3 mean inside the frame


def test_appearance_lets_votes_follow_ink_that_standardized_shapes_ignore():
    """A bright, thick private stroke votes for the bright, thick candidate of the same shape only
    when the appearance statistics are on: standardised shapes cannot tell the two apart."""
    private = _stroke(1.0, 4)[None]
    candidates = np.stack([_stroke(0.3, 2), _stroke(1.0, 4)])  # faint and thin first: wins ties
    shape_only = PixelEmbedder(14)
    with_ink = build_embedder(EmbedderConfig(name="pixels", appearance=1.0))
    assert with_ink.embed(private).shape == (1, 14 * 14 + 4)
    assert shape_only.embed(candidates).shape == (2, 14 * 14)
    labels = np.zeros(1, dtype=np.int64)
    votes = vote_histogram(with_ink.embed(private), labels, with_ink.embed(candidates), np.zeros(2, dtype=np.int64))
    np.testing.assert_array_equal(votes, [0.0, 1.0])
    distances = ((shape_only.embed(candidates) - shape_only.embed(private)) ** 2).sum(1)
    assert distances[1] < 1e-6 and distances[0] < 0.3  # shape only: both near, no intensity seen


def test_negative_appearance_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="embedder.appearance must be >= 0"):
        PixelEmbedder(14, appearance=-1.0)


def test_a_file_that_is_not_a_resnet18_state_dict_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        ResNet18Embedder(weights=str(path))


def test_standardized_pixels_have_zero_mean_unit_norm_and_ignore_ink_intensity():
    rng = np.random.default_rng(0)
    images = rng.random((6, 28, 28)).astype(np.float32)
    emb = PixelEmbedder(14, standardize=True)
    out = emb.embed(images)
    np.testing.assert_allclose(out.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # a fainter copy of the same shape embeds to the same vector (votes follow shape, not ink)
    np.testing.assert_allclose(emb.embed(0.4 * images + 0.1), out, atol=1e-5)
    assert not np.allclose(
        PixelEmbedder(14, standardize=False).embed(0.4 * images), PixelEmbedder(14, standardize=False).embed(images)
    )
