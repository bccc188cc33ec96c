"""Build tiny random-weight text models in code and save them to folders (not a test module).

- :func:`build_tiny_gpt2`: a 2-layer GPT-2 (causal LM) with a byte-level BPE tokenizer trained
  here by the ``tokenizers`` library on a few hundred words, optionally with a chat template.
- :func:`build_tiny_bart`: a 1+1-layer BART (encoder-decoder) with the same kind of tokenizer.
- :func:`build_tiny_blip`: a 2-layer BLIP captioner with a ``BlipProcessor`` (32 px images, a
  ``BertTokenizer`` from a small ``vocab.txt``).

Random logits over a byte-level vocabulary give strings of stray bytes; the language models
here are nudged toward the whole-word tokens of :data:`WORDS` (a constant logit offset), so
their samples read like word salad, still differ from seed to seed, and exercise word-boundary
truncation. Nothing is downloaded: every folder goes through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

#: The words the tiny tokenizers know whole (and the language models prefer).
WORDS = (
    "a an the photo picture image of cat dog bird fish horse red blue green yellow black white small large "
    "fluffy sitting standing running on in under near with grass park beach snow sunlight shadow background "
    "close up shot detailed portrait soft bright dark light morning evening studio window tree "
    "write short visual description rewrite this prompt change one detail keep subject new answer"
).split()

#: Chat template of :func:`build_tiny_gpt2` when asked for one (a "User:/Assistant:" turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _corpus() -> list[str]:
    """A few hundred words: every rotation of WORDS, a few times over."""
    rotations = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return rotations * 3


def build_bpe_tokenizer(special_tokens: list[str], **names: str):
    """A byte-level BPE tokenizer trained on :func:`_corpus` (ASCII alphabet, whole words merged).

    ``names`` are the ``PreTrainedTokenizerFast`` special-token arguments (``eos_token=...``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def _word_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return sorted({vocab["\u0120" + w] for w in WORDS if "\u0120" + w in vocab} | {vocab[","], vocab["."]})


def build_tiny_gpt2(folder: str | Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """Save a tiny GPT-2 (n_layer 2, n_embd 32) and its tokenizer to ``folder``.

    The head is untied from the embeddings; the final LayerNorm's bias gives every position a
    constant component along one axis that the head maps to +4.5 logits for whole-word tokens.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    eos = "<|endoftext|>"
    tokenizer = build_bpe_tokenizer([eos], bos_token=eos, eos_token=eos, unk_token=eos)
    if chat_template:
        tokenizer.chat_template = chat_template
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 3.0
        head = torch.randn_like(model.lm_head.weight) * 0.5
        head[:, 0] = 0.0
        head[_word_ids(tokenizer), 0] = 1.5
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def build_tiny_bart(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny BART (1 encoder + 1 decoder layer, d_model 32) and its tokenizer to ``folder``;
    ``final_logits_bias`` favours whole-word tokens and end-of-sequence is made rare."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    folder = Path(folder)
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = build_bpe_tokenizer(list(specials.values()), **specials)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias[0, _word_ids(tokenizer)] = 4.0
        model.final_logits_bias[0, tokenizer.eos_token_id] = -4.0
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def build_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny BLIP captioner (2+2 layers, hidden 32, 32 px, patch 8) and its processor."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    vocab_dir = folder.parent / f"{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + [",", "."]
    (vocab_dir / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_dir / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    vision_config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=1.0,
    )
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", autouse=True)
def offline_single_thread():  # imported by the test modules that use these models
    """No hub access; one torch thread (tiny models, a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)
