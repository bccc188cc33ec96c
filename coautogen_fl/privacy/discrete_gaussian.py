"""The exact discrete Gaussian sampler every secure noise share is drawn with.

Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy", Algorithms 1-3),
in integer arithmetic on the operating system's entropy only: no floating point touches a sample,
and nothing is seedable. What the noise buys (the privacy of a secure sum) is in :mod:`.distributed`.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from .accountant import _require

#: Largest variance :func:`discrete_gaussian` samples: sigma = 1e12, samples stay far inside int64.
MAX_SAMPLER_VARIANCE = 1e24


class _OsBits:
    """Uniform integers from ``os.urandom`` through a refilled bit pool (exact rejection sampling).

    One ``os.urandom`` call per 4 KiB instead of one per draw, as ``secrets.randbelow`` would do:
    the same exact uniform distribution, an order of magnitude faster. Never seeded.
    """

    __slots__ = ("_bits", "_pool")
    _CHUNK = 4096

    def __init__(self) -> None:
        self._pool, self._bits = 0, 0

    def getrandbits(self, k: int) -> int:
        if self._bits < k:
            need = max(self._CHUNK, (k + 7) // 8)
            self._pool |= int.from_bytes(os.urandom(need), "little") << self._bits
            self._bits += 8 * need
        value = self._pool & ((1 << k) - 1)
        self._pool >>= k
        self._bits -= k
        return value

    def randbelow(self, n: int) -> int:
        """Uniform on {0, ..., n-1} (n >= 1), by rejection of k-bit draws: exact."""
        if n == 1:
            return 0
        k = (n - 1).bit_length()
        while True:
            r = self.getrandbits(k)
            if r < n:
                return r


def _bernoulli_exp_unit(rng: _OsBits, num: int, den: int) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num/den <= 1 (CKS 2020, Algorithm 1, first part)."""
    k = 1
    while rng.randbelow(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _bernoulli_exp(rng: _OsBits, num: int, den: int) -> bool:
    """Bernoulli(exp(-num/den)) for any rational num/den >= 0 (CKS 2020, Algorithm 1)."""
    whole, rest = divmod(num, den)
    for _ in range(whole):
        if not _bernoulli_exp_unit(rng, 1, 1):
            return False
    return _bernoulli_exp_unit(rng, rest, den)


def _discrete_laplace(rng: _OsBits, t: int) -> int:
    """Discrete Laplace with scale t: P(y) proportional to exp(-|y|/t) (CKS 2020, Algorithm 2)."""
    while True:
        u = rng.randbelow(t)
        if not _bernoulli_exp(rng, u, t):
            continue
        v = 0
        while _bernoulli_exp_unit(rng, 1, 1):
            v += 1
        x = u + t * v
        negative = rng.getrandbits(1) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _discrete_gaussian_one(rng: _OsBits, p: int, q: int, t: int) -> int:
    """One N_Z(0, p/q) sample with proposal scale t = floor(sigma) + 1 (CKS 2020, Algorithm 3).

    Accepts Y with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)); with sigma^2 = p/q this is
    exp(-(|Y| q t - p)^2 / (2 p q t^2)), a ratio of integers.
    """
    den = 2 * p * q * t * t
    while True:
        y = _discrete_laplace(rng, t)
        if _bernoulli_exp(rng, (abs(y) * q * t - p) ** 2, den):
            return y


def _check_variance(variance: float, name: str, minimum: float = 0.0) -> float:
    v = float(variance)
    _require(
        math.isfinite(v) and v > minimum,
        name,
        variance,
        f"be a finite number > {minimum:g}",
        "derive it with share_variance(noise_multiplier, sensitivity, summands)",
    )
    return v


def discrete_gaussian(variance: float, size: int | tuple[int, ...]) -> np.ndarray:
    """Exact samples of the discrete Gaussian N_Z(0, variance) from the operating system's entropy.

    P(x) is proportional to ``exp(-x^2 / (2 variance))`` over the integers, sampled without any
    floating point (Canonne, Kamath, Steinke 2020, Algorithms 1-3, on ``Fraction(variance)``, which
    is exactly the float given). Note that the variance *of the samples* is slightly below
    ``variance`` when ``variance`` is small (e.g. 0.281 at 0.3); from ``variance`` ~ 1 on, the gap is
    below exp(-2 pi^2 variance) relatively.

    Parameters
    ----------
    variance : float
        sigma^2 of the discrete Gaussian, finite, > 0 and <= 1e24.
    size : int or tuple[int, ...]
        Shape of the result.

    Returns
    -------
    np.ndarray
        int64 array of iid samples of shape ``size``.

    Raises
    ------
    PrivacyError
        If ``variance`` is not finite and in (0, 1e24].
    """
    v = _check_variance(variance, "variance")
    _require(
        v <= MAX_SAMPLER_VARIANCE,
        "variance",
        variance,
        f"be <= {MAX_SAMPLER_VARIANCE:g}",
        "quantise the votes more coarsely",
    )
    frac = Fraction(v)  # exact: every float is a dyadic rational
    p, q = frac.numerator, frac.denominator
    t = math.isqrt(p * q) // q + 1  # floor(sqrt(p/q)) + 1, exactly
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    count = int(np.prod(shape, dtype=np.int64))
    rng = _OsBits()
    out = np.fromiter((_discrete_gaussian_one(rng, p, q, t) for _ in range(count)), dtype=np.int64, count=count)
    return out.reshape(shape)
