"""The two front doors cannot drift apart: `[tool.flwr.app.config]` of pyproject.toml (what
`flwr run .` hands the app) holds exactly the schema's keys, with the schema's defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import pytest
import tomllib

from coautogen_fl.config import RunConfig, config_from_run_config, flat_defaults

PROJECT = Path(__file__).resolve().parents[1]


def flatten_like_flower(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables joined with dots (what flwr.common.config.flatten_dict does)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten_like_flower(value, name))
        else:
            flat[name] = value
    return flat


@pytest.fixture(scope="module")
def run_config() -> dict[str, Any]:
    with open(PROJECT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)
    return flatten_like_flower(project["tool"]["flwr"]["app"]["config"])


def test_run_config_holds_exactly_config_file_plus_the_schema_keys(run_config):
    schema = set(flat_defaults())
    keys = set(run_config)
    assert keys - schema - {"config-file"} == set(), "keys in pyproject.toml but not in the schema"
    assert schema - keys == set(), "schema keys missing from [tool.flwr.app.config]"
    assert run_config["config-file"] == ""


def test_run_config_values_equal_the_schema_defaults(run_config):
    defaults = flat_defaults()
    wrong = {
        key: (run_config[key], default)
        for key, default in defaults.items()
        if key in run_config and (run_config[key] != default or type(run_config[key]) is not type(default))
    }
    assert wrong == {}, "pyproject value (and type) differs from the schema default: {key: (toml, schema)}"


def test_run_config_values_are_flower_config_scalars(run_config):
    for key, value in run_config.items():
        assert isinstance(value, (bool, int, float, str)), key


def test_flattened_table_builds_the_defaults(run_config):
    assert config_from_run_config(run_config) == RunConfig()


def test_one_override_changes_only_that_key(run_config):
    cfg = config_from_run_config({**run_config, "privacy.epsilon": 2.0})
    defaults = RunConfig()
    assert cfg.privacy.epsilon == 2.0
    assert cfg == dataclasses.replace(defaults, privacy=dataclasses.replace(defaults.privacy, epsilon=2.0))


def test_flowers_own_run_config_fusion_agrees():
    """`flwr run . --run-config "privacy.epsilon=2"` as Flower itself parses and fuses it."""
    flower_config = pytest.importorskip("flwr.common.config")
    overrides = flower_config.parse_config_args(['privacy.epsilon=2 feedback.selection="sample"'])
    fused = flower_config.get_fused_config_from_dir(PROJECT, overrides)
    cfg = config_from_run_config(fused)
    defaults = RunConfig()
    assert cfg == dataclasses.replace(
        defaults,
        privacy=dataclasses.replace(defaults.privacy, epsilon=2.0),
        feedback=dataclasses.replace(defaults.feedback, selection="sample"),
    )
