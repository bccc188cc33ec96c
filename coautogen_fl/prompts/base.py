"""Where a generator's prompts come from.

A prompt source answers two calls: ``sample(label, rng)`` gives the prompt of a fresh candidate
of one class, ``evolve(prompts, labels, rng)`` turns the prompts of voted parents into the
prompts of their children (T2I Feedback). The default, :class:`TemplatePrompts`, fills the class
name into one template and keeps a parent's prompt; an LLM source (``prompts/llm.py``) rewrites
them. ``settings()`` is recorded in every genotype so a candidate says how its prompt was made.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class PromptSource(Protocol):
    """What a generator needs to draw and evolve prompts."""

    def sample(self, label: int, rng: np.random.Generator) -> str:
        """The prompt of one fresh candidate of class ``label``."""
        ...

    def evolve(self, prompts: Sequence[str], labels: Sequence[int], rng: np.random.Generator) -> list[str]:
        """One child prompt per parent prompt (same order)."""
        ...

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable description of the source (recorded in genotypes)."""
        ...


@runtime_checkable
class KeepsDescriptions(Protocol):
    """A prompt source with per-class descriptions worth saving (``prompts.json``): an LLM's
    pool, or captions of public reference images."""

    def kept_descriptions(self) -> dict[int, list[str]]:
        """Every class's descriptions (empty when there are none)."""
        ...


class TemplatePrompts:
    """``template.format(name=class_names[label])`` for every candidate; parents keep their prompt.

    Parameters
    ----------
    class_names : Sequence[str]
        Non-blank class names.
    template : str, default "a photo of {name}"
        A format string whose only field is ``{name}``.
    descriptions : dict[int, list[str]] or None, default None
        Extra prompts per class (e.g. captions of public reference images); when a class has
        some, ``sample`` draws uniformly from them instead of using the template.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        template: str = "a photo of {name}",
        descriptions: dict[int, list[str]] | None = None,
    ) -> None:
        names = tuple(str(c) for c in class_names)
        if not names or any(not c.strip() for c in names):
            raise ValueError(f"class_names must be a non-empty sequence of non-blank names, got {list(class_names)!r}")
        try:
            template.format(name=names[0])
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"prompt template must be a format string whose only field is {{name}}, got {template!r}"
            ) from exc
        self.class_names = names
        self.template = template
        self.descriptions = {int(k): [str(p) for p in v if str(p).strip()] for k, v in (descriptions or {}).items()}

    def kept_descriptions(self) -> dict[int, list[str]]:
        """The extra descriptions per class (e.g. captions); empty for templates alone."""
        return {label: list(prompts) for label, prompts in self.descriptions.items()}

    def class_prompt(self, label: int) -> str:
        """The template prompt of class ``label``."""
        if not 0 <= int(label) < len(self.class_names):
            raise ValueError(f"label must be in [0, {len(self.class_names) - 1}], got {label!r}")
        return self.template.format(name=self.class_names[int(label)])

    def sample(self, label: int, rng: np.random.Generator) -> str:
        prompt = self.class_prompt(label)
        options = self.descriptions.get(int(label))
        return options[int(rng.integers(len(options)))] if options else prompt

    def evolve(self, prompts: Sequence[str], labels: Sequence[int], rng: np.random.Generator) -> list[str]:
        return [str(p) if str(p).strip() else self.class_prompt(label) for p, label in zip(prompts, labels)]

    def settings(self) -> dict[str, Any]:
        return {"source": "template", "template": self.template}
