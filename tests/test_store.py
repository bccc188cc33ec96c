"""Tests of the synthetic store: ImageFolder layout, JSONL index, atomic rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from coautogen_fl.data import load_image_folder
from coautogen_fl.generation.base import Candidate
from coautogen_fl.store import SyntheticStore, load_stored_images, read_index, safe_dirname, to_uint8

CLASSES = ("zero", "one", "two")


def make_candidates(n_per_class: int, round_index: int = 1, seed: int = 0, shape=(8, 8)) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    out = []
    for label in range(len(CLASSES)):
        for i in range(n_per_class):
            out.append(
                Candidate(
                    candidate_id=f"r{round_index}-c{label}-{i}",
                    label=label,
                    image=rng.random(shape).astype(np.float32),
                    genotype={"font": "DejaVuSans", "rotation": float(i), "resolution": 8},
                    parent_id=None if round_index == 0 else f"p{label}-{i}",
                    round=round_index,
                    votes=float(i) * 0.5 if i % 2 == 0 else None,
                )
            )
    return out


def test_write_round_makes_imagefolder_layout_and_index(tmp_path):
    store = SyntheticStore(tmp_path / "run", CLASSES)
    candidates = make_candidates(4, round_index=2)
    folder = store.write_round(2, candidates)
    assert folder == tmp_path / "run" / "rounds" / "round_002"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(CLASSES)
    for name in CLASSES:
        assert len(list((folder / name).glob("*.png"))) == 4
    entries = read_index(folder)
    assert len(entries) == 12
    by_id = {e["id"]: e for e in entries}
    for c in candidates:
        e = by_id[c.candidate_id]
        assert set(e) == {"id", "label", "genotype", "parent", "round", "votes", "file"}
        assert e["label"] == c.label
        assert e["genotype"] == c.genotype
        assert e["parent"] == c.parent_id
        assert e["round"] == 2
        assert e["votes"] == c.votes
        assert e["file"] == f"{CLASSES[c.label]}/{c.candidate_id}.png"
        assert (folder / e["file"]).is_file()
    # each line is one JSON object
    lines = (folder / "index.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line) for line in lines)
    # nothing left behind in the staging area
    assert [p.name for p in folder.parent.iterdir()] == ["round_002"]


def test_written_round_is_a_loadable_imagefolder(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    folder = store.write_round(1, make_candidates(3))
    data = load_image_folder(folder, image_size=8)
    # ImageFolder sorts classes by name: one, two, zero
    assert data.class_names == ("one", "two", "zero")
    np.testing.assert_array_equal(np.bincount(data.labels), [3, 3, 3])


def test_write_final_makes_the_synthetic_folder(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    candidates = make_candidates(5, round_index=4)
    folder = store.write_final(candidates)
    assert folder == tmp_path / "synthetic"
    assert sum(1 for _ in folder.rglob("*.png")) == 15
    assert [e["id"] for e in read_index(folder)] == [c.candidate_id for c in candidates]
    assert not (tmp_path / ".synthetic.tmp").exists()


def test_load_stored_images_round_trip(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    candidates = make_candidates(3)
    candidates[0].image = np.zeros((8, 8), np.float32)
    candidates[1].image = np.full((8, 8), 2.0, np.float32)  # out of range: clipped to 1
    folder = store.write_round(1, candidates)
    images, labels = load_stored_images(folder)
    assert images.shape == (9, 8, 8)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(labels, [c.label for c in candidates])
    expected = np.stack([np.clip(c.image, 0, 1) for c in candidates])
    assert np.abs(images - expected).max() <= 0.5 / 255 + 1e-6  # rounded, not truncated
    np.testing.assert_array_equal(images[1], 1.0)


def test_colour_images_round_trip(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    candidates = make_candidates(2, shape=(6, 6, 3))
    images, _ = load_stored_images(store.write_round(1, candidates))
    assert images.shape == (6, 6, 6, 3)
    assert np.abs(images - np.stack([c.image for c in candidates])).max() <= 1 / 255


def test_to_uint8_rounds_to_nearest():
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 1.0, 0.5, 0.999, -1.0, 1 / 255])), [0, 255, 128, 255, 0, 1])


def test_stale_staging_folder_from_a_crash_is_replaced(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    staging = tmp_path / "rounds" / ".round_003.tmp"
    (staging / "zero").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(staging / "zero" / "half-written.png")
    (staging / "index.jsonl").write_text('{"id": "half-written"}\n')
    assert not store.round_dir(3).exists()  # a crashed round is absent, not half there

    folder = store.write_round(3, make_candidates(2, round_index=3))
    assert not staging.exists()
    assert not (folder / "zero" / "half-written.png").exists()
    assert sum(1 for _ in folder.rglob("*.png")) == 6
    assert "half-written" not in [e["id"] for e in read_index(folder)]
    assert len(read_index(folder)) == 6


def test_rewriting_a_round_replaces_it_whole(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    store.write_round(1, make_candidates(4, seed=0))
    second = make_candidates(1, seed=1)
    for c in second:
        c.candidate_id = "new-" + c.candidate_id
    folder = store.write_round(1, second)
    assert sum(1 for _ in folder.rglob("*.png")) == 3
    assert [e["id"] for e in read_index(folder)] == [c.candidate_id for c in second]
    # other rounds are untouched
    store.write_round(2, make_candidates(2))
    store.write_round(1, second)
    assert len(read_index(store.round_dir(2))) == 6


def test_colliding_class_names_raise(tmp_path):
    with pytest.raises(ValueError, match="class names collide as folder names"):
        SyntheticStore(tmp_path, ["a b", "a_b"])
    with pytest.raises(ValueError, match="collide"):
        SyntheticStore(tmp_path, ["cat", "cat"])


def test_safe_dirname():
    assert safe_dirname("7") == "7"
    assert safe_dirname("traffic light") == "traffic_light"
    assert safe_dirname("../etc") == "etc"
    assert safe_dirname("..") == "class"
    assert safe_dirname("a/b") == "a_b"


def test_unsafe_class_names_stay_inside_the_run_dir(tmp_path):
    store = SyntheticStore(tmp_path / "run", ["../escape", "ok"])
    folder = store.write_round(1, [Candidate("x", 0, np.zeros((4, 4), np.float32))])
    assert (folder / "escape" / "x.png").is_file()
    assert not (tmp_path / "escape").exists()
