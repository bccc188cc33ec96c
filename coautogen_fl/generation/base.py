"""The generator protocol and the candidate it produces.

Every generator (procedural, diffusers, latent GAN, HTTP API) answers the same two calls:
``random(label, n)`` draws fresh candidates of one class, ``vary(candidates, degree)``
returns one child per parent, ``degree`` in [0, 1] scaling how far a child may move away.
Every candidate carries the genotype its generator needs to vary (or re-render) it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from coautogen_fl.hub import ModelLoadError


class GeneratorLoadError(ModelLoadError):
    """A generator's model could not be loaded (missing locally, unusable device, bad folder,
    unreachable or misbehaving API); the message names the model and the fix."""


@dataclass
class Candidate:
    """One synthetic sample.

    Parameters
    ----------
    candidate_id : str
        Unique within a run; generators derive it from their seeded counter.
    label : int
        Class index into the run's class names.
    image : np.ndarray
        float32 in [0, 1], shape (H, W) for grayscale or (H, W, 3) for colour.
    genotype : dict
        JSON-serialisable parameters that made the image (enough to vary it again).
    parent_id : str or None
        The candidate this one was varied from; None for a fresh sample.
    round : int
        The Feedback round the candidate was born in (0 = initial population).
    votes : float or None
        The aggregated (noised) votes it received, once voted on.
    """

    candidate_id: str
    label: int
    image: np.ndarray
    genotype: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    round: int = 0
    votes: float | None = None

    def index_entry(self) -> dict[str, Any]:
        """The JSON-serialisable record of this candidate (everything but the pixels)."""
        return {
            "id": self.candidate_id,
            "label": int(self.label),
            "genotype": self.genotype,
            "parent": self.parent_id,
            "round": int(self.round),
            "votes": None if self.votes is None else float(self.votes),
        }


@runtime_checkable
class Generator(Protocol):
    """What the Feedback loop needs from a generator."""

    def random(self, label: int, n: int) -> list[Candidate]:
        """Draw ``n`` fresh candidates of class ``label``."""
        ...

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """Return one child per parent; ``degree`` in [0, 1] scales the change."""
        ...


@dataclass(frozen=True)
class GeneratorContext:
    """What every generator factory is told about the run (a plug-in class gets these as keyword
    arguments, see :mod:`coautogen_fl.registry`)."""

    class_names: tuple[str, ...]
    image_size: int
    channels: int
    device: str = "cpu"
    task_mode: str = "I2I"
    seed: int = 0


# ---------------------------------------------------------------------------------- optional capabilities
# A generator implements Generator; each Protocol below is an optional extra the loop uses when
# present. They are checked once, when the generator is built (GeneratorCapabilities.of): a
# plug-in author implements the ones they want from this file alone.


class Describable(Protocol):
    """A sampling distribution that can say where it stands (``metrics.jsonl``'s ``distribution``)."""

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Refittable(Protocol):
    """Votes refit the generator's sampling distribution (``feedback.evolve=distribution``)."""

    distribution: Any  # a Describable

    def fit(
        self, candidates: Sequence[Candidate], weights: np.ndarray, mix: float = 0.8, min_spread: float = 0.08
    ) -> None:
        """Move the sampling distribution toward ``candidates`` weighted by their votes."""
        ...


@runtime_checkable
class VoteObserver(Protocol):
    """Learns from each round's voted pool (e.g. latent attribute directions), Private Evolution mode."""

    def observe_votes(self, voted: Sequence[Candidate]) -> None: ...


@runtime_checkable
class Regenerable(Protocol):
    """Re-creates a candidate's pixels from its genotype alone (what post-processing stages and
    the final dataset's re-creation need); diffusers and image APIs also take the parent image."""

    def regenerate(self, genotype: dict[str, Any], *args: Any) -> np.ndarray: ...


@runtime_checkable
class Prompted(Protocol):
    """Draws from text prompts: its prompt source (an LLM's pool goes to ``prompts.json``)."""

    prompts: Any  # coautogen_fl.prompts.base.PromptSource


@runtime_checkable
class TokenLimited(Protocol):
    """Has a text encoder with a token limit that prompts written for it must fit."""

    @property
    def token_limit(self) -> int | None: ...

    def count_tokens(self, prompt: str) -> int: ...


@runtime_checkable
class Filtering(Protocol):
    """Filters its draws (e.g. the CLIP filter) and counts what it drew, kept and filled."""

    filter_stats: dict[str, Any]


@dataclass(frozen=True)
class GeneratorCapabilities:
    """What a built generator can do beyond :class:`Generator`, checked once."""

    refit: bool
    observes_votes: bool
    prompted: bool
    token_limited: bool
    filtering: bool

    @classmethod
    def of(cls, generator: Any) -> "GeneratorCapabilities":
        """Check ``generator`` (or the wrapper that forwards to it) against every Protocol."""
        return cls(
            refit=isinstance(generator, Refittable),
            observes_votes=isinstance(generator, VoteObserver),
            prompted=isinstance(generator, Prompted),
            token_limited=isinstance(generator, TokenLimited),
            filtering=isinstance(generator, Filtering),
        )


class CandidateMaker:
    """What every built-in generator shares: the class names, the id counter (ids
    ``<ID_PREFIX>-0000000``, ``-0000001``, ... in the order candidates are made, so a seeded run
    names them the same every time) and the label check."""

    ID_PREFIX = "candidate"
    class_names: Sequence[str]
    _counter: int = 0

    def _check_label(self, label: Any, what: str = "label") -> int:
        """``label`` as an int in ``0 .. len(class_names) - 1``, or a ValueError naming ``what``."""
        return check_int(what, label, 0, len(self.class_names) - 1)

    def _candidate(
        self, label: int, genotype: dict[str, Any], image: np.ndarray, parent_id: str | None, round_index: int
    ) -> Candidate:
        """Wrap an image into a candidate with the next id from the counter."""
        candidate_id = f"{self.ID_PREFIX}-{self._counter:07d}"
        self._counter += 1
        return Candidate(candidate_id, int(label), image, genotype, parent_id, round_index)


def stack_images(candidates: Sequence[Candidate]) -> np.ndarray:
    """Stack candidate images into one float32 array of shape (N, H, W[, C])."""
    if not candidates:
        raise ValueError("stack_images needs at least one candidate")
    return np.stack([np.asarray(c.image, dtype=np.float32) for c in candidates])


def check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """Validate an integer argument of a generator, naming it and the accepted range in the error."""
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not valid or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return int(value)


#: Per-image seeds are drawn from [0, SEED_HIGH) (fits every int32 seed argument).
SEED_HIGH = 2**31 - 1

#: Lowest image-to-image / inpainting strength ``vary`` uses (degree 0 would return the parent).
MIN_STRENGTH = 0.05

#: Task modes of ``vary`` for prompt-driven generators: "I2I" = image-to-image from the parent's
#: pixels, "T2I" = the parent's (evolved) prompt with a new seed.
TASK_MODES = ("I2I", "T2I")


def check_output_spec(
    class_names: Sequence[str], image_size: int, channels: int, task_mode: str | None = None
) -> tuple[str, ...]:
    """Validate the arguments every generator shares; return the class names as a tuple of str.

    Raises
    ------
    ValueError
        Blank or missing class names, ``image_size`` < 8, ``channels`` not 1 or 3, or a
        ``task_mode`` (when given) not in :data:`TASK_MODES`.
    """
    names = tuple(str(c) for c in class_names)
    if not names or any(not c.strip() for c in names):
        raise ValueError(f"class_names must be a non-empty sequence of non-blank names, got {list(class_names)!r}")
    check_int("image_size", image_size, 8)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if task_mode is not None and task_mode not in TASK_MODES:
        raise ValueError(f"task_mode must be one of {TASK_MODES}, got {task_mode!r}")
    return names
