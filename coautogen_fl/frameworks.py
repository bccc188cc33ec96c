"""The frameworks (``-f``), one table: what each one's rounds are, and what it needs.

Config validation (``feedback.framework``'s choices and each framework's requirements), the
strategy (whether a round asks the sites for votes), the evolution (how votes become the next
pool) and resume all read :data:`FRAMEWORKS`; nothing else lists framework names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Framework:
    """One ``-f`` framework.

    Attributes
    ----------
    name : str
        The seed's name (``-f`` value).
    description : str
        One line for help texts and docs.
    votes : bool
        Its rounds ask the sites for votes (False: generate once, free in privacy).
    evolve : str or None
        The evolution mode it forces (``filter``, ``active``); None = ``feedback.evolve``.
    needs_llm : bool
        Needs ``prompts.llm``.
    secagg : bool
        Its releases can go through SecAgg+ (``privacy.mode=secagg``).
    """

    name: str
    description: str
    votes: bool
    evolve: Optional[str] = None
    needs_llm: bool = False
    secagg: bool = True


FRAMEWORKS: dict[str, Framework] = {
    f.name: f
    for f in (
        Framework("Gen", "generate once from the generator's prior, no votes", votes=False),
        Framework("GenLLM", "generate once from LLM-written prompts, no votes", votes=False, needs_llm=True),
        Framework("Feedback", "Private Evolution across sites: votes select and vary the pool", votes=True),
        Framework(
            "Filter",
            "generate, keep what the votes clear, accumulate to -vpl per class",
            votes=True,
            evolve="filter",
        ),
        Framework(
            "Active",
            "votes filter and accumulate; the sites' DP per-class errors of the current model steer "
            "volume and variation, its uncertainty picks what they vote on next",
            votes=True,
            evolve="active",
            secagg=False,
        ),
    )
}


def framework(name: str) -> Framework:
    """The framework ``name`` (``feedback.framework``); raises ValueError naming the choices."""
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    return FRAMEWORKS[name]
