"""The Gaussian mechanism applied to vote histograms, and the noise the server ends up with.

A site's vote vector has L2 sensitivity ``sensitivity`` with respect to the privacy unit
(one private image, or one whole site when vote vectors are L2-normalised to 1). Adding
N(0, (noise_multiplier * sensitivity)^2) to every coordinate is one Gaussian release with
noise multiplier ``noise_multiplier``; :mod:`.accountant` composes those releases.

Two rules protect the implementation, not just the mathematics:

- The noise comes from the operating system's entropy (``os.urandom``) on every release, never
  from a seedable generator: noise anyone can regenerate from a configured seed protects nothing.
- Released values are snapped to the public grid :data:`RELEASE_GRID` (post-processing, so the
  Gaussian guarantee is unchanged). Floating-point noise leaves input-dependent low-order bits
  in its sum (Mironov 2012); a coarse grid removes them. See docs/privacy.md for what remains.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from .accountant import PrivacyError, _check_int, _check_noise

NOISE_MODES = ("local", "central")
#: Released values are multiples of 1/RELEASE_GRID vote (a power of two: exact in float64).
RELEASE_GRID = 16
_UNIFORM_BITS = 53


def os_entropy_normal(size: int | tuple[int, ...]) -> np.ndarray:
    """Standard normal samples drawn from ``os.urandom``, by inverting the normal CDF at
    53-bit uniforms on the open interval (0, 1). Not seedable, by design."""
    count = int(np.prod(size))
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(64 - _UNIFORM_BITS)
    uniform = (words.astype(np.float64) + 0.5) / float(2**_UNIFORM_BITS)
    return ndtri(uniform).reshape(size)


def snap(values: np.ndarray) -> np.ndarray:
    """Round to the public release grid (multiples of 1 / RELEASE_GRID)."""
    return np.round(np.asarray(values, dtype=np.float64) * RELEASE_GRID) / RELEASE_GRID


def _check_sensitivity(sensitivity: float) -> float:
    c = float(sensitivity)
    if not (math.isfinite(c) and c > 0):
        raise PrivacyError(
            f"sensitivity must be a finite number > 0 (got {sensitivity!r}); use 1.0 when "
            "one record changes one vote, or the L2 norm bound of a site's vote vector"
        )
    return c


@dataclass(frozen=True)
class GaussianMechanism:
    """Adds iid Gaussian noise calibrated to an L2 sensitivity.

    Parameters
    ----------
    noise_multiplier : float
        Ratio of noise std to L2 sensitivity; must be finite and > 0. The privacy cost of
        one release depends on this number only.
    sensitivity : float (default: 1.0)
        L2 sensitivity of the released vector w.r.t. the privacy unit; must be > 0.
    """

    noise_multiplier: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        # Validated at construction so a misconfigured site fails before voting, not mid-run.
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "sensitivity", _check_sensitivity(self.sensitivity))

    @property
    def noise_std(self) -> float:
        """Standard deviation of the added noise: ``noise_multiplier * sensitivity``."""
        return self.noise_multiplier * self.sensitivity

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Return a noised float64 copy of ``values``, snapped to the release grid.

        Parameters
        ----------
        values : np.ndarray
            Votes of any shape; not modified.

        Returns
        -------
        np.ndarray
            ``snap(values + N(0, noise_std^2))`` iid per coordinate, dtype float64, with the
            noise read from the operating system's entropy.
        """
        noised = np.array(values, dtype=np.float64, copy=True)
        noised += self.noise_std * os_entropy_normal(noised.shape)
        return snap(noised)


def aggregate_noise_std(noise_multiplier: float, sensitivity: float, num_sites: int, mode: str) -> float:
    """Standard deviation of the noise on each coordinate of the summed votes.

    Parameters
    ----------
    noise_multiplier : float
        Noise multiplier of one release, > 0.
    sensitivity : float
        L2 sensitivity of one site's vote vector, > 0.
    num_sites : int
        Number of sites whose votes are summed, >= 1.
    mode : str
        ``"local"``: every site noises its own votes with the full noise (it trusts nobody),
        so the independent noises add up to ``sqrt(num_sites) * sigma * sensitivity``.
        ``"central"``: the server noises the sum once, ``sigma * sensitivity``.

    Returns
    -------
    float
        The per-coordinate noise std of the aggregate the server sees.
    """
    sigma = _check_noise(noise_multiplier)
    c = _check_sensitivity(sensitivity)
    n = _check_int(num_sites, "num_sites", 1, "pass the number of sites in the sum")
    if mode == "local":
        return math.sqrt(n) * sigma * c
    if mode == "central":
        return sigma * c
    raise PrivacyError(
        f"privacy.mode must be one of {', '.join(map(repr, NOISE_MODES))} (got {mode!r}); "
        "set privacy.mode='local' if sites do not trust the server"
    )
