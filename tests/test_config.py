"""Tests of the one configuration schema (coautogen_fl/config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from coautogen_fl.config import (
    CHOICES,
    ConfigError,
    RunConfig,
    config_from_run_config,
    config_keys,
    flat_defaults,
    flatten,
    get_value,
    load_config,
    save_config,
    to_dict,
    unflatten,
)


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- schema helpers -----------------------------------------------------------------------


def test_defaults_load_without_file_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.privacy.epsilon == 1.0
    assert cfg.privacy.delta == 1e-5
    assert cfg.feedback.candidates_per_label == 50
    assert cfg.feedback.evolve == "auto"  # distribution for generators that can fit(), else candidates
    assert cfg.feedback.volume_per_label == 500


def test_config_keys_and_flat_defaults_cover_the_same_dotted_keys():
    keys = config_keys()
    assert len(keys) == len(set(keys))
    assert set(keys) == set(flat_defaults())
    assert {"device", "privacy.epsilon", "feedback.k", "tracking.wandb_mode"} <= set(keys)
    assert flat_defaults()["privacy.epsilon"] == 1.0
    assert flat_defaults()["embedder.name"] == "pixels"


def test_every_choice_key_exists_and_its_default_is_a_valid_choice():
    defaults = flat_defaults()
    for key, choices in CHOICES.items():
        assert key in defaults, key
        assert defaults[key] in choices, key


def test_flatten_unflatten_round_trip():
    tree = {"privacy": {"epsilon": 2.0, "mode": "central"}, "device": "cpu", "a": {"b": {"c": 1}}}
    flat = flatten(tree)
    assert flat == {"privacy.epsilon": 2.0, "privacy.mode": "central", "device": "cpu", "a.b.c": 1}
    assert unflatten(flat) == tree


def test_get_value_reads_dotted_keys():
    cfg = load_config(overrides=["feedback.k=3"])
    assert get_value(cfg, "feedback.k") == 3
    assert get_value(cfg, "device") == "cpu"


# --- refusals -----------------------------------------------------------------------------


def test_unknown_key_names_the_key_and_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["privacy.epsilonn=2"])
    message = str(info.value)
    assert "'privacy.epsilonn'" in message
    assert "Valid keys:" in message
    for key in config_keys():
        assert key in message


def test_unknown_top_level_key_in_yaml_is_refused(tmp_path):
    path = write_yaml(tmp_path, "privacy:\n  epsilon: 2\nbogus_section:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'bogus_section"):
        load_config(path)


def test_wrong_type_names_the_key_and_the_source():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["data.image_size=abc"])
    message = str(info.value)
    assert "wrong type for 'data.image_size'" in message
    assert "override 'data.image_size=abc'" in message


@pytest.mark.parametrize("override", ["feedback.k=1.5", "embedder.random_weights=maybe", "privacy.epsilon=[1,2]"])
def test_wrong_types_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"wrong type for '{key}'"):
        load_config(overrides=[override])


def test_a_scalar_where_a_section_belongs_is_a_config_error_naming_the_section():
    # `coautogen run privacy=3` (or `privacy: 3` in a YAML) must be a ConfigError naming the
    # section, not a crash inside the error handling.
    with pytest.raises(ConfigError, match="privacy"):
        load_config(overrides=["privacy=3"])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_epsilon_must_be_positive_and_finite(value):
    with pytest.raises(ConfigError, match=r"privacy\.epsilon must be > 0"):
        load_config(overrides=[f"privacy.epsilon={value}"])


@pytest.mark.parametrize("value", ["1.0", "1.5"])
def test_delta_must_be_below_one(value):
    with pytest.raises(ConfigError, match=r"privacy\.delta must be < 1"):
        load_config(overrides=[f"privacy.delta={value}"])


def test_delta_must_be_positive():
    with pytest.raises(ConfigError, match=r"privacy\.delta must be > 0"):
        load_config(overrides=["privacy.delta=0"])


def test_valid_privacy_values_are_accepted():
    cfg = load_config(overrides=["privacy.epsilon=0.25", "privacy.delta=0.999"])
    assert cfg.privacy.epsilon == 0.25
    assert cfg.privacy.delta == 0.999


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["feedback.selection=greedy"])
    message = str(info.value)
    assert "feedback.selection='greedy' is not valid" in message
    assert "sample, rank" in message


def test_bad_device_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of cpu, cuda, auto"):
        load_config(overrides=["device=gpu"])


def test_final_volume_is_decoupled_from_the_voted_pool():
    # The seed's `-vpl 8` alone works: the final volume may be smaller than the pool voted on.
    cfg = load_config(overrides=["feedback.volume_per_label=8"])
    assert (cfg.feedback.volume_per_label, cfg.feedback.candidates_per_label) == (8, 50)
    cfg = load_config(overrides=["feedback.candidates_per_label=30", "feedback.volume_per_label=2000"])
    assert cfg.feedback.volume_per_label == 2000


@pytest.mark.parametrize(
    "override, key",
    [
        ("feedback.rounds=0", "feedback.rounds"),
        ("feedback.k=0", "feedback.k"),
        ("federation.num_hospitals=0", "federation.num_hospitals"),
        ("data.image_size=4", "data.image_size"),
        ("data.dirichlet_alpha=0", "data.dirichlet_alpha"),
        ("feedback.threshold=-0.5", "feedback.threshold"),
        ("data.test_fraction=1.0", "data.test_fraction"),
    ],
)
def test_numeric_ranges_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize("override", ["data.test_fraction=0", "data.test_fraction=-0.5", "data.site_test_fraction=0"])
def test_split_fractions_must_be_positive(override):
    # A test split of size 0 (or negative) cannot be made; validation must say so up front,
    # naming the key, instead of letting scikit-learn fail later in data loading.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="'privacy.epsilon' is not key=value"):
        load_config(overrides=["privacy.epsilon"])


# --- files and precedence -----------------------------------------------------------------


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "config file not found" in str(info.value)
    assert str(missing) in str(info.value)


def test_yaml_file_then_dotlist_then_flat_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        "privacy:\n  epsilon: 3.0\n  mode: central\nfeedback:\n  k: 2\n  rounds: 7\n",
    )
    from_file = load_config(path)
    assert from_file.privacy.epsilon == 3.0
    assert from_file.privacy.mode == "central"
    assert from_file.feedback.k == 2
    assert from_file.feedback.rounds == 7
    assert from_file.data == RunConfig().data  # untouched sections keep their defaults

    cfg = load_config(path, overrides=["privacy.epsilon=5", "feedback.k=4"], flat_overrides={"feedback.k": 6})
    assert cfg.privacy.epsilon == 5.0  # dotlist beats the file
    assert cfg.feedback.k == 6  # flat overrides beat the dotlist
    assert cfg.feedback.rounds == 7  # the file beats the defaults
    assert cfg.privacy.mode == "central"


def test_later_dotlist_overrides_win():
    cfg = load_config(overrides=["privacy.epsilon=2", "privacy.epsilon=4"])
    assert cfg.privacy.epsilon == 4.0


def test_invalid_value_in_yaml_file_is_refused(tmp_path):
    path = write_yaml(tmp_path, "privacy:\n  epsilon: -1\n")
    with pytest.raises(ConfigError, match=r"privacy\.epsilon must be > 0 \(got -1"):
        load_config(path)


def test_wrong_type_in_yaml_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "feedback:\n  rounds: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "'feedback.rounds'" in str(info.value)


def test_save_config_and_load_round_trip(tmp_path):
    cfg = load_config(
        overrides=[
            "privacy.epsilon=2.5",
            "privacy.unit=site",
            "feedback.selection=sample",
            "feedback.k=3",
            "data.partitioner=dirichlet",
            "data.dirichlet_alpha=0.1",
            "embedder.random_weights=true",
            "tracking.run_name=my run",
        ]
    )
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert path.is_file()
    again = load_config(path)
    assert again == cfg
    assert again != RunConfig()
    assert to_dict(again)["privacy"]["epsilon"] == 2.5
    assert to_dict(again)["embedder"]["random_weights"] is True


# --- the Flower front door ----------------------------------------------------------------


def test_config_from_run_config_of_the_defaults_is_the_defaults():
    run_config = {"config-file": "", **flat_defaults()}
    assert config_from_run_config(run_config) == RunConfig()


def test_config_from_run_config_applies_changed_values_over_the_file(tmp_path):
    path = write_yaml(tmp_path, "privacy:\n  epsilon: 3.0\nfeedback:\n  rounds: 7\n  k: 2\n")
    run_config = {
        **flat_defaults(),
        "config-file": str(path),
        "privacy.epsilon": 2,  # Flower parses "privacy.epsilon=2" as an int
        "feedback.selection": "sample",
    }
    cfg = config_from_run_config(run_config)
    assert cfg.privacy.epsilon == 2.0
    assert isinstance(cfg.privacy.epsilon, float)
    assert cfg.feedback.selection == "sample"
    assert cfg.feedback.rounds == 7  # from the file: the run-config holds only the default
    assert cfg.feedback.k == 2
    expected = dataclasses.replace(
        RunConfig(),
        privacy=dataclasses.replace(RunConfig().privacy, epsilon=2.0),
        feedback=dataclasses.replace(RunConfig().feedback, rounds=7, k=2, selection="sample"),
    )
    assert cfg == expected


def test_config_from_run_config_unknown_key_names_it():
    with pytest.raises(ConfigError, match="unknown config key 'privacy.budget'"):
        config_from_run_config({**flat_defaults(), "privacy.budget": 3})


def test_config_from_run_config_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_from_run_config({"config-file": str(tmp_path / "missing.yaml")})


def test_config_from_run_config_validates_values():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon must be > 0"):
        config_from_run_config({**flat_defaults(), "privacy.epsilon": 0.0})
    with pytest.raises(ConfigError, match="choose one of local, central"):
        config_from_run_config({"privacy.mode": "secret"})


@pytest.mark.parametrize(
    "name", ["Glyph", "StableDiffusion", "FLUX", "runwayml/stable-diffusion-v1-5", "./models/sd15", "~/sd"]
)
def test_generator_names_accepted(name):
    assert load_config(overrides=[f"generator.name={name}"]).generator.name == name


def test_unknown_generator_name_lists_what_is_accepted():
    with pytest.raises(
        ConfigError, match=r"generator.name='Dalle' is not valid; use one of Glyph, Latent, HTTP, StableDiffusion"
    ):
        load_config(overrides=["generator.name=Dalle"])
    with pytest.raises(ConfigError, match=r"prompt_template must contain \{name\}"):
        load_config(overrides=["generator.prompt_template=a photo"])
