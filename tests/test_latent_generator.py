"""The latent generator (GANs and any G(z) / G(z, class)) on tiny random-weight modules built in
code (tests/tiny_latent_models.py): images, sampling, variations, vote learning, regeneration.
Loading from files is tested in tests/test_latent_loading.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coautogen_fl.generation.base import Candidate, Generator, GeneratorLoadError  # noqa: E402
from coautogen_fl.generation.distribution import vote_weights  # noqa: E402
from coautogen_fl.generation.latent import LatentGenerator  # noqa: E402

from tiny_latent_models import (  # noqa: E402
    LATENT_DIM,
    NAMES,
    NUM_CLASSES,
    build_conditional,
    build_conditional_rgb,
    build_sigmoid,
    build_unconditional,
    make,
    reference_output,
)


def _z(candidate: Candidate) -> np.ndarray:
    return np.asarray(candidate.genotype["z"], dtype=np.float64)


def _with_z(z, label: int = 0, votes: float | None = None, cid: str = "x") -> Candidate:
    z = np.asarray(z, dtype=np.float32)
    return Candidate(
        cid,
        label,
        np.zeros((16, 16), np.float32),
        {"model": "tiny", "z": [float(v) for v in z], "label": label},
        votes=votes,
    )


# --- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("build", [build_conditional, build_conditional_rgb, build_unconditional])
@pytest.mark.parametrize("size", [8, 28])
def test_shapes_and_ranges(build, channels: int, size: int) -> None:
    gen = LatentGenerator(build(), NAMES, image_size=size, channels=channels)
    candidates = gen.random(2, 5)
    expected = (size, size) if channels == 1 else (size, size, 3)
    for c in candidates:
        assert c.label == 2 and c.parent_id is None and c.round == 0
        assert c.image.shape == expected and c.image.dtype == np.float32
        assert 0.0 <= c.image.min() and c.image.max() <= 1.0
        assert c.image.std() > 0.01  # not a constant image
    assert not np.array_equal(candidates[0].image, candidates[1].image)


def test_output_range_is_mapped_to_unit_range_and_channels_converted() -> None:
    module = build_unconditional()  # 3 x 8 x 8 in [-1, 1]
    gen = LatentGenerator(module, NAMES, image_size=8, channels=1)
    c = gen.random(0, 1)[0]
    rgb = (reference_output(module, np.asarray([c.genotype["z"]], dtype=np.float32), None)[0] + 1) / 2
    np.testing.assert_allclose(c.image, rgb.mean(axis=0), atol=1e-6)
    gen3 = LatentGenerator(module, NAMES, image_size=8, channels=3)
    c3 = gen3.random(0, 1)[0]
    rgb3 = (reference_output(module, np.asarray([c3.genotype["z"]], dtype=np.float32), None)[0] + 1) / 2
    np.testing.assert_allclose(c3.image, np.moveaxis(rgb3, 0, -1), atol=1e-6)


def test_sigmoid_output_range_and_explicit_latent_dim() -> None:
    module = build_sigmoid()
    with pytest.raises(GeneratorLoadError, match="set generator.latent_dim"):
        LatentGenerator(module, NAMES, image_size=16)
    gen = LatentGenerator(module, NAMES, image_size=16, latent_dim=4, output_range=(0.0, 1.0))
    c = gen.random(1, 1)[0]
    raw = reference_output(module, np.asarray([c.genotype["z"]], dtype=np.float32), None)[0, 0]
    np.testing.assert_allclose(c.image, raw, atol=1e-6)
    gray = LatentGenerator(module, NAMES, image_size=16, latent_dim=4, channels=3, output_range=(0.0, 1.0))
    image = gray.random(1, 1)[0].image
    assert image.shape == (16, 16, 3) and np.array_equal(image[..., 0], image[..., 2])


class _Spy(nn.Module):
    """Records what the wrapped generator is called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.latent_dim = getattr(inner, "latent_dim", getattr(inner, "nz", None))
        self.calls: list[tuple] = []

    def forward(self, z, *rest):
        self.calls.append((z.clone(), *[r.clone() for r in rest]))
        return self.inner(z, *rest)


def test_conditional_generator_gets_int64_labels_and_unconditional_only_z() -> None:
    spy = _Spy(build_conditional())
    gen = make(spy, conditional=True, batch_size=4)
    candidates = gen.random(2, 3)
    _, labels = spy.calls[-1]
    assert labels.dtype == torch.int64 and labels[:3].tolist() == [2, 2, 2]
    children = gen.vary([candidates[0], gen.random(1, 1)[0]], 0.3)
    _, labels = spy.calls[-1]
    assert labels[:2].tolist() == [c.label for c in children] == [2, 1]
    uspy = _Spy(build_unconditional())
    ugen = LatentGenerator(uspy, NAMES, image_size=8, conditional=False)
    assert [c.label for c in ugen.random(1, 2)] == [1, 1]  # the label is kept: the votes decide
    assert all(len(call) == 1 for call in uspy.calls)


def test_conditional_is_detected_from_the_module() -> None:
    assert make().conditional is True
    assert LatentGenerator(build_unconditional(), NAMES, image_size=8).conditional is False


def test_every_forward_pass_has_batch_size_rows() -> None:
    spy = _Spy(build_conditional())
    gen = make(spy, conditional=True, batch_size=4)
    gen.random(0, 6)
    assert [call[0].shape[0] for call in spy.calls[1:]] == [4, 4]  # after the start-up probe


# --- genotypes, ids, determinism, regenerate ----------------------------------------------------


def test_genotype_ids_and_json() -> None:
    gen = make()
    candidates = gen.random(1, 3)
    assert [c.candidate_id for c in candidates] == ["latent-0000000", "latent-0000001", "latent-0000002"]
    g = candidates[0].genotype
    assert g["model"] == "tiny" and g["op"] == "sample" and g["label"] == 1
    assert len(g["z"]) == LATENT_DIM and all(isinstance(v, float) for v in g["z"])
    json.dumps([c.index_entry() for c in candidates])
    assert isinstance(gen, Generator)
    assert gen.random(0, 0) == []


def _run(seed: int) -> list[Candidate]:
    gen = make(seed=seed, batch_size=4)
    first = gen.random(0, 5) + gen.random(1, 5)
    for i, c in enumerate(first):
        c.votes = float(i % 5)
    gen.fit(first, vote_weights(np.array([c.votes for c in first]), np.array([c.label for c in first])))
    return first + gen.vary(first, 0.5) + gen.random(0, 3)


def test_same_seed_same_candidates() -> None:
    a, b = _run(3), _run(3)
    assert [c.candidate_id for c in a] == [c.candidate_id for c in b]
    assert [c.genotype for c in a] == [c.genotype for c in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [c.genotype["z"] for c in _run(4)] != [c.genotype["z"] for c in a]


def test_regenerate_is_exact_for_samples_and_children() -> None:
    gen = make(batch_size=5, channels=3, image_size=20)
    candidates = gen.random(0, 7) + gen.random(2, 4)
    candidates += gen.vary(candidates, 0.4)
    other = make(seed=9, batch_size=64, channels=3, image_size=20)  # batch shape comes from the genotype
    for c in candidates:
        genotype = json.loads(json.dumps(c.genotype))
        assert np.array_equal(gen.regenerate(genotype), c.image), c.candidate_id
        assert np.array_equal(other.regenerate(genotype), c.image), c.candidate_id


def test_regenerate_rejects_foreign_genotypes() -> None:
    gen = make()
    with pytest.raises(ValueError, match="not a latent genotype"):
        gen.regenerate({"font": "DejaVuSans"})
    genotype = dict(gen.random(0, 1)[0].genotype)
    with pytest.raises(ValueError, match="made by model 'other'"):
        gen.regenerate({**genotype, "model": "other"})
    with pytest.raises(ValueError, match="not 8 finite numbers"):
        gen.regenerate({**genotype, "z": [0.0, 1.0]})


# --- vary --------------------------------------------------------------------------------------


def test_children_keep_label_and_link_to_their_parent() -> None:
    gen = make()
    parents = gen.random(0, 3) + gen.random(2, 2)
    for p in parents:
        p.round = 2
    children = gen.vary(parents, 0.5)
    assert len(children) == len(parents)
    for parent, child in zip(parents, children):
        assert child.label == parent.label and child.parent_id == parent.candidate_id and child.round == 3
        assert child.genotype["op"] in ("perturb", "interpolate", "direction")
        assert child.genotype["parents"][0] == parent.candidate_id
        assert child.genotype["label"] == parent.label


def test_small_degree_stays_nearer_the_parent_than_a_fresh_sample() -> None:
    gen = make(seed=1)
    parents = gen.random(1, 20)
    fresh = gen.random(1, 20)
    for operations in (("perturb",), ("perturb", "interpolate", "direction")):
        g = make(seed=2, operations=operations)
        children = g.vary(parents, 0.1)
        dz_child = np.mean([np.linalg.norm(_z(c) - _z(p)) for c, p in zip(children, parents)])
        dz_fresh = np.mean([np.linalg.norm(_z(f) - _z(p)) for f, p in zip(fresh, parents)])
        dx_child = np.mean([np.linalg.norm(c.image - p.image) for c, p in zip(children, parents)])
        dx_fresh = np.mean([np.linalg.norm(f.image - p.image) for f, p in zip(fresh, parents)])
        assert dz_child < 0.3 * dz_fresh and dx_child < 0.5 * dx_fresh


def test_degree_zero_keeps_z_and_pixels() -> None:
    gen = make()
    parents = gen.random(0, 4)
    children = gen.vary(parents, 0.0)
    for p, c in zip(parents, children):
        assert c.genotype["z"] == p.genotype["z"] and np.array_equal(c.image, p.image)


def test_perturb_step_scales_with_degree_and_perturb_scale() -> None:
    gen = make(seed=1)
    parents = gen.random(0, 40)
    for scale in (0.5, 2.0):
        children = make(seed=5, perturb_scale=scale, operations=("perturb",)).vary(parents, 0.5)
        steps = np.stack([_z(c) - _z(p) for c, p in zip(children, parents)])
        assert steps.std() == pytest.approx(0.5 * scale, rel=0.15)
        assert all(c.genotype["sigma"] == pytest.approx(0.5 * scale) for c in children)


def test_interpolate_lands_between_parents_of_the_same_label() -> None:
    gen = make(seed=3, operations=("interpolate",))
    parents = gen.random(0, 2) + gen.random(1, 3)
    by_id = {p.candidate_id: p for p in parents}
    children = gen.vary(parents, 0.8)
    for parent, child in zip(parents, children):
        g = child.genotype
        assert g["op"] == "interpolate" and len(g["parents"]) == 2 and g["parents"][0] == parent.candidate_id
        other = by_id[g["parents"][1]]
        assert other.label == parent.label and other.candidate_id != parent.candidate_id
        t = g["t"]
        assert 0.0 <= t <= 0.8
        expected = _z(parent) + t * (_z(other) - _z(parent))
        np.testing.assert_allclose(_z(child), expected, atol=1e-5)
        # between: on the segment, no farther from either end than the ends are apart
        span = np.linalg.norm(_z(other) - _z(parent))
        assert np.linalg.norm(_z(child) - _z(parent)) <= span * 0.8 + 1e-5
        assert np.linalg.norm(_z(child) - _z(other)) <= span + 1e-5


def test_interpolate_needs_a_partner_and_falls_back_to_perturb() -> None:
    gen = make(operations=("interpolate",))
    parent = gen.random(0, 1)[0]
    lone = gen.vary([parent, gen.random(1, 1)[0], parent], 0.5)  # the same candidate twice is no partner
    assert [c.genotype["op"] for c in lone] == ["perturb"] * 3


def test_direction_steps_along_the_learned_direction() -> None:
    gen = make(seed=4, operations=("direction",))
    parents = gen.random(0, 4)
    assert all(c.genotype["op"] == "perturb" for c in gen.vary(parents, 0.5))  # nothing learned yet
    for i, p in enumerate(parents):
        p.votes = float(i)
    gen.observe_votes(parents)
    direction = gen.directions[0]
    children = gen.vary(parents, 0.5)
    for parent, child in zip(parents, children):
        g = child.genotype
        assert g["op"] == "direction" and g["step"] > 0
        np.testing.assert_allclose(g["direction"], direction, atol=1e-7)
        np.testing.assert_allclose(_z(child) - _z(parent), g["step"] * direction, atol=1e-5)
        # a step as long as a perturbation of the same degree: about 0.5 * sqrt(latent_dim)
        assert 0.2 * np.sqrt(LATENT_DIM) < g["step"] < 1.0 * np.sqrt(LATENT_DIM)


def test_all_operations_occur_with_the_default_operations() -> None:
    gen = make(seed=6)
    parents = gen.random(0, 8)
    for i, p in enumerate(parents):
        p.votes = float(i)
    gen.observe_votes(parents)
    ops = {c.genotype["op"] for c in gen.vary(parents * 3, 0.5)}
    assert ops == {"perturb", "interpolate", "direction"}


def test_vary_rejects_foreign_parents_and_bad_degrees() -> None:
    gen = make()
    glyph = Candidate("glyph-0000000", 0, np.zeros((16, 16), np.float32), {"font": "DejaVuSans"})
    with pytest.raises(ValueError, match="no latent genotype"):
        gen.vary([glyph], 0.5)
    with pytest.raises(ValueError, match="degree"):
        gen.vary(gen.random(0, 1), 1.5)
    with pytest.raises(ValueError, match="label"):
        gen.random(3, 1)


# --- learning from votes -----------------------------------------------------------------------


def test_observe_votes_points_from_low_to_high_voted() -> None:
    gen = make()
    rng = np.random.default_rng(0)
    target = np.zeros(LATENT_DIM)
    target[2] = 1.0
    voted = []
    for i in range(16):
        z = rng.standard_normal(LATENT_DIM) * 0.1 + (i / 15) * 3 * target  # higher votes further along e2
        voted.append(_with_z(z, label=1, votes=float(i), cid=f"c{i}"))
    voted.append(_with_z(rng.standard_normal(LATENT_DIM), label=1, votes=None, cid="unvoted"))
    gen.observe_votes(voted)
    assert set(gen.directions) == {1}
    d = gen.directions[1]
    assert np.linalg.norm(d) == pytest.approx(1.0) and float(d @ target) > 0.95


def test_observe_votes_needs_four_voted_per_class() -> None:
    gen = make()
    voted = [_with_z(np.full(LATENT_DIM, i), label=0, votes=float(i), cid=f"a{i}") for i in range(3)]
    voted += [_with_z(np.full(LATENT_DIM, i), label=2, votes=None, cid=f"b{i}") for i in range(6)]
    gen.observe_votes(voted)
    assert gen.directions == {}
    gen.directions[0] = np.eye(LATENT_DIM)[0]
    gen.observe_votes(voted)  # too few again: the old direction of class 0 is dropped
    assert gen.directions == {}


def test_fit_moves_the_mean_toward_high_weight_z() -> None:
    gen = make(seed=0)
    target = np.linspace(-2, 2, LATENT_DIM)
    good = [_with_z(target + 0.01 * k, label=0, cid=f"g{k}") for k in range(4)]
    bad = [_with_z(-target, label=0, cid=f"b{k}") for k in range(4)]
    weights = np.array([1.0] * 4 + [0.0] * 4)
    gen.fit(good + bad, weights, mix=0.8, min_spread=0.05)
    np.testing.assert_allclose(gen.mean[0], 0.8 * (target + 0.015), atol=1e-5)
    np.testing.assert_allclose(gen.std[0], 0.8 * 0.01118 + 0.2, atol=1e-4)  # blended toward the prior std 1
    assert np.array_equal(gen.mean[1], np.zeros(LATENT_DIM)) and np.array_equal(gen.std[1], np.ones(LATENT_DIM))
    samples = np.stack([_z(c) for c in gen.random(0, 400)])
    np.testing.assert_allclose(samples.mean(axis=0), gen.mean[0], atol=0.05)
    # mix 1 on identical z's: the std collapses onto the floor, not to zero
    gen.fit(good[:1] * 3, np.ones(3), mix=1.0, min_spread=0.05)
    np.testing.assert_allclose(gen.std[0], 0.05)
    np.testing.assert_allclose(gen.mean[0], _z(good[0]), atol=1e-6)
    samples = np.stack([_z(c) for c in gen.random(0, 400)])
    assert samples.std(axis=0) == pytest.approx(np.full(LATENT_DIM, 0.05), rel=0.15)


def test_fit_with_zero_weights_keeps_the_distribution_and_learns_directions() -> None:
    gen = make()
    voted = gen.random(2, 8)
    for i, c in enumerate(voted):
        c.votes = float(i)
    gen.fit(voted, np.zeros(8))
    assert np.array_equal(gen.mean, np.zeros((NUM_CLASSES, LATENT_DIM))) and np.array_equal(
        gen.std, np.ones((NUM_CLASSES, LATENT_DIM))
    )
    assert set(gen.directions) == {2}  # fit also observes the votes
    with pytest.raises(ValueError, match="one per candidate"):
        gen.fit(voted, np.zeros(3))
    with pytest.raises(ValueError, match=">= 0"):
        gen.fit(voted, -np.ones(8))
    with pytest.raises(ValueError, match="mix"):
        gen.fit(voted, np.ones(8), mix=1.5)


# --- construction errors -----------------------------------------------------------------------


def test_wrong_latent_dim_fails_at_start_up() -> None:
    with pytest.raises(GeneratorLoadError, match="failed on z of shape \\(2, 5\\).*generator.latent_dim") as info:
        make(latent_dim=5)
    assert "\n" not in str(info.value)


def test_more_class_names_than_the_generator_knows() -> None:
    with pytest.raises(GeneratorLoadError, match="knows 3 classes but the run has 4"):
        LatentGenerator(build_conditional(), NAMES + ["three"])


def test_non_image_output_is_rejected() -> None:
    class Flat(nn.Module):
        latent_dim = 4

        def forward(self, z):
            return z

    with pytest.raises(GeneratorLoadError, match=r"returned \(2, 4\).*\(N, C, H, W\)"):
        LatentGenerator(Flat(), NAMES)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": 2}, "channels"),
        ({"image_size": 4}, "image_size"),
        ({"output_range": (1.0, -1.0)}, "output_range"),
        ({"perturb_scale": -1.0}, "perturb_scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"operations": ("jump",)}, "operations"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_progress_bar_runs() -> None:
    assert len(make(progress=True, batch_size=2).random(0, 3)) == 3
