"""Image captions as prompts (Img2Cap) through the real loading code.

A tiny random-weight BLIP captioner is built in code (tests/tiny_text_models.py), saved with
``save_pretrained`` and loaded back by ``Captioner``; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from coautogen_fl.hub import ModelLoadError  # noqa: E402
from coautogen_fl.prompts import TemplatePrompts  # noqa: E402
from coautogen_fl.prompts.captioner import CAPTIONER_ALIASES, DEFAULT_QUESTION, Captioner, clean_caption  # noqa: E402
from coautogen_fl.prompts.llm import PromptError, dedupe_key  # noqa: E402

from tiny_text_models import (  # noqa: E402
    build_tiny_blip,
    build_tiny_gpt2,
    offline_single_thread,  # noqa: F401  (autouse fixture)
)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return str(build_tiny_blip(tmp_path_factory.mktemp("captioner") / "blip"))


@pytest.fixture(scope="module")
def captioner(blip_dir):
    return Captioner(blip_dir, batch_size=2, max_new_tokens=12)


def random_images(n: int, seed: int = 0, shape: tuple[int, ...] = (24, 20, 3)) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """cat/ and dog/ with three distinct PNGs and one exact copy each, plus an unused class."""
    root = tmp_path_factory.mktemp("reference")
    for offset, name in enumerate(["cat", "dog", "unused"]):
        (root / name).mkdir()
        for i, image in enumerate(random_images(3, seed=10 * offset, shape=(30, 30, 3))):
            Image.fromarray((image * 255).astype(np.uint8)).save(root / name / f"{i}.png")
        (root / name / "3-copy.png").write_bytes((root / name / "0.png").read_bytes())
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_one_deterministic_caption_per_image(captioner, blip_dir):
    images = random_images(5)
    captions = captioner.caption(images)
    assert len(captions) == 5 and all(isinstance(c, str) and c == c.strip() for c in captions)
    assert any(captions)  # the tiny model writes words
    assert captioner.caption(images) == captions
    assert Captioner(blip_dir, batch_size=8, max_new_tokens=12).caption(images) == captions  # batching changes nothing
    assert captioner.caption(images[:0]) == []


def test_grayscale_and_single_channel_images(captioner):
    gray = random_images(3, shape=(16, 16))
    assert captioner.caption(gray) == captioner.caption(gray[..., None])
    assert captioner.caption(np.repeat(gray[..., None], 3, axis=-1)) == captioner.caption(gray)


def test_bad_images_are_refused(captioner):
    with pytest.raises(ValueError, match="shape"):
        captioner.caption(np.zeros((2, 8, 8, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        captioner.caption(np.full((1, 8, 8), 2.0, dtype=np.float32))


def test_a_prompt_conditions_blip(blip_dir):
    conditioned = Captioner(blip_dir, prompt="a photo of", max_new_tokens=8)
    assert conditioned.text == "a photo of"
    assert all(c.startswith("a photo of") for c in conditioned.caption(random_images(3)))


def test_caption_folder_gives_class_bearing_deduped_captions(captioner, reference_folder):
    captions = captioner.caption_folder(str(reference_folder), ["dog", "cat"], per_class=20)
    assert set(captions) == {0, 1}
    for label, name in enumerate(["dog", "cat"]):
        assert 1 <= len(captions[label]) <= 3  # the exact copy collapses into its original's caption
        assert all(c.startswith(f"{name}, ") and len(c) > len(name) + 2 for c in captions[label])
        assert len({dedupe_key(c) for c in captions[label]}) == len(captions[label])
    first = captioner.caption_folder(str(reference_folder), ["dog", "cat"], per_class=1)
    assert [len(v) for v in first.values()] == [1, 1]
    prompts = TemplatePrompts(["dog", "cat"], descriptions=captions)
    assert prompts.sample(1, np.random.default_rng(0)) in captions[1]


def test_caption_folder_errors_name_prompts_reference(captioner, reference_folder, tmp_path):
    with pytest.raises(PromptError, match=r"prompts\.reference.*ImageFolder"):
        captioner.caption_folder(str(tmp_path / "missing"), ["cat", "dog"])
    with pytest.raises(PromptError, match=r"prompts\.reference: class 'bird' has no images"):
        captioner.caption_folder(str(reference_folder), ["cat", "bird"])
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PromptError, match=r"cannot read reference image .*broken\.png.*prompts\.reference"):
        captioner.caption_folder(str(tmp_path), ["cat"])


def test_load_errors_are_one_line_naming_prompts_captioner(tmp_path):
    for model, fragment in [
        (str(tmp_path / "missing"), "does not exist"),
        ("BlipBase", "Salesforce/blip-image-captioning-base"),
    ]:
        with pytest.raises(PromptError, match=r"prompts\.captioner") as info:
            Captioner(model)
        assert fragment in str(info.value) and "\n" not in str(info.value) and isinstance(info.value, ModelLoadError)
    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(PromptError, match=r"gpt2 model, not an image captioning .*prompts\.captioner"):
        Captioner(str(gpt2))
    with pytest.raises(ValueError, match="batch_size"):
        Captioner(str(gpt2), batch_size=0)


def test_chat_style_models_get_their_prompt_through_the_chat_template():
    class ChatProcessor:  # the parts of a LLaVA processor the captioner reads
        image_token = "<image>"
        chat_template = "unused"

        def apply_chat_template(self, messages, add_generation_prompt):
            content = messages[0]["content"]
            assert content[0] == {"type": "image"} and add_generation_prompt
            return f"USER: <image>\n{content[1]['text']} ASSISTANT:"

    class TokenOnlyProcessor:  # e.g. BLIP-2: the processor inserts its image tokens itself
        image_token = "<image>"
        chat_template = None

    captioner = Captioner.__new__(Captioner)
    captioner.processor, captioner.prompt = ChatProcessor(), ""
    assert captioner._text_input() == f"USER: <image>\n{DEFAULT_QUESTION} ASSISTANT:"
    captioner.prompt = "Name the animal."
    assert captioner._text_input() == "USER: <image>\nName the animal. ASSISTANT:"
    captioner.processor, captioner.prompt = TokenOnlyProcessor(), "USER: <image>\nWhat is shown? ASSISTANT:"
    assert captioner._text_input() == captioner.prompt  # a processor without a template gets the prompt as it is
    captioner.prompt = ""
    assert captioner._text_input() is None


def test_clean_caption_and_aliases():
    assert clean_caption("arafed cat sitting on a mat\nsecond line") == "cat sitting on a mat"
    assert clean_caption("  \n ") == ""
    assert CAPTIONER_ALIASES == {
        "BlipBase": "Salesforce/blip-image-captioning-base",
        "BlipLarge": "Salesforce/blip-image-captioning-large",
        "LLaVA": "llava-hf/llava-1.5-7b-hf",
    }
    from coautogen_fl.config import CAPTIONER_ALIASES as CONFIG_ALIASES

    assert CAPTIONER_ALIASES == CONFIG_ALIASES
