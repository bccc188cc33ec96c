"""LLM prompts (GenLLM descriptions, prompt evolution) through the real loading code.

Tiny random-weight GPT-2 and BART models are built in code (tests/tiny_text_models.py), saved
with ``save_pretrained`` and loaded back by ``LLMPrompts``; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from coautogen_fl.hub import ModelLoadError  # noqa: E402
from coautogen_fl.prompts import PromptSource  # noqa: E402
from coautogen_fl.prompts.llm import (  # noqa: E402
    LLM_ALIASES,
    MAX_ATTEMPTS,
    LLMPrompts,
    PromptError,
    clean_text,
    dedupe_key,
    mentions,
    truncate_to_tokens,
)

from tiny_text_models import (  # noqa: E402
    CHAT_TEMPLATE,
    build_tiny_bart,
    build_tiny_gpt2,
    offline_single_thread,  # noqa: F401  (autouse fixture)
)

CLASSES = ["cat", "dog", "bird"]
LIMIT = 12


def count_words(text: str) -> int:
    """A stand-in text-encoder token counter: one token per word."""
    return len(text.split())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("llm") / "gpt2"))


@pytest.fixture(scope="module")
def prompts(gpt2_dir):
    return LLMPrompts(
        gpt2_dir, CLASSES, per_class=6, max_new_tokens=30, token_limit=LIMIT, count_tokens=count_words, seed=0
    )


def make(model_dir: str, seed: int = 0, **kwargs) -> LLMPrompts:
    options = dict(per_class=6, max_new_tokens=30, token_limit=LIMIT, count_tokens=count_words, seed=seed)
    options.update(kwargs)
    return LLMPrompts(model_dir, CLASSES, **options)


def test_descriptions_name_their_class_are_unique_and_fit_the_token_limit(prompts):
    assert isinstance(prompts, PromptSource)
    for label, name in enumerate(CLASSES):
        descriptions = prompts.describe(label)
        assert descriptions[0] == f"a photo of {name}"
        assert 2 <= len(descriptions) <= 6  # the LLM wrote some
        assert all(mentions(d, name) for d in descriptions)
        assert len({dedupe_key(d) for d in descriptions}) == len(descriptions)
        assert all(count_words(d) <= LIMIT for d in descriptions)
        assert all(d == d.strip() and "\n" not in d and d.isprintable() for d in descriptions)


def test_raw_output_is_longer_than_the_limit_so_truncation_is_exercised(prompts):
    raw = prompts._generate(["Write a short, visual description of a photo of cat"], 4, seed=3)
    assert max(count_words(r) for r in raw) > LIMIT
    assert len(set(raw)) == 4  # the tiny model is not degenerate: samples differ


def test_default_token_counter_is_the_llm_tokenizer(gpt2_dir):
    source = LLMPrompts(gpt2_dir, CLASSES, per_class=4, max_new_tokens=30, token_limit=10)
    descriptions = source.describe(1)
    assert all(len(source.tokenizer(d, add_special_tokens=False)["input_ids"]) <= 10 for d in descriptions)


def test_same_seed_same_prompts_other_seed_other_prompts(gpt2_dir, prompts):
    twin, other = make(gpt2_dir, seed=0), make(gpt2_dir, seed=1)
    assert twin.descriptions() == prompts.descriptions()
    assert other.describe(0) != prompts.describe(0)
    parents, labels = ["a photo of cat, red grass", "a photo of dog", "a photo of bird"], [0, 1, 2]
    first = prompts.evolve(parents, labels, np.random.default_rng(5))
    assert twin.evolve(parents, labels, np.random.default_rng(5)) == first
    assert prompts.evolve(parents, labels, np.random.default_rng(6)) != first


def test_generation_leaves_the_global_torch_rng_alone(gpt2_dir):
    source = make(gpt2_dir, seed=2)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    source.describe(0)
    source.evolve(["a photo of cat"], [0], np.random.default_rng(0))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fewer_than_per_class_after_three_attempts_keeps_the_template(gpt2_dir, monkeypatch):
    source = make(gpt2_dir, per_class=5)
    calls = []

    def repeating(instructions, per_instruction, seed):
        calls.append(seed)
        return ["A fluffy cat on the grass."] * per_instruction + ["Description:", "", '"a photo of cat"']

    monkeypatch.setattr(source, "_generate", repeating)
    assert source.describe(0) == ["a photo of cat", "A fluffy cat on the grass."]
    assert len(calls) == MAX_ATTEMPTS and len(set(calls)) == MAX_ATTEMPTS  # a fresh seed per attempt
    assert source.describe(0) == ["a photo of cat", "A fluffy cat on the grass."]
    assert len(calls) == MAX_ATTEMPTS  # cached: no new generation


def test_sample_draws_uniformly_from_the_class_descriptions(prompts):
    rng = np.random.default_rng(0)
    options = prompts.describe(2)
    drawn = [prompts.sample(2, rng) for _ in range(200)]
    assert set(drawn) == set(options)
    assert prompts.descriptions().keys() == {0, 1, 2}


def test_evolve_gives_one_class_bearing_child_per_parent(prompts):
    parents = ["a photo of cat, soft light", "", "a photo of bird in snow", "a photo of dog", "a photo of cat"]
    labels = [0, 1, 2, 1, 0]
    children = prompts.evolve(parents, labels, np.random.default_rng(0))
    assert len(children) == len(parents)
    for child, label in zip(children, labels):
        assert mentions(child, CLASSES[label]) and count_words(child) <= LIMIT
    filled = [p or "a photo of dog" for p in parents]
    assert sum(child != parent for child, parent in zip(children, filled)) >= 3  # the LLM did rewrite
    assert prompts.evolve([], [], np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="one label per prompt"):
        prompts.evolve(["a photo of cat"], [0, 1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="label must be in"):
        prompts.evolve(["a photo of cat"], [3], np.random.default_rng(0))


def test_evolve_falls_back_to_the_parent_and_can_be_switched_off(gpt2_dir, monkeypatch):
    source = make(gpt2_dir, batch_size=2)
    monkeypatch.setattr(source, "_generate", lambda instructions, n, seed: ["  \n", "\ufffd\x07"][: len(instructions)])
    parents = ["a photo of cat, at dusk", "a photo of dog", "", "a photo of cat"]
    assert source.evolve(parents, [0, 1, 2, 0], np.random.default_rng(0)) == [
        "a photo of cat, at dusk",
        "a photo of dog",
        "a photo of bird",
        "a photo of cat",
    ]
    frozen = make(gpt2_dir, evolve_prompts=False)
    assert frozen.evolve(parents, [0, 1, 2, 0], np.random.default_rng(0))[0] == "a photo of cat, at dusk"


def test_extra_descriptions_are_added_cleaned(gpt2_dir):
    extra = {0: ["cat, a cat on a sofa", "cat, a cat on a sofa.", "  ", "a kitten asleep"]}
    source = make(gpt2_dir, per_class=2, extra_descriptions=extra)
    descriptions = source.describe(0)
    assert len(descriptions) == 4  # template + one LLM description + two unique extras
    assert descriptions[-2:] == ["cat, a cat on a sofa", "a photo of cat, a kitten asleep"]


def test_settings_are_recorded(prompts):
    settings = prompts.settings()
    assert settings["source"] == "llm" and settings["model"] == prompts.model_name
    assert (settings["temperature"], settings["top_p"], settings["max_new_tokens"], settings["seed"]) == (
        0.9,
        0.95,
        30,
        0,
    )
    json.dumps(settings)


def test_encoder_decoder_model(tmp_path_factory):
    folder = str(build_tiny_bart(tmp_path_factory.mktemp("llm") / "bart"))
    source = LLMPrompts(folder, CLASSES, per_class=4, max_new_tokens=20, token_limit=LIMIT, count_tokens=count_words)
    assert source.encoder_decoder
    descriptions = source.describe(1)
    assert 2 <= len(descriptions) <= 4 and all(mentions(d, "dog") and count_words(d) <= LIMIT for d in descriptions)
    children = source.evolve(["a photo of dog"], [1], np.random.default_rng(0))
    assert len(children) == 1 and mentions(children[0], "dog")


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path_factory):
    folder = str(build_tiny_gpt2(tmp_path_factory.mktemp("llm") / "chat", chat_template=CHAT_TEMPLATE))
    source = LLMPrompts(folder, CLASSES, per_class=3, max_new_tokens=20, token_limit=LIMIT, count_tokens=count_words)
    formatted = source._format("Describe a cat.")
    assert formatted == "User: Describe a cat.\nAssistant:"
    assert all(mentions(d, "cat") for d in source.describe(0))


def test_text_helpers():
    assert clean_text('Description:\n  "A red cat on a mat. It sleeps."\nmore') == "A red cat on a mat."
    assert clean_text("1. a dog\x07 in\tthe park") == "a dog in the park"
    assert clean_text("\n \ufffd \n") == ""
    assert truncate_to_tokens("one two three, four five", 3, count_words) == "one two three"
    assert truncate_to_tokens("short", 3, count_words) == "short"
    assert truncate_to_tokens("toolongword", 0, count_words) == ""
    assert mentions("A Cat.", "cat") and not mentions("a category", "cat") and not mentions("10 apples", "0")
    assert dedupe_key("  A  Cat. ") == dedupe_key("a cat")


def test_aliases_match_the_config():
    from coautogen_fl.config import LLM_ALIASES as CONFIG_ALIASES

    assert LLM_ALIASES == {"Llama2": "meta-llama/Llama-2-7b-chat-hf", "Llama3": "meta-llama/Meta-Llama-3-8B-Instruct"}
    assert LLM_ALIASES == CONFIG_ALIASES


def test_argument_validation(gpt2_dir):
    for kwargs, match in [
        ({"per_class": 0}, "per_class"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"token_limit": 0}, "token_limit"),
        ({"template": "a photo of {x}"}, "template"),
    ]:
        with pytest.raises(ValueError, match=match):
            LLMPrompts(gpt2_dir, CLASSES, **kwargs)
    with pytest.raises(ValueError, match="class_names"):
        LLMPrompts(gpt2_dir, ["cat", " "])


def _one_line_error(model: str, *match: str) -> None:
    with pytest.raises(PromptError) as info:
        LLMPrompts(model, CLASSES)
    message = str(info.value)
    assert "\n" not in message and "prompts.llm" in message
    for fragment in match:
        assert fragment in message
    assert isinstance(info.value, ModelLoadError)


def test_load_errors_are_one_line_naming_prompts_llm(tmp_path, gpt2_dir):
    from transformers import ViTConfig

    _one_line_error(str(tmp_path / "missing"), "does not exist")
    _one_line_error("nobody/no-such-llm-xyz", "not found locally", "huggingface-cli download nobody/no-such-llm-xyz")
    _one_line_error("Llama3", "meta-llama/Meta-Llama-3-8B-Instruct")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "vit"
    )
    _one_line_error(str(tmp_path / "vit"), "vit model, not a language model")
    (tmp_path / "empty").mkdir()
    _one_line_error(str(tmp_path / "empty"), "holds no config.json")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((open(f"{gpt2_dir}/config.json").read()))
    _one_line_error(str(tmp_path / "no-weights"), "could not load language model")
