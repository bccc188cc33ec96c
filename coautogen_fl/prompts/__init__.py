"""Prompts: class-name templates, LLM rewriting (GenLLM, prompt evolution) and captions."""

from .base import PromptSource, TemplatePrompts

__all__ = ["PromptSource", "TemplatePrompts"]
