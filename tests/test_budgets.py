"""Budgets: fit lengths in passes over the data, set for every method at once by ``--budget``;
and progress that reaches a log file (a line every few seconds, an estimate of the time left)."""

from __future__ import annotations

import sys

import pytest
import torch

from modeconn import progress
from modeconn.commands._options import method_config
from modeconn.commands.compare import method_params
from modeconn.fit.configs import BUDGETS, Length
from modeconn.fit.methods import METHODS, make_config
from tests.landscapes import F64, ring

#: The per-method lengths: what a fit of ``steps_per_epoch`` steps an epoch runs, per budget.
LENGTHS = {
    "bezier": lambda c, n: c.total_steps(n),
    "polychain": lambda c, n: c.total_steps(n),
    "neb": lambda c, n: c.schedule(n)[0].steps,
    "autoneb": lambda c, n: c.schedule(n)[0].steps,
    "geodesic": lambda c, n: c.total_steps(n),
    "fge": lambda c, n: c.cycle_steps(n),
}


def test_every_method_with_a_length_has_one_per_budget():
    fitted = {name for name in METHODS if name != "linear"}
    assert set(LENGTHS) == fitted  # a new method must say how its budget sets its length
    for name in fitted:
        assert set(METHODS[name].config.LENGTHS) == set(BUDGETS), name  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", sorted(LENGTHS))
def test_lengths_grow_with_the_budget_and_with_the_data(method):
    length = LENGTHS[method]
    for steps_per_epoch in (11, 35, 391):  # 8x8 digits, 4,500 images, CIFAR-10 at batch 128
        quick, standard, paper = (
            length(make_config(method, budget=b), steps_per_epoch) for b in BUDGETS
        )
        assert 0 < quick < standard, (method, steps_per_epoch)
        assert paper >= make_config(method).LENGTHS["paper"].epochs * steps_per_epoch  # type: ignore[attr-defined]
    # on a large data set every budget is a number of passes: ten times the data, ten times the steps
    big, bigger = 1_000, 10_000
    for budget in BUDGETS:
        config = make_config(method, budget=budget)
        assert length(config, bigger) == pytest.approx(10 * length(config, big), rel=1e-3)


def test_a_given_length_beats_the_budget():
    assert make_config("bezier", budget="quick", epochs=7).total_steps(11) == 77
    assert make_config("neb", budget="paper", steps=12, epochs=3).schedule(100)[0].steps == 12
    assert make_config("neb", budget="paper", epochs=2.5).schedule(10)[0].steps == 25
    assert make_config("geodesic", budget="quick", steps=0).total_steps(50) == 0
    assert make_config("fge", cycle_epochs=2).cycle_steps(30) == 60
    cycles = [{"steps": 9, "lr": 0.01}, {"epochs": 2, "lr": 0.01}, {"lr": 0.01}]
    schedule = make_config("autoneb", budget="quick", cycles=cycles).schedule(100)
    assert [c.steps for c in schedule] == [9, 200, 25]  # quick: a quarter of an epoch a cycle


def test_length_reads_as_the_help_shows_it():
    assert str(Length(50, min_steps=2000)) == "50 epochs, at least 2,000 steps"
    assert str(Length(0.5)) == "0.5 epochs"
    assert Length(0.5, min_steps=3).steps(4) == 3 and Length(0.5).steps(1) == 1


def test_an_unknown_budget_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'quick', 'standard' or 'paper'"):
        make_config("bezier", budget="fast")


def test_a_fit_runs_its_budgets_length():
    """The ring as an energy function: an epoch is 100 steps, the quick floor 300."""
    from modeconn import connect

    a = torch.tensor([1.0, 0.0], dtype=F64)
    b = torch.tensor([-1.0, 0.0], dtype=F64)
    for budget, steps in (("quick", 300), ("standard", 5000)):
        stats: dict = {}
        connect(ring, a, b, "bezier", budget=budget, stats=stats)
        assert (stats["steps"], stats["budget"]) == (steps, budget)


def _cli_args(argv):
    from modeconn.cli import build_parser

    return build_parser(argv).parse_args(argv)


def test_the_budget_flag_reaches_every_methods_options():
    args = _cli_args(
        ["connect", "a", "b", "--method", "geodesic", "--budget", "quick", "--out", "x"]
    )
    assert method_config(args, "geodesic").budget == "quick"
    args = _cli_args(["connect", "a", "b", "--method", "neb", "--out", "x"])
    assert method_config(args, "neb").budget == "standard"


def test_a_quick_look_evaluates_fewer_points():
    from modeconn.commands._options import eval_points

    assert [eval_points(None, b) for b in BUDGETS] == [21, 61, 61]
    assert eval_points(7, "quick") == 7 and eval_points(0, "standard") == 0  # 0: no evaluation


def test_a_quick_look_evaluates_chains_on_fewer_examples():
    for method in ("neb", "autoneb"):
        sizes = [make_config(method, budget=b).dense_examples() for b in BUDGETS]  # type: ignore[attr-defined]
        assert sizes == [512, 2048, 2048]
        assert make_config(method, budget="quick", eval_size=0).dense_examples() == 0  # type: ignore[attr-defined]


def test_compare_sets_the_budget_unless_the_options_file_does(tmp_path):
    options = tmp_path / "options.yaml"
    options.write_text("neb: {budget: paper, nodes: 5}\nbezier: {epochs: 3}\n")
    methods = ["bezier", "neb", "geodesic"]
    params = method_params(str(options), budget="quick", methods=methods)
    assert {m: params[m].budget for m in methods} == {  # type: ignore[attr-defined]
        "bezier": "quick",
        "neb": "paper",
        "geodesic": "quick",
    }
    assert params["bezier"].total_steps(11) == 33  # type: ignore[attr-defined]
    assert method_params(None) == {}


# ---------------------------------------------------------------------------------------------
# Progress without a terminal


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", fake)
    return fake


def test_a_log_gets_a_line_every_interval_with_the_time_left(clock, capsys, monkeypatch):
    monkeypatch.setenv("MODECONN_PROGRESS_SECONDS", "15")
    monkeypatch.setattr(progress, "ANNOUNCE_SECONDS", 1e9)
    assert not sys.stderr.isatty()
    with progress.progress_bar(100, "fit bezier") as bar:
        for _ in range(10):  # 10 steps of 1 s: no line yet
            clock.now += 1
            bar.advance(1, loss=0.5)
        assert capsys.readouterr().err == ""
        for _ in range(10):  # a line at 15 s
            clock.now += 1
            bar.advance(1, loss=0.25)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("fit bezier: 15/100 (15%), loss=0.25, 15 s elapsed, about 1 min 25 s left")
    assert lines[-1] == "fit bezier: 20/100 (20%), loss=0.25, 20 s elapsed (done)"
    assert len(lines) == 2


def test_long_work_says_once_how_long_it_will_take(clock, capsys, monkeypatch):
    monkeypatch.setenv("MODECONN_PROGRESS_SECONDS", "1000")
    with progress.progress_bar(1000, "neb cycle 1/8") as bar:
        bar.skip(500)  # resumed: the skipped steps are not timed
        for _ in range(20):
            clock.now += 0.5
            bar.advance(1)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "neb cycle 1/8: about 4 min 05 s left for the remaining 490 of 1,000 "
        "(estimated from the first 10)"
    ]
    with progress.progress_bar(100, "short") as bar:  # 50 s in all: nothing to announce
        for _ in range(100):
            clock.now += 0.5
            bar.advance(1)
    assert capsys.readouterr().err == ""


def test_a_disabled_bar_says_nothing(clock, capsys):
    with progress.progress_bar(10, "quiet", enabled=False) as bar:
        for _ in range(10):
            clock.now += 100
            bar.advance(1, loss=1.0)
    assert capsys.readouterr().err == ""


def test_a_bad_interval_is_refused(monkeypatch):
    monkeypatch.setenv("MODECONN_PROGRESS_SECONDS", "soon")
    with (
        pytest.raises(ValueError, match="MODECONN_PROGRESS_SECONDS must be a number"),
        progress.progress_bar(10, "x"),
    ):
        pass


def test_durations_read_naturally():
    assert [progress.format_duration(s) for s in (0.4, 42, 185, 3725)] == [
        "0 s",
        "42 s",
        "3 min 05 s",
        "1 h 02 min",
    ]


def test_the_command_line_reports_progress_into_a_log(tmp_path):
    """``modeconn train`` with stderr to a file: plain progress lines, no terminal codes."""
    import subprocess

    log = tmp_path / "train.log"
    env = {"MODECONN_PROGRESS_SECONDS": "0", "PATH": "/usr/bin:/bin"}
    with open(log, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "modeconn", "train", "--arg", "width=8", "--arg", "depth=1",
             "--epochs", "2", "--out", str(tmp_path / "a.safetensors")],
            stderr=stderr, stdout=subprocess.DEVNULL, env=env, timeout=300,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\x1b[" not in text  # no escape codes in a log
    lines = [line for line in text.splitlines() if "elapsed" in line]
    assert lines and all(("%)" in line) for line in lines), text
    assert lines[-1].endswith("(done)")
