"""coautogen_fl/dpsgd.py: per-example clipping, calibration with opacus' PRV accountant, and
noise no configured seed can reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coautogen_fl.downstream import build_classifier, state_dict_to_numpy
from coautogen_fl.dpsgd import DPSGDSettings, dp_train, entropy_generator, noise_for_epsilon, public_steps
from coautogen_fl.privacy import epsilon_for_releases

RNG = np.random.default_rng(0)
IMAGES = RNG.random((40, 12, 12), dtype=np.float32)
LABELS = RNG.integers(0, 3, 40)


def trained(settings: DPSGDSettings, images=IMAGES, labels=LABELS) -> dict[str, np.ndarray]:
    model = build_classifier("cnn", 3, 1, 12, seed=0)
    torch.manual_seed(0)  # a configured seed everywhere: it must not reach the noise
    np.random.seed(0)
    return state_dict_to_numpy(dp_train(model, images, labels, settings))


def test_two_runs_with_the_same_seeds_give_different_noised_weights():
    settings = DPSGDSettings(noise_multiplier=1.0, sample_rate=0.5, steps=2, lr=1e-2)
    a, b = trained(settings), trained(settings)
    assert all(a[k].shape == b[k].shape for k in a)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    # Not only the sampling: with every example in every step, the noise alone differs.
    full = DPSGDSettings(noise_multiplier=1.0, sample_rate=1.0, steps=1, lr=1e-2, optimizer="sgd")
    a, b = trained(full), trained(full)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert entropy_generator().initial_seed() != entropy_generator().initial_seed()


def test_each_example_gradient_is_clipped():
    """SGD at lr 1 on the noised sum, noise ~0: the step is at most n * max_grad_norm long."""
    before = state_dict_to_numpy(build_classifier("cnn", 3, 1, 12, seed=0))
    settings = DPSGDSettings(
        noise_multiplier=1e-9, sample_rate=1.0, steps=1, max_grad_norm=0.01, lr=1.0, optimizer="sgd"
    )
    after = trained(settings)
    moved = np.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    assert 0 < moved <= len(LABELS) * 0.01 * (1 + 1e-4)


def test_an_empty_site_still_steps_on_noise():
    settings = DPSGDSettings(noise_multiplier=1.0, sample_rate=0.5, steps=2, lr=1e-2)
    before = state_dict_to_numpy(build_classifier("cnn", 3, 1, 12, seed=0))
    after = trained(settings, IMAGES[:0], LABELS[:0])
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_noise_for_epsilon_spends_the_target_with_prv():
    sigma = noise_for_epsilon(1.0, 1e-5, 0.25, 20)
    spent = epsilon_for_releases([(sigma, 0.25, 20)], 1e-5)
    assert 0.995 <= spent <= 1.0
    assert epsilon_for_releases([(sigma * 0.98, 0.25, 20)], 1e-5) > 1.0  # not a needlessly large noise


@pytest.mark.parametrize(
    "field,value", [("noise_multiplier", 0.0), ("sample_rate", 1.5), ("steps", 0), ("optimizer", "lbfgs")]
)
def test_settings_out_of_range_are_rejected(field, value):
    settings = {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 1, field: value}
    with pytest.raises(ValueError, match=field):
        DPSGDSettings(**settings).validate()


def test_public_steps_are_reproducible_under_their_seed():
    runs = []
    for _ in range(2):
        model = build_classifier("cnn", 3, 1, 12, seed=0)
        runs.append(state_dict_to_numpy(public_steps(model, IMAGES, LABELS, steps=3, lr=1e-2, batch_size=8, seed=5)))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_model_with_batchnorm_is_refused_before_anything_runs():
    from coautogen_fl.config import ConfigError, load_config
    from coautogen_fl.dpsgd import check_private_model

    with pytest.raises(ValueError, match="per-example"):
        check_private_model(build_classifier("resnet18", 3, 1, 12))
    check_private_model(build_classifier("cnn", 3, 1, 12))
    with pytest.raises(ConfigError, match="downstream.model=cnn"):
        load_config(overrides=["feedback.task_type=real", "downstream.model=resnet18"])
    with pytest.raises(ConfigError, match="privacy.unit=image"):
        load_config(overrides=["feedback.task_type=mix", "privacy.unit=site"])
