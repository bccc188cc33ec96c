"""Run tracking: metrics to a crash-safe JSONL file, image grids as PNG, optional wandb.

The JSONL file is the source of truth (wandb is a mirror), so every line is fsynced
before ``log_round`` returns and a crash never loses a finished round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import write_text_atomic

WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _json_default(obj: Any) -> Any:
    # Metrics often arrive as numpy scalars/arrays, which json cannot encode itself.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def image_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 8) -> np.ndarray:
    """Arrange images in a grid, one row per class.

    Parameters
    ----------
    images : np.ndarray
        (N, H, W) or (N, H, W, C) floats in [0, 1].
    labels : np.ndarray
        (N,) integers in [0, num_classes).
    num_classes : int
        Number of rows.
    per_class : int, default 8
        Number of columns; the first ``per_class`` images of each class (in input
        order) fill its row left to right, missing cells stay black (0).

    Returns
    -------
    np.ndarray
        float32, shape (num_classes * H, per_class * W[, C]); image ``j`` of class
        ``r`` sits at rows ``r*H:(r+1)*H``, columns ``j*W:(j+1)*W``.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N,H,W) or (N,H,W,C), got {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"labels/images length mismatch: {len(labels)} labels, {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    h, w = images.shape[1:3]
    grid = np.zeros((num_classes * h, per_class * w) + images.shape[3:], dtype=np.float32)
    for r in range(num_classes):
        for j, idx in enumerate(np.flatnonzero(labels == r)[:per_class]):
            grid[r * h : (r + 1) * h, j * w : (j + 1) * w] = images[idx]
    return grid


def _save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image  # PIL writes the exact pixel array; no display/backend needed

    from .generation.imageops import to_uint8

    pixels = to_uint8(grid)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    Image.fromarray(pixels).save(path, format="PNG")


class RunTracker:
    """Record one run's metrics, image grids and summary under ``run_dir``.

    Parameters
    ----------
    run_dir : str or Path
        Created (with parents) if missing.
    wandb_mode : str, default "disabled"
        "online", "offline" or "disabled"; wandb is imported only when not disabled.
        "offline" runs land under ``run_dir/wandb/offline-run-*``; no login needed.
    wandb_project : str, default "coautogen-fl"
    wandb_entity, run_name : str, default ""
        Empty means wandb's default entity / a name chosen by wandb.
    config : dict or None, default None
        Stored as the wandb run config.

    Raises
    ------
    ValueError
        ``wandb_mode`` not one of ``WANDB_MODES``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        wandb_mode: str = "disabled",
        wandb_project: str = "coautogen-fl",
        wandb_entity: str = "",
        run_name: str = "",
        config: dict | None = None,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"invalid wandb_mode {wandb_mode!r}; valid values: {list(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.wandb_mode = wandb_mode
        self._wandb: Any = None
        self._run: Any = None
        if wandb_mode != "disabled":
            self._init_wandb(wandb_project, wandb_entity, run_name, config or {})

    def _init_wandb(self, project: str, entity: str, name: str, config: dict) -> None:
        import wandb  # lazy: importing wandb costs seconds

        if self.wandb_mode == "offline":
            # wandb writes offline runs under WANDB_DIR/wandb/; keep them with the run.
            os.environ["WANDB_DIR"] = str(self.run_dir.resolve())
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            entity=entity or None,
            name=name or None,
            config=config,
            mode=self.wandb_mode,
            dir=str(self.run_dir.resolve()),
        )

    def log_round(self, round: int, metrics: dict[str, float | int | str | list]) -> None:
        """Append ``{"round": round, **metrics}`` as one fsynced line to metrics.jsonl.

        Parameters
        ----------
        round : int
            Also the wandb step, so it should not decrease between calls.
        metrics : dict
            JSON-serialisable values (numpy scalars and arrays are converted);
            must not contain the key "round".
        """
        if "round" in metrics:
            raise ValueError("metrics must not contain the key 'round'; pass it as the round argument")
        line = json.dumps({"round": int(round), **metrics}, default=_json_default)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._run is not None:
            self._run.log(json.loads(line), step=int(round))

    def log_image_grid(
        self,
        key: str,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        round: int,
        per_class: int = 8,
    ) -> Path:
        """Save a class-per-row grid PNG (see ``image_grid``) and mirror it to wandb.

        Parameters
        ----------
        key : str
            Name of the grid, e.g. "synthetic"; used in the file name and as wandb key.
        images, labels : np.ndarray
            As in ``image_grid``.
        class_names : sequence of str
            One per class (row), in label order.
        round : int
        per_class : int, default 8

        Returns
        -------
        Path
            ``run_dir/grids/{key}_round{round:03d}.png``.
        """
        grid = image_grid(images, labels, len(class_names), per_class)
        path = self.run_dir / "grids" / f"{key}_round{int(round):03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(grid, path)
        if self._run is not None:
            caption = "rows: " + ", ".join(class_names)
            self._run.log({key: self._wandb.Image(str(path), caption=caption)}, step=int(round))
        return path

    def log_final(self, key: str, metrics: dict[str, Any]) -> None:
        """Mirror end-of-run numbers (e.g. the synthetic data's quality) to wandb's run summary
        as ``key/a/b`` entries; on disk they belong to summary.json, not to the per-round
        metrics.jsonl. Non-numeric values are left out.

        Parameters
        ----------
        key : str
            Prefix of the entries, e.g. "quality".
        metrics : dict
            Nested dicts of numbers (None and strings are skipped).
        """
        if self._run is None:
            return
        flat = {}
        stack = [(key, metrics)]
        while stack:
            prefix, value = stack.pop()
            if isinstance(value, dict):
                stack.extend((f"{prefix}/{k}", v) for k, v in value.items())
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                flat[prefix] = float(value)
        self._run.summary.update(flat)

    def write_summary(self, summary: dict) -> Path:
        """Atomically write ``summary`` to run_dir/summary.json (temp file + fsync + rename).

        Parameters
        ----------
        summary : dict
            JSON-serialisable values (numpy scalars and arrays are converted).

        Returns
        -------
        Path
            The summary file; readers see either the old or the new content, never half.
        """
        text = json.dumps(summary, indent=2, sort_keys=True, default=_json_default)
        path = write_text_atomic(self.run_dir / SUMMARY_FILE, text + "\n")
        if self._run is not None:
            self._run.summary.update(json.loads(text))
        return path

    def finish(self) -> None:
        """Close the wandb run, if any; safe to call more than once."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Read every round record from ``run_dir/metrics.jsonl``.

    Parameters
    ----------
    run_dir : str or Path

    Returns
    -------
    list of dict
        In file order; empty if the file does not exist. A truncated last line (a
        crash mid-write) is skipped; corruption anywhere else raises.
    """
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the write never finished
                break
            raise
    return records


def _budget(site: dict[str, Any]) -> str:
    return f"{site['epsilon_budget']:g}" if site.get("epsilon_budget") is not None else "an unreported budget"


def site_lines(summary: dict[str, Any]) -> list[str]:
    """One human-readable line per site of a summary.json: who, status, spend against the
    budget the site itself reported, rounds, refusals and failures."""
    unit = "per-image" if summary.get("privacy_unit") == "image" else "per-site"
    return [
        f"site {name} (node {s['node_id']}): {s['status']}, epsilon {s['epsilon_spent']:.3f} of {_budget(s)}, "
        f"delta {summary['delta']:g}, {s['rounds_answered']} rounds, {unit}"
        + (f", refused {len(s['refusals'])}" if s["refusals"] else "")
        + (f", failed {len(s['failures'])}" if s["failures"] else "")
        for name, s in summary.get("sites", {}).items()
    ]
