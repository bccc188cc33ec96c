"""`coautogen export RUN_DIR --format imagefolder|hf`: the final dataset, review decisions honoured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from simulations.cli import main as cli_main


@pytest.fixture
def run_dir(tmp_path):
    """A run directory's final dataset as coautogen_fl/store.py writes it: 2 classes, 3 images."""
    run = tmp_path / "run"
    entries = [("a-1", 0, "cat"), ("a-2", 0, "cat"), ("b-1", 1, "dog")]
    for i, (image_id, label, name) in enumerate(entries):
        (run / "synthetic" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * (i + 1), dtype=np.uint8)).save(
            run / "synthetic" / name / f"{image_id}.png"
        )
    with open(run / "synthetic" / "index.jsonl", "w") as index:
        for image_id, label, name in entries:
            index.write(
                json.dumps(
                    {
                        "id": image_id,
                        "label": label,
                        "genotype": {"font": "x", "size": label},
                        "parent": None,
                        "round": 2,
                        "votes": 1.5,
                        "file": f"{name}/{image_id}.png",
                    }
                )
                + "\n"
            )
    return run


def test_imagefolder_export_honours_rejections_and_relabels(run_dir, capsys):
    (run_dir / "review.json").write_text(
        json.dumps({"decisions": {"a-1": {"status": "reject"}, "a-2": {"status": "accept", "label": 1}}})
    )
    assert cli_main(["export", str(run_dir)]) == 0
    out = run_dir / "export-imagefolder"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["dog/a-2.png", "dog/b-1.png"]
    assert (out / "cat").is_dir()  # every class keeps its folder, also when emptied
    assert "2 images (imagefolder)" in capsys.readouterr().out


def test_hf_export_loads_back_with_labels_and_genotypes(run_dir, tmp_path):
    from datasets import load_from_disk

    target = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), "--format", "hf", "--out", str(target)]) == 0
    dataset = load_from_disk(str(target))
    assert dataset.features["label"].names == ["cat", "dog"]
    assert dataset["id"] == ["a-1", "a-2", "b-1"] and dataset["label"] == [0, 0, 1]
    assert [json.loads(g)["size"] for g in dataset["genotype"]] == [0, 0, 1]
    assert np.asarray(dataset[2]["image"]).max() == 120  # the pixels themselves


def test_export_refuses_a_run_without_a_final_dataset_and_a_bad_review(tmp_path, run_dir, capsys):
    assert cli_main(["export", str(tmp_path / "empty")]) == 2
    assert "holds no final dataset" in capsys.readouterr().err
    (run_dir / "review.json").write_text("{not json")
    assert cli_main(["export", str(run_dir)]) == 2
    assert "is not a review file" in capsys.readouterr().err
    (run_dir / "review.json").write_text(json.dumps({"decisions": {"b-1": {"label": 7}}}))
    assert cli_main(["export", str(run_dir)]) == 2
    assert "relabelled to 7, not a class" in capsys.readouterr().err
