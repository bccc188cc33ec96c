"""The annealed variation degree handed to ``Generator.vary`` each Feedback round.

Early rounds explore (large steps away from the voted parents), later rounds refine (small
steps), like the seed project's image-to-image strength annealed from 0.8 towards 0.6 by 0.02
per round.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass
class DegreeSchedule:
    """Linear annealing of the variation degree, clamped at ``end``.

    Parameters
    ----------
    start : float, default 0.8
        Degree of round 0, in [0, 1].
    end : float, default 0.2
        Floor the degree never goes below, in [0, start].
    step : float, default 0.06
        Decrease per round, >= 0 (0 keeps the degree at ``start``).
    """

    start: float = 0.8
    end: float = 0.2
    step: float = 0.06

    def __post_init__(self) -> None:
        for name in ("start", "end", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not 0.0 <= self.end <= self.start <= 1.0:
            raise ValueError(
                f"need 0 <= end <= start <= 1, got start={self.start!r}, end={self.end!r}; "
                "the degree anneals downwards from start to end"
            )
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step!r}; use 0 for a constant degree")

    def degree(self, round_index: int) -> float:
        """The degree for one round: ``max(end, start - step * round_index)``.

        Parameters
        ----------
        round_index : int
            The Feedback round, 0 for the first variation round; must be >= 0.

        Returns
        -------
        float
            A degree in [end, start].
        """
        valid = isinstance(round_index, numbers.Integral) and not isinstance(round_index, bool)
        if not valid or round_index < 0:
            raise ValueError(f"round_index must be an int >= 0, got {round_index!r}")
        return float(max(self.end, self.start - self.step * int(round_index)))


def check_degree(degree: float) -> float:
    """Validate a variation degree for ``Generator.vary``.

    Parameters
    ----------
    degree : float
        Must be a real number in [0, 1].

    Returns
    -------
    float
        The degree as a Python float.

    Raises
    ------
    ValueError
        If ``degree`` is not a number in [0, 1] (NaN included); the message names the value.
    """
    value = float(degree) if isinstance(degree, numbers.Real) else math.nan
    if not 0.0 <= value <= 1.0:  # NaN and non-numbers fail this comparison too
        raise ValueError(f"degree must be a number in [0, 1], got {degree!r}")
    return value
