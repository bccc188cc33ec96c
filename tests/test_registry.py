"""Names in the config -> components: built-ins, seed aliases, hub ids / folders, entry points and
"pkg.module:Class" plug-ins; and the server's generator assembled from a config."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from coautogen_fl import registry
from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.embedding import EmbedderError, build_embedder
from coautogen_fl.evolution import Evolution
from coautogen_fl.generation import BUILTIN_GENERATORS, BuiltinGenerator, build_generator
from coautogen_fl.generation.base import GeneratorLoadError
from coautogen_fl.generation.glyph import GlyphGenerator
from coautogen_fl.generation.pipeline import check_model_sources
from coautogen_fl.generation.schedule import DegreeSchedule

from plugin_pkg.components import MeanEmbedder, SolidGenerator

NAMES = [str(i) for i in range(3)]


def test_builtin_alias_model_and_spec_names_resolve() -> None:
    assert registry.resolve("generator", "Glyph") == registry.Resolved("builtin", "Glyph")
    assert registry.resolve("generator", "StableDiffusionXL").value == "stabilityai/stable-diffusion-xl-base-1.0"
    assert registry.resolve("generator", "./models/sd15") == registry.Resolved("model", "./models/sd15")
    assert registry.resolve("generator", "runwayml/stable-diffusion-v1-5").kind == "model"
    assert registry.resolve("captioner", "BlipLarge").value == "Salesforce/blip-image-captioning-large"
    assert registry.resolve("generator", "plugin_pkg.components:SolidGenerator").value is SolidGenerator
    assert registry.resolve("embedder", "clip") == registry.Resolved("builtin", "clip")


def test_seed_flags_map_to_config_keys() -> None:
    from simulations.seed_flags import SEED_FLAGS

    keys = {f.short: f.key for f in SEED_FLAGS}
    assert keys["-sllm"] == "prompts.llm" and keys["-scap"] == "prompts.captioner"
    cfg = load_config(overrides=["prompts.llm=Llama3", "prompts.captioner=BlipBase", "prompts.reference=/data/ref"])
    assert cfg.prompts.llm == "Llama3" and cfg.prompts.captioner == "BlipBase"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("embedder.name", "clipp", "embedder.name='clipp' is not valid; use one of pixels, resnet18, clip"),
        ("prompts.captioner", "Blip", "prompts.captioner='Blip' is not valid; use one of BlipBase, BlipLarge, LLaVA"),
        ("generator.name", "Glph", "generator.name='Glph' is not valid; use one of Glyph, Latent, HTTP"),
    ],
)
def test_bad_names_are_one_clear_line(key, value, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=[f"{key}={value}", "prompts.reference=/x"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pkg_that_does_not_exist:Gen", "cannot import module 'pkg_that_does_not_exist'"),
        ("plugin_pkg.components:Missing", "has no attribute 'Missing'"),
    ],
)
def test_plugins_are_imported_on_the_server_not_at_config_validation(value, message) -> None:
    """Sites validate the same config, and need not have the server's generator installed:
    the import (and its error) happens in the server's preflight and when the generator is built."""
    cfg = load_config(overrides=[f"generator.name={value}"])  # the name's form is valid
    with pytest.raises(GeneratorLoadError, match=message) as info:
        check_model_sources(cfg)
    assert "\n" not in str(info.value) and "generator.name" in str(info.value)
    with pytest.raises(registry.RegistryError, match=message):
        build_generator(cfg, NAMES)


def test_entry_points_are_found_and_called(monkeypatch) -> None:
    points = {
        "coautogen_fl.generators": [
            EntryPoint("solid", "plugin_pkg.components:solid_factory", "coautogen_fl.generators")
        ],
        "coautogen_fl.embedders": [EntryPoint("mean", "plugin_pkg.components:MeanEmbedder", "coautogen_fl.embedders")],
    }
    monkeypatch.setattr(registry, "entry_points", lambda group: points.get(group, []))
    cfg = load_config(overrides=["generator.name=solid", "embedder.name=mean", "generator.seed=5"])
    generator = build_generator(cfg, NAMES)
    assert isinstance(generator, SolidGenerator) and generator.seed == 105  # built by the factory function
    embedder = build_embedder(cfg.embedder)
    assert isinstance(embedder, MeanEmbedder)
    assert "solid" in registry.names("generator")
    with pytest.raises(ConfigError, match="solid"):  # listed among the options once registered
        load_config(overrides=["generator.name=solidd"])


def test_spec_plugins_build_and_evolve_by_candidates() -> None:
    cfg = load_config(
        overrides=[
            "generator.name=plugin_pkg.components:SolidGenerator",
            "data.image_size=8",
            "embedder.name=plugin_pkg.components:MeanEmbedder",
        ]
    )
    generator = build_generator(cfg, NAMES)
    assert isinstance(generator, SolidGenerator) and generator.image_size == 8
    evolution = Evolution(generator, build_embedder(cfg.embedder), 3, cfg.feedback, DegreeSchedule())
    assert evolution.evolve == "candidates"  # auto: SolidGenerator has no fit()
    assert (
        Evolution(GlyphGenerator(NAMES), build_embedder(cfg.embedder), 3, cfg.feedback, DegreeSchedule()).evolve
        == "distribution"
    )


def test_a_plugin_class_with_from_config_is_built_by_it() -> None:
    cfg = load_config(overrides=["generator.name=plugin_pkg.components:ConfiguredSolidGenerator", "generator.seed=5"])
    generator = build_generator(cfg, NAMES)
    assert type(generator).__name__ == "ConfiguredSolidGenerator" and generator.seed == 1005  # not the kwargs path


def test_plugin_that_is_not_a_generator_is_refused() -> None:
    cfg = load_config(overrides=["generator.name=plugin_pkg.components:MeanEmbedder"])
    with pytest.raises(TypeError, match=r"MeanEmbedder cannot be built from \(class_names, image_size"):
        build_generator(cfg, NAMES)
    cfg = load_config(overrides=["generator.name=plugin_pkg.components:not_a_generator"])
    with pytest.raises(TypeError, match="built MeanEmbedder, which lacks random"):
        build_generator(cfg, NAMES)
    with pytest.raises(EmbedderError, match="no embed"):
        build_embedder(load_config(overrides=["embedder.name=plugin_pkg.components:not_an_embedder"]).embedder)


def test_requirements_of_special_generators_and_frameworks() -> None:
    with pytest.raises(ConfigError, match="generator.name=HTTP needs generator.api_url"):
        load_config(overrides=["generator.name=HTTP"])
    with pytest.raises(ConfigError, match="GenLLM needs an LLM"):
        load_config(overrides=["feedback.framework=GenLLM"])
    with pytest.raises(ConfigError, match="upscale_on=rounds needs postprocess.upscaler"):
        load_config(overrides=["postprocess.upscale_on=rounds"])
    with pytest.raises(ConfigError, match=r"postprocess.lighting must be < 1"):
        load_config(overrides=["postprocess.lighting=1.5"])


def test_prompts_need_a_prompt_driven_generator() -> None:
    cfg = load_config(overrides=["prompts.llm=./no-llm"])
    with pytest.raises(ConfigError, match="takes no prompts"):
        build_generator(cfg, NAMES)  # Glyph has no prompts


def test_model_sources_are_checked_without_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["generator.name=./no-such-sd"], "model folder no-such-sd does not exist"),
        ([f"generator.name={tmp_path}"], "holds no model_index.json"),
        (["generator.name=coautogen-test/no-such-model"], "huggingface-cli download coautogen-test/no-such-model"),
        (["postprocess.upscaler=./no-upscaler"], "postprocess.upscaler"),
        (["prompts.llm=Llama2"], "huggingface-cli download meta-llama/Llama-2-7b-chat-hf"),
        (["embedder.name=clip", "embedder.model=./no-clip"], "embedder.model"),
        (["generator.name=Latent", "generator.model=./no-gan.pt"], "fix generator.model"),
    ]
    for overrides, message in cases:
        with pytest.raises(GeneratorLoadError, match=message) as info:
            check_model_sources(load_config(overrides=overrides))
        assert "\n" not in str(info.value)
    monkeypatch.delenv("COAUTOGEN_API_KEY", raising=False)
    with pytest.raises(GeneratorLoadError, match="export COAUTOGEN_API_KEY"):
        check_model_sources(load_config(overrides=["generator.name=HTTP", "generator.api_url=http://127.0.0.1:9/x"]))
    check_model_sources(load_config())  # the default run needs no model


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_gpu_requested_without_gpu() -> None:
    with pytest.raises(Exception, match="CUDA is not available"):
        check_model_sources(load_config(), device="cuda")


def test_generator_output_shape_with_plugin() -> None:
    cfg = load_config(
        overrides=["generator.name=plugin_pkg.components:SolidGenerator", "data.image_size=8", "data.channels=3"]
    )
    images = np.stack([c.image for c in build_generator(cfg, NAMES).random(2, 3)])
    assert images.shape == (3, 8, 8, 3) and np.allclose(images, 0.75)


def test_the_generator_table_is_the_only_list_of_builtins(monkeypatch) -> None:
    """A name added to generation.BUILTIN_GENERATORS is a built-in name everywhere: accepted (and its
    requirement checked) by config validation, listed, and built through the same entry."""

    def needs_small_images(cfg) -> str | None:
        return None if cfg.data.image_size == 8 else "generator.name=Solid needs data.image_size=8"

    def build(cfg, ctx) -> SolidGenerator:
        return SolidGenerator(ctx.class_names, ctx.image_size, ctx.channels, seed=ctx.seed)

    with monkeypatch.context() as patch:
        patch.setitem(BUILTIN_GENERATORS, "Solid", BuiltinGenerator(build, needs_small_images))
        assert registry.resolve("generator", "Solid") == registry.Resolved("builtin", "Solid")
        assert "Solid" in registry.BUILTIN["generator"] and "Solid" in registry.names("generator")
        with pytest.raises(ConfigError, match="generator.name=Solid needs data.image_size=8"):
            load_config(overrides=["generator.name=Solid"])
        with pytest.raises(ConfigError, match="use one of Glyph, Latent, HTTP, Solid"):
            load_config(overrides=["generator.name=Solidd"])
        generator = build_generator(load_config(overrides=["generator.name=Solid", "data.image_size=8"]), NAMES)
        assert isinstance(generator, SolidGenerator) and generator.image_size == 8
    assert "Solid" not in registry.BUILTIN["generator"]  # no second list kept the name
    with pytest.raises(ConfigError, match="generator.name='Solid' is not valid"):
        load_config(overrides=["generator.name=Solid"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.channels=3"],
            r"generator.name=Glyph renders grayscale images, but data.channels=3: set data.channels=1",
        ),
        (["generator.name=Latent"], "generator.name=Latent needs generator.model"),
    ],
)
def test_builtin_requirements_are_refused_at_validation(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_a_config_made_without_validation_is_refused_when_built() -> None:
    cfg = load_config()
    cfg.data.channels = 3
    with pytest.raises(ConfigError, match="set data.channels=1"):
        build_generator(cfg, NAMES)


@pytest.mark.parametrize("first", ["coautogen_fl.registry", "coautogen_fl.config"])
def test_registry_and_config_import_one_way(first) -> None:
    """The registry builds on the schema and the light generator table, never on the config, so
    both import in either order, and validating names through the registry imports neither the
    config nor torch."""
    code = f"""
import sys
import {first}
from coautogen_fl import registry
from coautogen_fl.schema import RunConfig
registry.check_names(RunConfig())
registry.names("generator")
loaded = {{"config": "coautogen_fl.config" in sys.modules, "torch": "torch" in sys.modules}}
import coautogen_fl.config
coautogen_fl.config.validate(RunConfig())
print(loaded)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = {"config": first == "coautogen_fl.config", "torch": False}
    assert result.stdout.strip() == str(expected)
