"""The command line's help: each method's own options, and no torch import to print it."""

import subprocess
import sys
from pathlib import Path

import pytest

from modeconn.cli import build_parser, main
from modeconn.commands._options import method_config
from modeconn.fit.configs import AutoNEBConfig, GeodesicConfig
from modeconn.fit.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: no wrapping inside a phrase
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_never_imports_torch():
    script = """
import sys
from modeconn.cli import COMMANDS, main
from modeconn.fit.methods import METHODS

runs = [[]] + [[c.replace("_", "-")] for c in COMMANDS]
runs += [["connect", "--method", m] for m in METHODS]
for argv in runs:
    try:
        main([*argv, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
heavy = sorted(m for m in ("torch", "modeconn.checkpoint", "modeconn.data") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_connect_help_shows_only_the_chosen_methods_options(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "connect", "--method", "geodesic")
    assert "geodesic options (JSD geodesic chain (Tan et al. 2023))" in text
    assert "--length-inputs" in text
    steps = GeodesicConfig.model_fields["steps"].description
    assert steps is not None and steps in text
    # the budget's lengths, in epochs with their floors of steps, are in the help
    assert "standard: 5 epochs, at least 200 steps" in " ".join(text.split())
    assert "--budget {quick,standard,paper}" in text
    for other in ("--subsample", "--cycle-epochs", "NEB steps"):
        assert other not in text

    text = help_text(capsys, monkeypatch, "connect", "--method=bezier")
    assert "--epochs" in text and "--length-inputs" not in text and "--steps" not in text

    text = help_text(capsys, monkeypatch, "connect", "--method", "autoneb")
    assert "--insert-threshold" in text and "cycles" in text  # the schedule: from --config


def test_connect_help_without_a_method_lists_the_methods(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "connect")
    for name in ("bezier", "neb", "geodesic"):
        assert f"{name:10s} {METHODS[name].summary}" in text
    assert "`modeconn connect --method M --help` shows M's options" in text
    assert "--length-inputs" not in text and "--epochs" not in text


def test_fge_help_has_the_fge_options(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "fge")
    assert "fge options (Fast Geometric Ensembling" in text
    assert "--cycle-epochs" in text and "--checkpoint-every" in text
    assert "--steps" not in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "bezier", "--steps", "10"], "--steps does not apply to method 'bezier'"),
        (["--method", "linear", "--nodes", "5"], "--nodes does not apply to method 'linear'"),
        (
            ["--method", "geodesic", "--subsample", "3"],
            "--subsample does not apply to method 'geodesic'",
        ),
    ],
)
def test_a_flag_of_another_method_is_a_one_line_error(argv, needle, tmp_path, capsys):
    # the endpoints do not exist: the options are refused before any file is read
    code = main(["--quiet", "connect", "a.safetensors", "b.safetensors", *argv, "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if "bezier" in needle:
        assert "its options: --nodes, --epochs, --lr" in err
    assert not (tmp_path / "x").exists()


def test_options_come_from_the_config_then_set_then_flags(tmp_path):
    config_file = tmp_path / "geodesic.yaml"
    config_file.write_text("nodes: 7\nsteps: 5\nlr: 0.3\n")
    argv = [
        "connect", "a", "b", "--method", "geodesic", "--out", "x", "--config", str(config_file),
        "--set", "steps=6", "--set", "lr=0.2", "--steps", "8", "--seed", "3",
    ]  # fmt: skip
    config = method_config(build_parser(argv).parse_args(argv), "geodesic")
    assert isinstance(config, GeodesicConfig)
    assert (config.nodes, config.lr, config.steps, config.seed) == (7, 0.2, 8, 3)

    schedule = tmp_path / "autoneb.yaml"
    schedule.write_text("cycles:\n  - {steps: 4, lr: 0.01, insert_count: 1}\nseed: 5\n")
    argv = ["connect", "a", "b", "--method", "autoneb", "--out", "x", "--config", str(schedule)]
    config = method_config(build_parser(argv).parse_args(argv), "autoneb")
    assert isinstance(config, AutoNEBConfig)
    assert [c.steps for c in config.cycles] == [4] and config.seed == 5  # no --seed: the file's


def test_help_literals_match_their_sources():
    """The names the help lists without importing torch are the ones the code accepts."""
    from modeconn.commands import _common
    from modeconn.commands.train import TRAIN_DEFAULTS
    from modeconn.data import DATA_KINDS
    from modeconn.models import list_models
    from modeconn.models.external import EXTERNAL_FORMS
    from modeconn.train import TrainConfig

    assert tuple(DATA_KINDS) == _common.DATA_KINDS
    assert tuple(list_models()) == _common.MODEL_NAMES
    assert EXTERNAL_FORMS == _common.EXTERNAL_FORMS
    assert {k: getattr(TrainConfig(), k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
