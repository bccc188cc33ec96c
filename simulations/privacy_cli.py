"""`coautogen privacy`: plan a site's privacy budget before it joins a federation.

    coautogen privacy --epsilon E [--delta D] [--rounds T] [--mode local|central --sites K] [--json]
    coautogen privacy --noise S   [--delta D] [--rounds T] [--mode local|central --sites K] [--json]

With --epsilon it prints the noise multiplier every round must use so that T full-participation
Gaussian vote releases spend exactly epsilon at delta, and checks it by recomputing the epsilon
those releases spend. With --noise it prints the epsilon that T releases at that noise multiplier
spend. Both use the run's own accountant (:mod:`coautogen_fl.privacy.accountant`, exact
Gaussian-DP composition), so the plan and the sites' ledgers agree. With --mode and --sites it
also prints the std of the noise on the sum of K sites' votes, and what the mode protects.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import IO, Any

from coautogen_fl.privacy import (
    NOISE_MODES,
    PrivacyError,
    aggregate_noise_std,
    epsilon_for_noise,
    gdp_mu,
    noise_multiplier_for_epsilon,
    validate_epsilon_delta,
)

#: The strategy sums votes whose L2 sensitivity is 1 (one image changes one vote; or a site's
#: vote vector is normalised to 1), so noise stds below are in units of one vote.
VOTE_SENSITIVITY = 1.0

MODE_GUARANTEES = {
    "local": (
        "local mode: each site adds the full noise to its own votes before they leave it, so every "
        "site's votes are private even from the server; the price is sqrt(sites) times the noise "
        "of central mode on the aggregate."
    ),
    "central": (
        "central mode: sites send raw votes and trust the server, which adds the noise once to the "
        "sum; the guarantee protects the sites from whoever sees the aggregate, not from the server."
    ),
}


class _Refusal(Exception):
    """Bad command-line input; the message names the flag and the fix."""


def add_privacy_parser(subparsers: Any) -> None:
    """Add the ``privacy`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "privacy",
        allow_abbrev=False,
        help="plan a privacy budget: the noise for an epsilon, or the epsilon of a noise",
        description="Plan a site's privacy budget with the run's exact Gaussian-DP accountant.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--epsilon", type=float, help="total epsilon of the whole run; prints the noise multiplier per round"
    )
    target.add_argument(
        "--noise",
        type=float,
        metavar="S",
        help="noise multiplier per round (noise std / vote sensitivity); prints the epsilon spent",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="total delta, 0 < delta < 1 (default: 1e-5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="releases: the feedback rounds, plus 1 for the noised federated evaluation "
        "(privacy.evaluation=noised, the default: feedback.rounds=2 makes 3) (default: 1)",
    )
    parser.add_argument("--mode", choices=NOISE_MODES, help="who adds the noise (needs --sites)")
    parser.add_argument("--sites", type=int, metavar="K", help="sites whose votes are summed (needs --mode)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range flags by their command-line names (the library re-checks them)."""
    if args.epsilon is not None and not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise _Refusal(
            f"--epsilon must be a finite number > 0 (got {args.epsilon:g}); "
            "pass the site's total budget, e.g. --epsilon 1"
        )
    if args.noise is not None and not (math.isfinite(args.noise) and args.noise > 0):
        raise _Refusal(
            f"--noise must be a finite number > 0 (got {args.noise:g}); "
            "pass a noise multiplier such as --noise 10, or use --epsilon to derive one"
        )
    if not 0.0 < args.delta < 1.0:  # also refuses nan
        raise _Refusal(
            f"--delta must satisfy 0 < delta < 1 (got {args.delta:g}); pass e.g. --delta 1e-5, "
            "well below 1/(number of private records)"
        )
    if args.rounds < 1:
        raise _Refusal(
            f"--rounds must be an integer >= 1 (got {args.rounds}); pass the number of vote releases (feedback rounds)"
        )
    if args.mode is not None and args.sites is None:
        raise _Refusal(f"--mode {args.mode} needs --sites K, the number of sites whose votes are summed")
    if args.sites is not None and args.mode is None:
        raise _Refusal("--sites needs --mode local or --mode central (who adds the noise)")
    if args.sites is not None and args.sites < 1:
        raise _Refusal(
            f"--sites must be an integer >= 1 (got {args.sites}); pass the number of sites whose votes are summed"
        )


def _fmt(x: float) -> str:
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.3e}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The numbers `coautogen privacy` prints, as a dict (raises PrivacyError / _Refusal)."""
    _check_args(args)
    rounds, delta = int(args.rounds), float(args.delta)
    if args.epsilon is not None:
        validate_epsilon_delta(args.epsilon, delta)
        noise = noise_multiplier_for_epsilon(args.epsilon, delta, rounds)
        epsilon = float(args.epsilon)
    else:
        noise = float(args.noise)
        epsilon = epsilon_for_noise([noise] * rounds, delta)
    result: dict[str, Any] = {"epsilon": epsilon, "delta": delta, "rounds": rounds, "noise_multiplier": noise}
    if args.mode is not None:
        result["mode"] = args.mode
        result["sites"] = int(args.sites)
        result["aggregate_noise_std"] = aggregate_noise_std(noise, VOTE_SENSITIVITY, int(args.sites), args.mode)
    return result


def _human(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    eps, delta, rounds, noise = result["epsilon"], result["delta"], result["rounds"], result["noise_multiplier"]
    mu = gdp_mu([noise] * rounds)
    over = f"over {_plural(rounds, 'round')} at delta {delta:g}; exact Gaussian-DP composition, mu = {mu:.4f}"
    if args.epsilon is not None:
        spent = epsilon_for_noise([noise] * rounds, delta)
        lines = [
            f"noise multiplier per round: {_fmt(noise)} (epsilon {eps:g} {over})",
            f"check: {_plural(rounds, 'round')} at noise multiplier {_fmt(noise)} spend epsilon {_fmt(spent)} "
            f"at delta {delta:g}",
        ]
    else:
        lines = [f"epsilon: {_fmt(eps)} (noise multiplier {_fmt(noise)} per round {over})"]
    if "mode" in result:
        sites, mode = result["sites"], result["mode"]
        how = (
            f"sqrt({sites}) x {_fmt(noise)}, one full noise per site"
            if mode == "local"
            else f"{_fmt(noise)}, added once by the server"
        )
        lines.append(
            f"aggregate noise std: {_fmt(result['aggregate_noise_std'])} per vote coordinate "
            f"({mode} mode, {_plural(sites, 'site')}: {how}; vote sensitivity 1)"
        )
        lines.append(MODE_GUARANTEES[mode])
    return lines


def command_privacy(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run `coautogen privacy`; 0 on success, 2 (one line on stderr) on bad input."""
    out = out or sys.stdout  # resolved per call, so callers can redirect stdout
    try:
        result = plan(args)
    except (_Refusal, PrivacyError) as exc:
        print(f"coautogen privacy: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write("\n".join(_human(args, result)) + "\n")
    return 0
