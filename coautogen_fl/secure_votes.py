"""Integer votes for secure aggregation (``privacy.mode=secagg``): the encoding both ends share.

Flower's SecAgg+ sums integer vectors modulo 2^32 and reveals only the sum. A site turns its
vote vector into integers, adds its share of the noise (a discrete Gaussian of variance
``(s * D)^2 / t``, where ``s`` is the run's noise multiplier, ``D`` the integer L2 sensitivity and
``t`` the number of sites the site counts on being in the sum, :class:`SecAggShape`), and hands the result to SecAgg+.
Any sum over ``t`` or more sites then carries at least the planned noise.

The encoding is chosen so that SecAgg+'s own quantisation is the identity on it:

- clipping range ``B`` (an integer) and quantisation range ``2B``: a value ``x`` in ``[-B, B]``
  becomes ``x + B`` exactly (its stochastic rounding never fires on an integer);
- weight 1 per site (``max_weight = 1`` and ``num_examples = 1``): sites never send their size;
- ``B`` is the clean-vote cap plus a noise slack exceeded with probability <= 2^-64, so no
  site's value is ever clipped, and ``sites * 2B`` < 2^32, so the modular sum never wraps.

Plain Python: no flwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .privacy.accountant import PrivacyError, noise_multiplier_for_epsilon
from .privacy.distributed import (
    check_modulus,
    ddg_noise_multiplier,
    noise_for_epsilon_secagg,
    secagg_bound,
    secagg_releases,
    share_variance,
)

#: The modulus of the masked sums (Flower's SecAgg+ default ``modulus_range``).
MODULUS = 2**32
#: Fixed-point scale of votes that are not integer counts (k > 1 or unit=site).
ROUNDING_SCALE = 64
#: Smallest noise std a site's share may have, in integer units: below about 1 the distributed
#: discrete Gaussian bound (Kairouz, Liu, Steinke 2021) degrades fast, so integer counts are
#: scaled up until a share is at least this wide.
MIN_SHARE_STD = 4.0


#: Largest SecAgg+ neighbourhood (a site and the sites it shares keys with). SecAgg+'s work grows
#: with sites x neighbourhood^2 (Shamir shares in pure Python: 1,000 sites in windows of 51 took
#: 11 min a round here), so beyond this many sites each shares with a window of them; Bell et al.
#: (2020) size the windows O(log n).
MAX_NEIGHBOURS = 25


@dataclass(frozen=True)
class SecAggShape:
    """How SecAgg+ is laid out for a round, and the fewest sites any sum it reveals can hold.

    Flower's SecAgg+ puts the sampled sites on a shuffled ring; each shares its keys with the
    window of ``neighbours`` sites centred on it (all of them up to :data:`MAX_NEIGHBOURS` sites),
    and aborts unless every site keeps at least ``reconstruction`` live sites in its window. So a
    revealed sum holds at least ``reconstruction`` sites for each of the ``sampled // neighbours``
    disjoint windows of the ring (:attr:`sites_in_sum`).

    Parameters
    ----------
    sampled : int
        Sites asked this round (>= 2).
    neighbours : int
        SecAgg+'s ``num_shares`` (odd when less than ``sampled``).
    reconstruction : int
        SecAgg+'s ``reconstruction_threshold`` (Shamir), >= 2.
    """

    sampled: int
    neighbours: int
    reconstruction: int

    @classmethod
    def plan(cls, sampled: int, fraction: float, max_neighbours: int | None = None) -> "SecAggShape":
        """Windows of at most ``max_neighbours`` sites (default :data:`MAX_NEIGHBOURS`), each
        needing ``ceil(fraction x window)`` alive."""
        max_neighbours = MAX_NEIGHBOURS if max_neighbours is None else max_neighbours
        if sampled < 2:
            raise PrivacyError(
                f"privacy.mode=secagg needs at least 2 sites in a round (got {sampled}); "
                "add sites or use privacy.mode=local"
            )
        neighbours = sampled if sampled <= max_neighbours else max_neighbours | 1
        cap = neighbours if neighbours == sampled else neighbours - 1  # Flower: threshold < num_shares
        return cls(sampled, neighbours, min(cap, max(2, math.ceil(fraction * neighbours))))

    @property
    def sites_in_sum(self) -> int:
        """The fewest sites whose inputs (and noise shares) any revealed sum holds."""
        if self.neighbours >= self.sampled:
            return self.reconstruction
        return (self.sampled // self.neighbours) * self.reconstruction


class NoiseShares:
    """The noise shares of an integer encoding for SecAgg+ (votes or gradient sums): a subclass
    has ``noise_multiplier`` (``s``), ``summands`` (``t``), ``scale``, ``coordinates`` and
    ``integer_sensitivity`` (``D``); any sum of ``t`` shares carries noise of std ``s * D``."""

    noise_multiplier: float
    summands: int
    coordinates: int
    scale: int
    integer_sensitivity: float

    def share_variance(self, summands: int) -> float:
        """Variance of the noise a site adds when it counts on ``summands`` sites in the sum."""
        return share_variance(self.noise_multiplier, self.integer_sensitivity, summands)

    def charge_multiplier(self, summands: int) -> float:
        """The Gaussian-equivalent noise multiplier a site's ledger charges for its share (``kind="ddg"``)."""
        return ddg_noise_multiplier(self.share_variance(summands), self.integer_sensitivity, summands, self.coordinates)

    def sum_noise_std(self, sites: int) -> float:
        """Std (in the encoded quantity's units) of the noise in a sum of ``sites`` shares planned for ``summands``."""
        return self.noise_multiplier * self.integer_sensitivity / self.scale * math.sqrt(sites / self.summands)


@dataclass(frozen=True)
class SecureVoteEncoding(NoiseShares):
    """How one round's votes become integers, and the noise each site adds.

    Parameters
    ----------
    noise_multiplier : float
        ``s``: the sum of any ``summands`` sites carries noise of std ``s * D`` (integer units).
    summands : int
        ``t``: the fewest sites any revealed sum holds (:attr:`SecAggShape.sites_in_sum`).
    scale : int
        Integer votes are ``scale * votes`` (rounded unless the votes are integer counts).
    exact : bool
        True when the votes are integer counts (k = 1, unit image): no rounding slack.
    sensitivity : float
        L2 sensitivity of one site's votes in vote units (:func:`coautogen_fl.rater.vote_sensitivity`).
    changed_coordinates : int
        Coordinates one privacy unit can change (k, 2k with a per-label cap, all for unit=site):
        each may move by 1 more through rounding.
    vote_cap : int
        Clean votes per candidate are clipped to ``[0, vote_cap]`` (vote units; public).
    coordinates : int
        Length of the vote vector (the pool).
    """

    noise_multiplier: float
    summands: int
    scale: int
    exact: bool
    sensitivity: float
    changed_coordinates: int
    vote_cap: int
    coordinates: int

    @classmethod
    def plan(
        cls,
        noise_multiplier: float,
        summands: int,
        k: int,
        unit: str,
        sensitivity: float,
        capped: bool,
        vote_cap: int,
        coordinates: int,
    ) -> "SecureVoteEncoding":
        """The encoding a site and the server both derive from public settings."""
        exact = k == 1 and unit == "image"
        changed = coordinates if unit == "site" else (2 * k if capped else k)
        if exact:  # counts: scale them until a share of the noise is MIN_SHARE_STD wide
            share_std = noise_multiplier * sensitivity / math.sqrt(summands)
            scale = 1 << max(0, math.ceil(math.log2(MIN_SHARE_STD / share_std))) if share_std < MIN_SHARE_STD else 1
        else:
            scale = ROUNDING_SCALE
        return cls(noise_multiplier, summands, scale, exact, sensitivity, changed, vote_cap, coordinates)

    @property
    def integer_sensitivity(self) -> float:
        """L2 sensitivity of the integer votes: ``scale * D``, plus ``sqrt(changed)`` of rounding."""
        base = self.scale * self.sensitivity
        return base if self.exact else base + math.sqrt(self.changed_coordinates)

    @property
    def bound(self) -> int:
        """SecAgg+'s clipping range ``B``: the clean cap plus the slack of a site adding all the
        noise itself (one summand), so no site's share is ever clipped."""
        return secagg_bound(self.scale * self.vote_cap, self.share_variance(1), self.coordinates)

    def check_modulus(self, sites: int) -> None:
        """Refuse a round whose modular sum could wrap: ``sites * 2B`` must stay below 2^32."""
        check_modulus(
            self.bound,
            sites,
            MODULUS,
            f"lower privacy.secagg_vote_cap (now {self.vote_cap}) or the sites per round (federation.fraction_train)",
        )

    def encode(self, votes: np.ndarray) -> np.ndarray:
        """Clean integer votes: ``scale * votes`` (rounded), clipped per coordinate to the cap."""
        scaled = np.asarray(votes, dtype=np.float64) * self.scale
        return np.clip(np.rint(scaled), 0, self.scale * self.vote_cap).astype(np.int64)

    def decode(self, integer_sum: np.ndarray) -> np.ndarray:
        """Votes (vote units) from the integer sum SecAgg+ revealed."""
        return np.asarray(integer_sum, dtype=np.float64) / self.scale


def plan_secagg_noise(
    epsilon: float,
    delta: float,
    rounds: int,
    gaussian_releases: int,
    sampled: int,
    fraction: float,
    encoding_args: dict,
) -> float:
    """The noise multiplier ``s`` of a secagg run: ``rounds`` secure vote sums plus
    ``gaussian_releases`` plain Gaussian releases (a noised evaluation) within ``epsilon``, as
    every site's ledger will charge them (RDP composition of the distributed discrete Gaussian
    bound). The integer scale depends on ``s`` (counts are scaled until a share is wide enough)
    and ``s`` on the scale only through the bound's tiny correction, so two passes settle it.

    ``encoding_args`` are :meth:`SecureVoteEncoding.plan`'s k, unit, sensitivity, capped,
    vote_cap and coordinates; ``sampled`` is the expected number of sites per round.
    """
    threshold = SecAggShape.plan(sampled, fraction).sites_in_sum
    s = noise_multiplier_for_epsilon(epsilon, delta, rounds + gaussian_releases)  # the Gaussian plan: a first guess
    for _ in range(2):
        encoding = SecureVoteEncoding.plan(s, threshold, **encoding_args)
        s = noise_for_epsilon_secagg(
            epsilon, delta, rounds, encoding.integer_sensitivity, threshold, encoding.coordinates, gaussian_releases
        )
    return s


def secagg_vote_releases(
    noise_multiplier: float, rounds: int, gaussian_releases: int, summands: int, encoding_args: dict
) -> list[tuple]:
    """The ledger entries of ``rounds`` secure vote sums at ``noise_multiplier`` for ``summands``
    sites, plus ``gaussian_releases`` plain Gaussian releases at the same noise (what every site
    charges; :func:`coautogen_fl.privacy.epsilon_for_releases` tuples). ``encoding_args`` as in
    :func:`plan_secagg_noise`."""
    encoding = SecureVoteEncoding.plan(noise_multiplier, summands, **encoding_args)
    return secagg_releases(
        noise_multiplier, rounds, encoding.integer_sensitivity, summands, encoding.coordinates, gaussian_releases
    )
