"""`coautogen privacy`: the budget planner a site's privacy officer runs before joining.

Every test runs twice: through a parser built here with ``add_privacy_parser`` and through
``simulations.cli.main`` (the installed ``coautogen`` command).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest

from coautogen_fl.privacy import epsilon_for_noise, noise_multiplier_for_epsilon
from simulations import cli
from simulations.privacy_cli import add_privacy_parser, command_privacy

NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


def _own_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coautogen")
    add_privacy_parser(parser.add_subparsers(dest="command", required=True))
    return command_privacy(parser.parse_args(argv))


@pytest.fixture(params=["add_privacy_parser", "cli.main"])
def coautogen(request, capsys):
    """Run ``coautogen privacy ARGS``; returns (exit code, stdout, stderr)."""
    main = _own_main if request.param == "add_privacy_parser" else cli.main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(["privacy", *argv])
        except SystemExit as exc:  # argparse refusals
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*" + NUMBER, text)
    assert match, f"no {label!r} in {text!r}"
    return float(match.group(1))


# --- --epsilon: the noise multiplier each round needs --------------------------------------


@pytest.mark.parametrize("rounds, expected", [(1, 3.73), (10, 11.80)])
def test_noise_for_epsilon_human(coautogen, rounds, expected):
    code, out, err = coautogen("--epsilon", "1", "--delta", "1e-5", "--rounds", str(rounds))
    assert code == 0 and err == ""
    noise = _number_after("noise multiplier per round:", out)
    assert noise == pytest.approx(expected, rel=2e-3)
    assert "Gaussian-DP" in out and f"over {rounds} round" in out and "delta 1e-05" in out
    # The printed check recomputes the epsilon those rounds spend.
    assert _number_after("spend epsilon", out) == pytest.approx(1.0, abs=1e-4)


def test_human_output_line_format(coautogen):
    code, out, _ = coautogen("--epsilon", "1", "--rounds", "4")
    assert code == 0
    assert out.splitlines()[0] == (
        "noise multiplier per round: 7.4613 (epsilon 1 over 4 rounds at delta 1e-05; "
        "exact Gaussian-DP composition, mu = 0.2681)"
    )
    assert _number_after("mu =", out) == pytest.approx(math.sqrt(4) / 7.4613, abs=1e-4)


@pytest.mark.parametrize("epsilon, delta, rounds", [(1.0, 1e-5, 1), (1.0, 1e-5, 10), (0.5, 1e-8, 30), (8.0, 1e-3, 3)])
def test_json_noise_for_epsilon_is_the_accountants(coautogen, epsilon, delta, rounds):
    code, out, err = coautogen("--epsilon", str(epsilon), "--delta", str(delta), "--rounds", str(rounds), "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert set(result) == {"epsilon", "delta", "rounds", "noise_multiplier"}
    assert result["epsilon"] == epsilon and result["delta"] == delta and result["rounds"] == rounds
    assert result["noise_multiplier"] == pytest.approx(noise_multiplier_for_epsilon(epsilon, delta, rounds), rel=1e-12)
    assert epsilon_for_noise([result["noise_multiplier"]] * rounds, delta) == pytest.approx(epsilon, rel=1e-9)


def test_defaults_are_delta_1e5_and_one_round(coautogen):
    code, out, _ = coautogen("--epsilon", "1", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["delta"] == 1e-5 and result["rounds"] == 1
    assert result["noise_multiplier"] == pytest.approx(3.73, rel=2e-3)


# --- --noise: the epsilon it gives ----------------------------------------------------------


def test_epsilon_for_noise_human(coautogen):
    code, out, err = coautogen("--noise", "11.7973", "--delta", "1e-5", "--rounds", "10")
    assert code == 0 and err == ""
    assert _number_after("epsilon:", out) == pytest.approx(1.000, abs=1e-3)
    assert "noise multiplier 11.7973 per round over 10 rounds at delta 1e-05" in out


def test_epsilon_for_noise_json(coautogen):
    code, out, _ = coautogen("--noise", "11.7973", "--rounds", "10", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"epsilon", "delta", "rounds", "noise_multiplier"}
    assert result["epsilon"] == pytest.approx(1.000, abs=1e-3)
    assert result["epsilon"] == epsilon_for_noise([11.7973] * 10, 1e-5)
    assert (result["noise_multiplier"], result["delta"], result["rounds"]) == (11.7973, 1e-5, 10)


# --- --mode / --sites: the noise on the aggregate ------------------------------------------


@pytest.mark.parametrize("sites", [1, 4, 10])
def test_aggregate_noise_local_grows_with_sqrt_sites_central_does_not(coautogen, sites):
    sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 10)
    code, out, _ = coautogen("--epsilon", "1", "--rounds", "10", "--mode", "local", "--sites", str(sites), "--json")
    assert code == 0
    local = json.loads(out)
    assert set(local) == {"epsilon", "delta", "rounds", "noise_multiplier", "mode", "sites", "aggregate_noise_std"}
    assert (local["mode"], local["sites"]) == ("local", sites)
    assert local["aggregate_noise_std"] == pytest.approx(math.sqrt(sites) * sigma, rel=1e-12)

    code, out, _ = coautogen("--epsilon", "1", "--rounds", "10", "--mode", "central", "--sites", str(sites), "--json")
    assert code == 0
    central = json.loads(out)
    assert (central["mode"], central["sites"]) == ("central", sites)
    assert central["aggregate_noise_std"] == pytest.approx(sigma, rel=1e-12)
    assert central["noise_multiplier"] == local["noise_multiplier"]  # the mode does not change the budget


def test_mode_human_output_explains_who_is_protected(coautogen):
    code, out, _ = coautogen("--noise", "2", "--mode", "local", "--sites", "9")
    assert code == 0
    assert _number_after("aggregate noise std:", out) == pytest.approx(6.0, abs=1e-4)
    assert "private even from the server" in out

    code, out, _ = coautogen("--noise", "2", "--mode", "central", "--sites", "9")
    assert code == 0
    assert _number_after("aggregate noise std:", out) == pytest.approx(2.0, abs=1e-4)
    assert "trust the server" in out and "once" in out


def test_no_mode_no_aggregate(coautogen):
    code, out, _ = coautogen("--noise", "2")
    assert code == 0
    assert "aggregate" not in out and "mode" not in out


# --- refusals: exit code 2, one line on stderr naming the flag, no traceback ----------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--epsilon", "0"], "--epsilon"),
        (["--epsilon", "-1"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "inf"], "--epsilon"),
        (["--noise", "0"], "--noise"),
        (["--noise", "-3"], "--noise"),
        (["--epsilon", "1", "--delta", "0"], "--delta"),
        (["--epsilon", "1", "--delta", "1"], "--delta"),
        (["--epsilon", "1", "--delta", "1.5"], "--delta"),
        (["--noise", "5", "--delta=-1e-5"], "--delta"),  # "-1e-5" alone reads as a flag
        (["--epsilon", "1", "--rounds", "0"], "--rounds"),
        (["--noise", "5", "--rounds", "-2"], "--rounds"),
        (["--epsilon", "1", "--mode", "local", "--sites", "0"], "--sites"),
        (["--epsilon", "1", "--mode", "central", "--sites", "-1"], "--sites"),
        (["--epsilon", "1", "--mode", "local"], "--sites"),
        (["--noise", "5", "--mode", "central", "--json"], "--sites"),
        (["--epsilon", "1", "--sites", "3"], "--mode"),
    ],
)
def test_bad_input_refused_with_one_line(coautogen, argv, flag):
    code, out, err = coautogen(*argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coautogen privacy: error: ") and flag in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "one of the arguments --epsilon --noise is required"),
        (["--epsilon", "1", "--noise", "2"], "not allowed with"),
        (["--epsilon", "1", "--mode", "secagg", "--sites", "3"], "invalid choice"),
        (["--epsilon", "one"], "invalid float value"),
        (["--epsilon", "1", "--rounds", "2.5"], "invalid int value"),
    ],
)
def test_argparse_refusals_exit_2(coautogen, argv, message):
    code, out, err = coautogen(*argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
