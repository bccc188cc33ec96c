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
        (
            ["-cue", "resnet18", "embedder.weights=/nonexistent/r18.pth"],
            "ResNet-18 weights not found at /nonexistent/r18.pth",
        ),
        (["--num-hospitals", "2000"], "federation.num_hospitals"),
        (["privacy.epsilon=0"], "privacy.epsilon must be > 0"),
        (["privacy.epsilonn=1"], "unknown config key 'privacy.epsilonn'"),
        (["-sgen", "./models/no-sd15"], "model folder models/no-sd15 does not exist"),
        (["-sgen", "coautogen-test/not-cached-model"], "huggingface-cli download coautogen-test/not-cached-model"),
        (["-sgen", "Glph"], "generator.name='Glph' is not valid"),
        (["-sgen", "no_such_pkg_xyz.gen:Generator"], "cannot import module 'no_such_pkg_xyz.gen'"),
        (["-sllm", "./no-llm"], "prompts.llm"),
        (["-scap", "BlipBase"], "prompts.captioner needs prompts.reference"),
        (
            [
                "-sgen",
                "HTTP",
                "generator.api_url=http://127.0.0.1:9/v1",
                "generator.api_key_env=COAUTOGEN_TEST_UNSET_KEY",
            ],
            "export COAUTOGEN_TEST_UNSET_KEY=...",
        ),
        pytest.param(
            ["-dev", "cuda"],
            "no CUDA GPU is visible; use -dev cpu or -dev auto",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_bad_input_is_refused_before_flower_starts(tmp_path, capsys, monkeypatch, no_flower, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["run", "--out", str(tmp_path), "--name", "bad", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.startswith("coautogen: error: ")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # nothing created for a run that never started


def test_overrides_may_stand_between_options():
    args = cli.parse_args(
        ["run", "generator.seed=3", "--num-hospitals", "3", "privacy.epsilon=2", "-sgen", "Glyph", "feedback.k=2"]
    )
    assert args.overrides == ["generator.seed=3", "privacy.epsilon=2", "feedback.k=2"] and args.num_hospitals == 3
    assert "privacy.epsilon=2" in cli.overrides_from_args(args)


@pytest.mark.parametrize(
    "argv",
    [["run", "--bogus"], ["run", "a=b", "--num-hospitals", "2", "--bogus"], ["privacy", "--epsilon", "1", "a=b"]],
)
def test_stray_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
