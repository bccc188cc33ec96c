"""The synthetic store: every round's candidates and the final dataset on disk.

Layout under a run directory::

    rounds/round_001/<class_name>/<candidate_id>.png   + rounds/round_001/index.jsonl
    synthetic/<class_name>/<candidate_id>.png          + synthetic/index.jsonl

Each round is written into a hidden temporary folder and renamed into place in one step,
so a crash never leaves a half-written round: a round is either complete or absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .atomic import fsync_dir
from .generation.base import Candidate
from .generation.imageops import to_uint8


def safe_dirname(name: str) -> str:
    """A class name usable as a folder name (ImageFolder layout)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "class"


class SyntheticStore:
    """Writes candidates as PNG files in ImageFolder layout plus a JSONL index.

    Parameters
    ----------
    run_dir : str or Path
        The run directory; created if needed.
    class_names : sequence of str
        Folder names of the classes, in label order.
    """

    def __init__(self, run_dir: str | Path, class_names: Sequence[str]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.class_dirs = [safe_dirname(n) for n in class_names]
        if len(set(self.class_dirs)) != len(self.class_dirs):
            raise ValueError(f"class names collide as folder names: {list(class_names)}")

    def round_dir(self, round_index: int) -> Path:
        return self.run_dir / "rounds" / f"round_{round_index:03d}"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "synthetic"

    def write_round(self, round_index: int, candidates: Sequence[Candidate]) -> Path:
        """Write one round's candidates (with their votes) atomically; returns its folder."""
        return self._write_atomically(self.round_dir(round_index), candidates)

    def write_final(self, candidates: Sequence[Candidate]) -> Path:
        """Write the final synthetic dataset (``synthetic/``) atomically."""
        return self._write_atomically(self.final_dir, candidates)

    def _write_atomically(self, target: Path, candidates: Sequence[Candidate]) -> Path:
        staging = target.parent / f".{target.name}.tmp"
        if staging.exists():
            shutil.rmtree(staging)  # left by a crash mid-write: never a finished round
        staging.mkdir(parents=True)
        for d in self.class_dirs:
            (staging / d).mkdir()
        with open(staging / "index.jsonl", "w") as index:
            for c in candidates:
                relative = f"{self.class_dirs[c.label]}/{c.candidate_id}.png"
                Image.fromarray(to_uint8(c.image)).save(staging / relative)
                index.write(json.dumps({**c.index_entry(), "file": relative}) + "\n")
            index.flush()
            os.fsync(index.fileno())
        if target.exists():
            shutil.rmtree(target)  # a re-run of the same round replaces it whole
        os.replace(staging, target)
        fsync_dir(target.parent)
        return target


def read_index(folder: str | Path) -> list[dict]:
    """The index entries of a stored round or of the final dataset."""
    with open(Path(folder) / "index.jsonl") as index:
        return [json.loads(line) for line in index if line.strip()]


def load_stored_images(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a stored folder back as (images float32 in [0, 1], labels)."""
    entries = read_index(folder)
    images = [np.asarray(Image.open(Path(folder) / e["file"]), dtype=np.float32) / 255.0 for e in entries]
    return np.stack(images), np.array([e["label"] for e in entries], dtype=np.int64)
