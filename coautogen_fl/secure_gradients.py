"""Integer gradient sums for secure aggregation: DP-SGD of ``-tt real`` / ``-tt mix`` with
``privacy.mode=secagg``. The encoding both ends share, as :mod:`coautogen_fl.secure_votes` is for votes.

Each round, every site computes the sum of its private examples' gradients, each clipped to L2
norm ``C`` (all its voter images: a full batch, see below), flattens it (parameters in sorted name
order), clips every coordinate to the public cap ``[-cap * C, cap * C]``, scales it by a power of two
and rounds it to integers, adds its discrete-Gaussian share of the noise, and hands it to
Flower's SecAgg+, which reveals only the sum over the sites. The server divides by the scale and
takes one optimiser step on it: the pooled DP-SGD step of ``privacy.mode=central``, without a
server that sees any site's gradients.

- **Sensitivity.** Adding or removing one example moves the clean sum by at most ``C`` in L2; the
  coordinate clipping is 1-Lipschitz per coordinate, so it cannot move it more; rounding each
  coordinate to the nearest integer moves each by less than 1 more. The integer sum's L2
  sensitivity is therefore ``scale * C + sqrt(d)`` for ``d`` coordinates; the scale is the smallest
  power of two with ``sqrt(d) <= scale * C / 100`` (the rounding costs at most 1 % of the noise).
- **Full batches.** A secure sum is accounted by the distributed discrete Gaussian bound
  (zCDP, :mod:`coautogen_fl.privacy.distributed`). Amplification by Poisson subsampling is proved
  tightly for the Gaussian only; the general bound for any Renyi-DP mechanism (Zhu & Wang 2019,
  Theorem 6) costs 5x the epsilon at DP-SGD's rates here, so the secure rounds take every example
  (sample rate 1, nothing to amplify) and each round is one ``kind="ddg"`` charge.
- **Range.** As for votes: ``B`` is the clean cap plus a noise slack exceeded with probability
  <= 2^-64 by a site adding all the noise itself; ``sites * 2B < 2^32`` is checked before a round.

Plain Python and numpy: no flwr, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .privacy.distributed import check_modulus, secagg_bound
from .secure_votes import MODULUS, NoiseShares

#: The rounding of one coordinate may add at most this fraction of ``scale * C`` to the L2
#: sensitivity (sqrt(d) <= scale * C / ROUNDING_HEADROOM).
ROUNDING_HEADROOM = 100.0


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector of ``arrays``' values, in sorted name order (both ends agree on it)."""
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in sorted(arrays)])


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays shaped and named as ``reference`` (float32) from a vector :func:`flatten` made."""
    out, offset = {}, 0
    for name in sorted(reference):
        shape = np.shape(reference[name])
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = np.asarray(vector[offset : offset + size], dtype=np.float32).reshape(shape)
        offset += size
    if offset != len(vector):
        raise ValueError(f"a vector of {len(vector)} values does not fill a model of {offset} parameters")
    return out


@dataclass(frozen=True)
class SecureGradientEncoding(NoiseShares):
    """How one round's clipped gradient sums become integers, and the noise each site adds.

    Parameters
    ----------
    noise_multiplier : float
        ``s``: the sum of any ``summands`` sites carries noise of std ``s`` x the integer sensitivity.
    summands : int
        ``t``: the fewest sites any revealed sum holds (:attr:`SecAggShape.sites_in_sum`).
    max_grad_norm : float
        ``C``: each example's gradient is clipped to this L2 norm.
    coordinates : int
        ``d``: the model's trainable parameters.
    coordinate_cap : float
        Each coordinate of a site's clean sum is clipped to ``[-cap * C, cap * C]`` (public).
    """

    noise_multiplier: float
    summands: int
    max_grad_norm: float
    coordinates: int
    coordinate_cap: float

    @property
    def scale(self) -> int:
        """The smallest power of two with ``sqrt(d) <= scale * C / ROUNDING_HEADROOM``."""
        need = ROUNDING_HEADROOM * math.sqrt(self.coordinates) / self.max_grad_norm
        return 1 << max(0, math.ceil(math.log2(need)))

    @property
    def integer_sensitivity(self) -> float:
        """L2 sensitivity of a site's integer sum: ``scale * C`` plus ``sqrt(d)`` of rounding."""
        return self.scale * self.max_grad_norm + math.sqrt(self.coordinates)

    @property
    def clean_cap(self) -> int:
        """The largest clean integer coordinate (in absolute value)."""
        return math.ceil(self.scale * self.coordinate_cap * self.max_grad_norm)

    @property
    def bound(self) -> int:
        """SecAgg+'s clipping range ``B``: the clean cap plus the slack of a site adding all the
        noise itself (one summand), so no site's value is ever clipped."""
        return secagg_bound(self.clean_cap, self.share_variance(1), self.coordinates)

    def check_modulus(self, sites: int) -> None:
        """Refuse a round whose modular sum could wrap: ``sites * 2B`` must stay below 2^32."""
        check_modulus(
            self.bound,
            sites,
            MODULUS,
            "ask fewer sites per round (federation.fraction_train; the noise a single site may add sets the "
            f"range) or lower privacy.secagg_gradient_cap (now {self.coordinate_cap:g})",
        )

    def encode(self, gradient_sum: Mapping[str, np.ndarray]) -> np.ndarray:
        """Clean integers: the flattened sum clipped per coordinate, scaled and rounded."""
        limit = self.coordinate_cap * self.max_grad_norm
        flat = np.clip(flatten(gradient_sum), -limit, limit)
        if flat.size != self.coordinates:
            raise ValueError(f"a gradient sum of {flat.size} values for a model of {self.coordinates} parameters")
        return np.rint(flat * self.scale).astype(np.int64)

    def decode(self, integer_sum: np.ndarray) -> np.ndarray:
        """The summed gradients (gradient units, flat) from the integer sum SecAgg+ revealed."""
        return np.asarray(integer_sum, dtype=np.float64) / self.scale
