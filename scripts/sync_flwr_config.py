"""Rewrite `[tool.flwr.app.config]` of pyproject.toml from the config schema's defaults.

Run after adding a config key: `python scripts/sync_flwr_config.py` (tests/test_pyproject_config.py
fails until the table matches the schema).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from coautogen_fl.config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
HEADER = """[tool.flwr.app.config]
# The run config: the same keys as coautogen_fl/schema.py (a test keeps them in sync;
# regenerate with `python scripts/sync_flwr_config.py`).
# `flwr run . --run-config "privacy.epsilon=2"` overrides one; `config-file` names a YAML.
config-file = ""
"""


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def render() -> str:
    tree = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    lines = [HEADER.rstrip("\n")]
    lines += [f"{k} = {toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for section, values in tree.items():
        if isinstance(values, dict):
            lines += ["", f"[tool.flwr.app.config.{section}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = PYPROJECT.read_text()
    start = text.index("[tool.flwr.app.config]")
    following = re.search(r"^\[(?!tool\.flwr\.app\.config)", text[start:], flags=re.M)
    end = start + following.start() if following else len(text)
    tail = text[end:]
    PYPROJECT.write_text(text[:start] + render() + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    main()
