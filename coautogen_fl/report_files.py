"""Reading a run directory for its report (coautogen_fl/report.py): summary.json, metrics.jsonl
and the voted pools under rounds/, each read leniently. A missing or unreadable file gives None
or an empty result instead of an error, so the report of a crashed or partial run still shows
what exists; broken JSON lines are skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line; missing file: []; broken lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _round_folders(run_dir: Path) -> dict[int, Path]:
    """Round number -> rounds/round_NNN folder of every stored voted pool."""
    folders = {}
    for folder in (run_dir / "rounds").glob("round_*"):
        match = re.fullmatch(r"round_(\d+)", folder.name)
        if match and (folder / "index.jsonl").is_file():
            folders[int(match.group(1))] = folder
    return dict(sorted(folders.items()))


def _class_names(entries: list[dict]) -> dict[int, str]:
    """Label -> class name, read from the ImageFolder layout of the entries' files."""
    names: dict[int, str] = {}
    for e in entries:
        if isinstance(e.get("label"), int):
            names.setdefault(e["label"], Path(str(e.get("file", ""))).parent.name or str(e["label"]))
    return dict(sorted(names.items()))
