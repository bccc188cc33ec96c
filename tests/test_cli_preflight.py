"""`coautogen run` refuses bad input before any Flower process starts: exit code 2, one clear
line, no run directory left behind."""

from __future__ import annotations

import pytest

from simulations import cli


@pytest.fixture
def no_flower(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("Flower must not start for bad input")

    monkeypatch.setattr(cli, "run_simulation", fail)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-cdata", "/nonexistent/folder"], "data folder not found: /nonexistent/folder"),
        (["-cue", "resnet18", "embedder.weights=/nonexistent/r18.pth"], "ResNet-18 weights not found at /nonexistent/r18.pth"),
        (["--num-hospitals", "2000"], "federation.num_hospitals"),
        (["privacy.epsilon=0"], "privacy.epsilon must be > 0"),
        (["privacy.epsilonn=1"], "unknown config key 'privacy.epsilonn'"),
    ],
)
def test_bad_input_is_refused_before_flower_starts(tmp_path, capsys, no_flower, argv, expected):
    code = cli.main(["run", "--out", str(tmp_path), "--name", "bad", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.startswith("coautogen: error: ")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # nothing created for a run that never started
