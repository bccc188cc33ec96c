"""Tests for coautogen_fl.downstream: shapes, learning, determinism, serialisation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coautogen_fl.downstream import (
    CLASSIFIERS,
    build_classifier,
    evaluate_classifier,
    images_to_tensor,
    load_numpy_state_dict,
    state_dict_to_numpy,
    train_and_evaluate,
    train_classifier,
)


def bars(n: int, seed: int, num_classes: int = 4, size: int = 28, channels: int = 0):
    """Class k = a bright horizontal bar in band k of the image, on a noisy dark background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    images = 0.1 + 0.05 * rng.standard_normal((n, size, size))
    band = size // num_classes
    for i, k in enumerate(labels):
        images[i, k * band + 1 : k * band + band - 1, :] += 0.8
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    if channels:
        images = np.repeat(images[..., None], channels, axis=-1)
    return images, labels


def batch(n: int, size: int, channels: int) -> np.ndarray:
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return np.random.default_rng(0).random(shape, dtype=np.float32)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 28), (1, 32), (3, 32)])
def test_output_shapes(name, channels, size):
    model = build_classifier(name, num_classes=5, channels=channels, image_size=size).eval()
    with torch.no_grad():
        out = model(images_to_tensor(batch(2, size, channels)))
    assert tuple(out.shape) == (2, 5)


def test_resnet18_stem_depends_on_image_size():
    small = build_classifier("resnet18", 3, channels=1, image_size=28)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = build_classifier("resnet18", 3, channels=3, image_size=64)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 3
    with torch.no_grad():
        assert tuple(large.eval()(images_to_tensor(batch(1, 64, 3))).shape) == (1, 3)


def test_images_to_tensor_layout_and_normalisation():
    imgs = np.zeros((2, 4, 5, 3), dtype=np.float32)
    imgs[1, 2, 3, 1] = 1.0
    t = images_to_tensor(imgs)
    assert tuple(t.shape) == (2, 3, 4, 5)
    assert t[1, 1, 2, 3].item() == 1.0 and t[0, 0, 0, 0].item() == -1.0
    assert tuple(images_to_tensor(np.full((3, 6, 6), 0.5, np.float32)).shape) == (3, 1, 6, 6)
    assert torch.all(images_to_tensor(np.full((1, 2, 2), 0.5, np.float32)) == 0.0)


def test_cnn_learns_separable_bars():
    x_tr, y_tr = bars(240, seed=1)
    x_te, y_te = bars(120, seed=2)
    model, acc = train_and_evaluate("cnn", x_tr, y_tr, x_te, y_te, 4, epochs=4, batch_size=32, seed=0)
    assert acc >= 0.95
    acc2, count = evaluate_classifier(model, x_te, y_te, batch_size=7)  # ragged last batch
    assert (acc2, count) == (acc, 120)


def test_cnn_learns_on_colour_images():
    x_tr, y_tr = bars(160, seed=3, num_classes=2, size=32, channels=3)
    x_te, y_te = bars(80, seed=4, num_classes=2, size=32, channels=3)
    _, acc = train_and_evaluate("cnn", x_tr, y_tr, x_te, y_te, 2, epochs=3, batch_size=32, seed=0)
    assert acc >= 0.95


def test_untrained_model_is_near_chance():
    # Guards the learning tests: the task must not be "solved" without training.
    x_te, y_te = bars(200, seed=2)
    model = build_classifier("cnn", 4, seed=0)
    acc, _ = evaluate_classifier(model, x_te, y_te)
    assert acc < 0.6


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_weights():
    x, y = bars(96, seed=5)
    kw = dict(epochs=2, batch_size=16)
    m1, acc1 = train_and_evaluate("cnn", x, y, x, y, 4, seed=7, **kw)
    m2, acc2 = train_and_evaluate("cnn", x, y, x, y, 4, seed=7, **kw)
    m3, _ = train_and_evaluate("cnn", x, y, x, y, 4, seed=8, **kw)
    assert _states_equal(state_dict_to_numpy(m1), state_dict_to_numpy(m2))
    assert acc1 == acc2
    assert not _states_equal(state_dict_to_numpy(m1), state_dict_to_numpy(m3))


def test_training_shuffle_depends_only_on_seed():
    # Same initial weights, different shuffle seeds -> different results; same -> equal.
    x, y = bars(64, seed=6)
    init = state_dict_to_numpy(build_classifier("cnn", 4, seed=0))
    results = []
    for seed in (1, 1, 2):
        model = build_classifier("cnn", 4)
        load_numpy_state_dict(model, init)
        results.append(state_dict_to_numpy(train_classifier(model, x, y, epochs=1, batch_size=8, seed=seed)))
    assert _states_equal(results[0], results[1])
    assert not _states_equal(results[0], results[2])


def test_training_leaves_global_rng_alone():
    x, y = bars(32, seed=7)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(build_classifier("cnn", 4, seed=0), x, y, epochs=1, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_numpy_state_dict_round_trip_cnn():
    x, y = bars(64, seed=8)
    trained = train_classifier(build_classifier("cnn", 4, seed=0), x, y, epochs=1, batch_size=16)
    arrays = state_dict_to_numpy(trained)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    fresh = build_classifier("cnn", 4, seed=99).eval()
    t = images_to_tensor(x)
    with torch.no_grad():
        before = fresh(t)
        load_numpy_state_dict(fresh, arrays)
        after, want = fresh(t), trained(t)
    assert not torch.equal(before, want)
    assert torch.equal(after, want)
    # The arrays are copies: mutating them later must not reach the model.
    arrays["7.bias"][:] = 1e6
    assert not np.array_equal(trained.state_dict()["7.bias"].numpy(), arrays["7.bias"])


def test_numpy_state_dict_round_trip_keeps_batchnorm_buffers():
    src = build_classifier("resnet18", 3, channels=1, image_size=28, seed=0)
    with torch.no_grad():
        src.train()(images_to_tensor(batch(4, 28, 1)))  # moves BN running stats
    src.eval()
    arrays = state_dict_to_numpy(src)
    assert int(arrays["bn1.num_batches_tracked"]) == 1
    dst = build_classifier("resnet18", 3, channels=1, image_size=28, seed=1).eval()
    load_numpy_state_dict(dst, arrays)
    probe = images_to_tensor(batch(3, 28, 1))
    with torch.no_grad():
        assert torch.equal(dst(probe), src(probe))


def test_load_rejects_missing_keys():
    arrays = state_dict_to_numpy(build_classifier("cnn", 4))
    arrays.pop("0.weight")
    with pytest.raises(RuntimeError, match="0.weight"):
        load_numpy_state_dict(build_classifier("cnn", 4), arrays)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="vgg") as err:
        build_classifier("vgg", 10)
    for name in CLASSIFIERS:
        assert name in str(err.value)


def test_length_mismatch_raises():
    x, y = bars(10, seed=9)
    model = build_classifier("cnn", 4)
    with pytest.raises(ValueError, match="mismatch"):
        train_classifier(model, x, y[:-1], epochs=1)
    with pytest.raises(ValueError, match="mismatch"):
        evaluate_classifier(model, x, y[:-1])


@pytest.mark.parametrize("bad", [4, -1])
def test_label_outside_range_raises(bad):
    x, y = bars(10, seed=9)
    y = y.copy()
    y[3] = bad
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\)"):
        train_classifier(build_classifier("cnn", 4), x, y, epochs=1)


def test_empty_data():
    model = build_classifier("cnn", 4)
    empty = np.zeros((0, 28, 28), np.float32)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(model, empty, np.zeros(0, np.int64), epochs=1)
    assert evaluate_classifier(model, empty, np.zeros(0, np.int64)) == (0.0, 0)


def test_bad_image_rank_raises():
    with pytest.raises(ValueError, match="shape"):
        images_to_tensor(np.zeros((28, 28), np.float32))


# --- volume-aware training ----------------------------------------------------------------
def test_derived_epochs_keep_the_training_steps_bounded_as_the_volume_grows():
    from coautogen_fl.downstream import derived_epochs

    assert derived_epochs(1000) == 30  # the issue-2 protocol: 30 epochs of 1,000 images
    assert derived_epochs(5000) == 6 and derived_epochs(10_000) == 3
    assert derived_epochs(50) == 30 and derived_epochs(10**6) == 3
    assert 5000 * derived_epochs(5000) == 1000 * derived_epochs(1000)


def test_augmentation_moves_the_glyph_and_keeps_the_background():
    import torch

    from coautogen_fl.downstream import augment_batch, images_to_tensor

    images = np.zeros((8, 28, 28), np.float32)
    images[:, 10:18, 12:16] = 1.0
    x = images_to_tensor(images)
    moved = augment_batch(x, torch.Generator().manual_seed(0), 1.0)
    assert moved.shape == x.shape
    assert torch.allclose(moved[:, :, :3, :3], x[:, :, :3, :3])  # corners stay background (-1)
    changed = (moved - x).abs().flatten(1).mean(1)
    assert (changed > 0.01).sum() >= 6  # nearly every image moved
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), 0.0), x)  # strength 0: unchanged
