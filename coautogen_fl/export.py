"""Export a run's final synthetic dataset: an ImageFolder or a Hugging Face ``datasets`` folder.

The final dataset is ``<run_dir>/synthetic/`` (``<class>/<id>.png`` plus ``index.jsonl``: each
image's label, genotype, parent, round and votes). Review decisions, when the run directory holds
``review.json`` (``{"decisions": {"<id>": {"status": "accept" | "reject", "label": <int>}}}``), are
honoured: a rejected image is left out, a relabelled one is exported under its new label.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .store import read_index

FORMATS = ("imagefolder", "hf")
REVIEW_FILE = "review.json"


class ExportError(ValueError):
    """The run directory holds no final dataset, or the review file is unreadable; the message says which."""


@dataclass(frozen=True)
class ExportItem:
    """One image to export: its file, id, (reviewed) label and index entry."""

    path: Path
    image_id: str
    label: int
    entry: dict[str, Any]


def read_decisions(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The review decisions of ``run_dir`` by image id ({} when nobody reviewed the run)."""
    path = run_dir / REVIEW_FILE
    if not path.is_file():
        return {}
    try:
        decisions = json.loads(path.read_text())["decisions"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not a review file ({exc!r}); fix or remove it") from None
    if not isinstance(decisions, dict):
        raise ExportError(f"{path}: 'decisions' must map image ids to decisions")
    return decisions


def final_entries(run_dir: Path) -> tuple[list[ExportItem], list[str]]:
    """Every image of the final dataset with its own label, and the class names by label."""
    folder = run_dir / "synthetic"
    if not (folder / "index.jsonl").is_file():
        raise ExportError(
            f"{run_dir} holds no final dataset (synthetic/index.jsonl): did the run finish its last round?"
        )
    entries = read_index(folder)
    names: dict[int, str] = {int(e["label"]): e["file"].split("/", 1)[0] for e in entries}
    classes = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
    return [ExportItem(folder / e["file"], e["id"], int(e["label"]), e) for e in entries], classes


def final_items(run_dir: Path) -> tuple[list[ExportItem], list[str]]:
    """The images to export (review decisions applied: rejected left out, relabelled moved)."""
    items, classes = final_entries(run_dir)
    decisions = read_decisions(run_dir)
    kept = []
    for item in items:
        decision = decisions.get(item.image_id, {})
        if decision.get("status") == "reject":
            continue
        label = int(decision.get("label", item.label))
        if not 0 <= label < len(classes):
            raise ExportError(
                f"{REVIEW_FILE}: image {item.image_id} relabelled to {label}, not a class (0..{len(classes) - 1})"
            )
        kept.append(replace(item, label=label))
    return kept, classes


def export_imagefolder(items: list[ExportItem], classes: list[str], target: Path) -> Path:
    """``target/<class>/<id>.png``: what torchvision's ImageFolder and flwr-datasets read."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for name in classes:
        (staging / name).mkdir(parents=True)
    for item in items:
        shutil.copyfile(item.path, staging / classes[item.label] / f"{item.image_id}.png")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def export_hf(items: list[ExportItem], classes: list[str], target: Path) -> Path:
    """A ``datasets.Dataset`` saved with ``save_to_disk``: image, label (ClassLabel), id, round,
    parent and genotype (JSON) columns; ``datasets.load_from_disk(target)`` reads it back."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    features = Features(
        {
            "image": Image(),
            "label": ClassLabel(names=classes),
            "id": Value("string"),
            "round": Value("int64"),
            "parent": Value("string"),
            "genotype": Value("string"),
        }
    )
    columns = {
        "image": [str(item.path) for item in items],
        "label": [item.label for item in items],
        "id": [item.image_id for item in items],
        "round": [int(item.entry.get("round") or 0) for item in items],
        "parent": [str(item.entry.get("parent") or "") for item in items],
        "genotype": [json.dumps(item.entry.get("genotype", {}), sort_keys=True) for item in items],
    }
    dataset = Dataset.from_dict(columns, features=features)
    dataset = dataset.cast_column("image", Image(decode=True))
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def export_run(run_dir: str | Path, fmt: str, target: str | Path | None = None) -> tuple[Path, int]:
    """Export ``run_dir``'s final dataset as ``fmt`` into ``target`` (default
    ``<run_dir>/export-<fmt>``, replaced whole); returns (folder, images exported)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir).expanduser().resolve()
    items, classes = final_items(run_dir)
    out = Path(target).expanduser().resolve() if target else run_dir / f"export-{fmt}"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = export_imagefolder if fmt == "imagefolder" else export_hf
    return writer(items, classes, out), len(items)
