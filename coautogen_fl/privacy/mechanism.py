"""The Gaussian mechanism applied to vote histograms, and the noise the server ends up with.

A site's vote vector has L2 sensitivity ``sensitivity`` with respect to the privacy unit
(one private image, or one whole site when vote vectors are L2-normalised to 1). Adding
N(0, (noise_multiplier * sensitivity)^2) to every coordinate is one Gaussian release with
noise multiplier ``noise_multiplier``; :mod:`.accountant` composes those releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .accountant import PrivacyError, _check_int, _check_noise

NOISE_MODES = ("local", "central")


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

    def apply(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a noised float64 copy of ``values``.

        Parameters
        ----------
        values : np.ndarray
            Votes of any shape; not modified.
        rng : np.random.Generator
            Source of the noise. Pass a dedicated, unseeded (OS-entropy) generator in real
            runs: noise that the server can reproduce from a known seed protects nothing.

        Returns
        -------
        np.ndarray
            ``values + N(0, noise_std^2)`` iid per coordinate, dtype float64.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (got {type(rng).__name__}); "
                "create one with numpy.random.default_rng()"
            )
        # np.array (not asarray) so the result never aliases the caller's buffer.
        noised = np.array(values, dtype=np.float64, copy=True)
        noised += rng.normal(0.0, self.noise_std, size=noised.shape)
        return noised


def aggregate_noise_std(
    noise_multiplier: float, sensitivity: float, num_sites: int, mode: str
) -> float:
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
