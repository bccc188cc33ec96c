"""Prompts written by a language model: many descriptions per class (GenLLM) and small rewrites
of voted parents' prompts (prompt evolution in T2I Feedback).

Any transformers causal LM (GPT-2, Llama, ...) or encoder-decoder (T5, BART, ...) works, given
as a hub id already in the local Hugging Face cache, a local ``save_pretrained`` folder, or one
of the :data:`LLM_ALIASES`. Nothing is downloaded at run time (see :mod:`coautogen_fl.hub`).

Every prompt that leaves this module is cleaned (first sentence of the first line, no quotes or
control characters), names its class (the template prompt is prepended when the LLM dropped the
class name, so a prompt stays on class) and fits the text encoder's token limit (cut at a word
boundary). Sampling is seeded: the same seed gives the same prompts.

``transformers`` and ``torch`` are imported inside the methods: importing them costs seconds.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

from coautogen_fl.config import LLM_ALIASES  # the seed's names -> hub ids, with the other config names
from coautogen_fl.generation.base import check_int
from coautogen_fl.hub import (
    ModelLoadError,
    check_device,
    first_line,
    read_model_config,
    resolve_model_source,
    transformers_dtype,
)

from .base import TemplatePrompts

#: The config key naming the LLM, quoted in error messages.
CONFIG_KEY = "prompts.llm"

#: Instruction for the descriptions of one class (GenLLM); ``{name}`` is the class name.
DESCRIBE_INSTRUCTION = (
    "Write a short, visual description of a photo of {name} for a text-to-image model: one "
    "sentence that names {name} and describes its look, the setting, the lighting and the viewpoint."
)

#: Instruction for the child of a voted parent prompt (T2I Feedback).
EVOLVE_INSTRUCTION = (
    "Rewrite this text-to-image prompt with one small variation (a different detail, pose, setting "
    "or lighting), keeping {name} as the subject. Answer with the new prompt only. Prompt: {prompt}"
)

#: Generation rounds ``describe`` runs to reach ``per_class`` unique descriptions.
MAX_ATTEMPTS = 3

_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
# A leading label ("Prompt:", "New description:") or list marker ("1.", "-") the LLM may add.
_PREFIX = re.compile(
    r"^\s*(?:(?:[-*\u2022]|\d+[.)])\s+|(?:new\s+|rewritten\s+)?(?:prompt|description|caption|answer)\s*:\s*)", re.I
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


class PromptError(ModelLoadError):
    """A prompt model (LLM, captioner) or its reference images could not be loaded; the
    message names the model or folder and the fix."""


def clean_text(text: str) -> str:
    """The first sentence of the first non-empty line, without labels, quotes or control
    characters, whitespace collapsed ("" when nothing is left)."""
    printable = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in str(text)).replace("\ufffd", " ")
    for line in printable.splitlines():
        line = _PREFIX.sub("", line.strip()).strip().strip(_QUOTES)
        line = _SENTENCE_END.split(line, maxsplit=1)[0]
        line = " ".join(line.split()).strip(_QUOTES + " ")
        if line:
            return line
    return ""


def dedupe_key(text: str) -> str:
    """Case- and whitespace-insensitive identity of a prompt (end punctuation ignored)."""
    return " ".join(text.lower().split()).strip(" .,;:!?")


def mentions(text: str, name: str) -> bool:
    """True when ``name`` occurs in ``text`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(name.strip())}(?!\w)", text, re.I) is not None


def truncate_to_tokens(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """The longest word-prefix of ``text`` with at most ``limit`` tokens ("" if no word fits)."""
    if count_tokens(text) <= limit:
        return text
    words = text.split()
    low, high = 0, len(words)  # invariant: words[:low] fits, words[:high + 1] does not
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= limit:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low]).rstrip(" ,;:-")


def model_kind(source: str, model: str, config_key: str, mappings: dict[str, dict[str, str]], what: str) -> str:
    """Which of ``mappings`` (kind -> transformers ``MAPPING_NAMES``) the folder's config belongs
    to, read from ``config.json`` before any weights load; one :class:`PromptError` line if none."""
    config = read_model_config(source, model, config_key, PromptError)
    model_type = config.get("model_type")
    encoder_decoder = bool(config.get("is_encoder_decoder", False))
    for kind, names in mappings.items():
        if model_type in names and (kind != "causal" or not encoder_decoder):
            return kind
    raise PromptError(f"'{model}' is a {model_type or 'untyped'} model, not {what}; set {config_key} to one")


class LLMPrompts:
    """A :class:`~coautogen_fl.prompts.base.PromptSource` whose prompts an LLM writes.

    Parameters
    ----------
    model : str
        An alias of :data:`LLM_ALIASES`, a hub id in the local cache or a local folder holding a
        causal LM or an encoder-decoder and its tokenizer.
    class_names : Sequence[str]
        Non-blank class names.
    template : str, default "a photo of {name}"
        The class's template prompt; always one of its descriptions, and prepended to LLM output
        that does not name the class.
    device : str, default "cpu"
        torch device; float16 weights on CUDA, float32 elsewhere.
    per_class : int, default 10
        Descriptions per class, the template prompt included (fewer when the LLM repeats itself
        through :data:`MAX_ATTEMPTS` rounds).
    max_new_tokens : int, default 40
        Tokens the LLM may write per prompt.
    temperature : float, default 0.9
        Sampling temperature (> 0).
    top_p : float, default 0.95
        Nucleus sampling mass in (0, 1].
    seed : int, default 0
        Seeds every generation: same seed, same descriptions and (with the same rng) evolutions.
    token_limit : int, default 77
        Most tokens a prompt may have under ``count_tokens``.
    count_tokens : callable or None, default None
        ``str -> int`` token count of the TEXT ENCODER the prompts feed (e.g. a diffusers
        pipeline's CLIP tokenizer); None counts with the LLM's own tokenizer.
    progress : bool, default False
        Show tqdm bars over classes and evolution batches.
    batch_size : int, default 8
        Parent prompts per generation call in ``evolve``.
    evolve_prompts : bool, default True
        False keeps a parent's prompt in ``evolve`` (no LLM call), like the template source.
    extra_descriptions : dict[int, list[str]] or None, default None
        More descriptions per class (e.g. reference captions), added to the LLM's after the same
        cleaning; they do not count against ``per_class``.
    """

    def __init__(
        self,
        model: str,
        class_names: Sequence[str],
        template: str = "a photo of {name}",
        device: str = "cpu",
        per_class: int = 10,
        max_new_tokens: int = 40,
        temperature: float = 0.9,
        top_p: float = 0.95,
        seed: int = 0,
        token_limit: int = 77,
        count_tokens: Callable[[str], int] | None = None,
        progress: bool = False,
        batch_size: int = 8,
        evolve_prompts: bool = True,
        extra_descriptions: dict[int, list[str]] | None = None,
    ) -> None:
        self._template = TemplatePrompts(class_names, template)
        self.class_names = self._template.class_names
        self.per_class = check_int("per_class", per_class, 1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.seed = check_int("seed", seed, 0)
        self.token_limit = check_int("token_limit", token_limit, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.device = str(device)
        self.progress = bool(progress)
        self.evolve_prompts = bool(evolve_prompts)
        self.model_name = LLM_ALIASES.get(model, model)
        self.tokenizer, self.model, self.encoder_decoder = self._load(self.model_name)
        self.count_tokens = count_tokens or self._count_llm_tokens
        self._extra = {int(k): [str(p) for p in v] for k, v in (extra_descriptions or {}).items()}
        self._cache: dict[int, list[str]] = {}

    # -- loading -------------------------------------------------------------------------------
    def _load(self, model: str) -> tuple[Any, Any, bool]:
        check_device(self.device, PromptError)
        source = resolve_model_source(model, "language model", "config.json", CONFIG_KEY, PromptError)
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
        from transformers.models.auto import modeling_auto

        kinds = {
            "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            "causal": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        }
        kind = model_kind(source, model, CONFIG_KEY, kinds, "a language model (causal LM or encoder-decoder)")
        encoder_decoder = kind == "seq2seq"
        auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            lm = auto.from_pretrained(source, local_files_only=True, **transformers_dtype(self.device))
            lm = lm.to(self.device).eval()
        except Exception as exc:
            raise PromptError(f"could not load language model '{model}' ({CONFIG_KEY}): {first_line(exc)}") from exc
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; it is masked out
        if not encoder_decoder:
            tokenizer.padding_side = "left"  # a causal LM continues the last token of each row
        return tokenizer, lm, encoder_decoder

    def _count_llm_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- generation ----------------------------------------------------------------------------
    def _chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _format(self, instruction: str) -> str:
        """The model input for one instruction: the chat template when the tokenizer has one."""
        if self._chat():
            messages = [{"role": "user", "content": instruction}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return instruction if self.encoder_decoder else f"{instruction}\nAnswer:"

    def _generate(self, instructions: Sequence[str], per_instruction: int, seed: int) -> list[str]:
        """``per_instruction`` sampled completions of each instruction, grouped in order."""
        import torch

        texts = [self._format(i) for i in instructions]
        # A chat template already holds the model's special tokens.
        batch = self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=not self._chat())
        batch.pop("token_type_ids", None)
        batch = batch.to(self.device)
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # seeded, global RNG left alone
            torch.manual_seed(seed)
            output = self.model.generate(
                **batch,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=per_instruction,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        if not self.encoder_decoder:
            output = output[:, batch["input_ids"].shape[1] :]  # a causal LM echoes its input
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    def _seed_for(self, *keys: int) -> int:
        return int(np.random.SeedSequence([self.seed, *keys]).generate_state(1)[0])

    # -- cleaning ------------------------------------------------------------------------------
    def class_prompt(self, label: int) -> str:
        """The template prompt of class ``label``."""
        return self._template.class_prompt(label)

    def finish(self, text: str, label: int) -> str:
        """``text`` cleaned, naming class ``label`` and within ``token_limit`` ("" if unusable)."""
        name, base = self.class_names[int(label)], self.class_prompt(label)
        text = clean_text(text)
        if not text:
            return ""
        if not mentions(text, name):
            text = f"{base}, {text}"
        cut = truncate_to_tokens(text, self.token_limit, self.count_tokens)
        if not mentions(cut, name):  # the class was named only past the limit: lead with it
            cut = truncate_to_tokens(f"{base}, {text}", self.token_limit, self.count_tokens)
        return cut if mentions(cut, name) else ""

    # -- PromptSource --------------------------------------------------------------------------
    def describe(self, label: int) -> list[str]:
        """The descriptions of class ``label`` (written on first call, then cached).

        The template prompt comes first, then up to ``per_class - 1`` unique LLM descriptions
        (fewer if :data:`MAX_ATTEMPTS` rounds of sampling repeat themselves), then the extra
        descriptions given for the class.
        """
        base = self.class_prompt(label)
        label = int(label)
        if label in self._cache:
            return list(self._cache[label])
        kept, seen = [base], {dedupe_key(base)}

        def keep(texts: Sequence[str], limit: int | None) -> None:
            for text in texts:
                prompt = self.finish(text, label)
                if prompt and dedupe_key(prompt) not in seen and (limit is None or len(kept) < limit):
                    kept.append(prompt)
                    seen.add(dedupe_key(prompt))

        instruction = DESCRIBE_INSTRUCTION.format(name=self.class_names[label])
        for attempt in range(MAX_ATTEMPTS):
            missing = self.per_class - len(kept)
            if missing <= 0:
                break
            keep(self._generate([instruction], missing, self._seed_for(0, label, attempt)), self.per_class)
        keep(self._extra.get(label, []), None)
        self._cache[label] = kept
        return list(kept)

    def kept_descriptions(self) -> dict[int, list[str]]:
        """:meth:`descriptions` (the :class:`~coautogen_fl.prompts.base.KeepsDescriptions` protocol)."""
        return self.descriptions()

    def descriptions(self) -> dict[int, list[str]]:
        """Every class's descriptions (for logging and saving), writing the missing ones."""
        labels = range(len(self.class_names))
        if self.progress:
            from tqdm.auto import tqdm

            labels = tqdm(labels, desc="LLM descriptions", unit="class")
        return {label: self.describe(label) for label in labels}

    def sample(self, label: int, rng: np.random.Generator) -> str:
        options = self.describe(label)
        return options[int(rng.integers(len(options)))]

    def evolve(self, prompts: Sequence[str], labels: Sequence[int], rng: np.random.Generator) -> list[str]:
        """One child per parent: the LLM's small variation of the parent prompt, cleaned like a
        description; the parent's prompt when the LLM gives nothing usable."""
        if len(prompts) != len(labels):
            raise ValueError(f"evolve needs one label per prompt, got {len(prompts)} prompts and {len(labels)} labels")
        bases = [self.class_prompt(label) for label in labels]  # validates every label
        parents = [str(p) if str(p).strip() else base for p, base in zip(prompts, bases)]
        if not self.evolve_prompts or not parents:
            return parents
        seed = int(rng.integers(2**31 - 1))
        step = self.batch_size if self.tokenizer.pad_token is not None else 1  # rows of unequal length need padding
        starts = range(0, len(parents), step)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="LLM prompt evolution", unit="batch")
        children: list[str] = []
        for start in starts:
            chunk = range(start, min(start + step, len(parents)))
            instructions = [
                EVOLVE_INSTRUCTION.format(name=self.class_names[int(labels[i])], prompt=parents[i]) for i in chunk
            ]
            outputs = self._generate(instructions, 1, self._seed_for(1, seed, start))
            for i, text in zip(chunk, outputs):
                children.append(self.finish(text, int(labels[i])) or parents[i])
        return children

    def settings(self) -> dict[str, Any]:
        return {
            "source": "llm",
            "model": self.model_name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "evolve": self.evolve_prompts,
        }
