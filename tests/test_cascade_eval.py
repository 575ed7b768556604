"""Cascades of a real artifact's members: torch run = replay, the sweep, the held-out choice, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modeconn.cascade import StopRule, replay_cascade
from modeconn.cascade_eval import (
    cascade_member_probs,
    run_path_cascade,
    suggest_threshold,
    sweep_cascade,
)
from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.pipeline import fit_artifact
from modeconn.report import evaluate_artifact


def _linear(tmp_path_factory, pair, digits, name):
    a, b = (load_checkpoint(p) for p in pair)
    out = tmp_path_factory.mktemp("cascade") / name
    fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
    return out


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory, mlp_pair, digits):
    return _linear(tmp_path_factory, mlp_pair, digits, "mlp")


@pytest.fixture(scope="module")
def bn_path(tmp_path_factory, bn_pair, digits):
    return _linear(tmp_path_factory, bn_pair, digits, "cnn")


@pytest.mark.parametrize("which", ["mlp_path", "bn_path"])
def test_the_torch_cascade_is_the_replay_of_its_members(which, request, digits):
    artifact = request.getfixturevalue(which)
    rule = StopRule("confidence", 0.9)
    result = run_path_cascade(artifact, digits.x_test, 4, rule, bn_inputs=digits.x_train)
    ts, probs = cascade_member_probs(artifact, digits, 4)
    assert ts == (0.333333333, 1.0, 0.0, 0.666666667)  # the middle first, then spread along t
    replay = replay_cascade(probs, rule)
    n = len(digits.x_test)
    # members used per input are reported; members ran only on the inputs still in the cascade
    assert result.members_used.shape == (n,) and set(result.members_used) <= {1, 2, 3, 4}
    assert 1 < result.mean_cost < 4
    np.testing.assert_array_equal(result.members_used, replay.members_used)
    np.testing.assert_allclose(result.probs, replay.probs, atol=1e-5)
    for name in ("entropy", "mutual_information", "disagreement"):
        np.testing.assert_allclose(getattr(result, name), getattr(replay, name), atol=1e-4)


def test_an_unreachable_threshold_is_the_full_ensemble(mlp_path, digits):
    ts, probs = cascade_member_probs(mlp_path, digits, 4)
    sweep = sweep_cascade(probs, digits.y_test.numpy(), "agree", [5], ts=ts)  # 5 of 4 members
    (never,) = sweep.cascade
    assert never.cost == 4.0 and never.members_used == [0, 0, 0, len(digits.y_test)]
    row = {r.label: r.metrics for r in evaluate_artifact(mlp_path, digits, ks=(4,))}
    full = row["path ensemble K=4"]
    for point in (never, sweep.plain[-1]):
        assert point.accuracy == pytest.approx(full["accuracy"], abs=1e-9)
        assert point.nll == pytest.approx(full["nll"], abs=1e-5)
        assert point.ece == pytest.approx(full["ece"], abs=1e-5)
        assert point.brier == pytest.approx(full["brier"], abs=1e-5)


def test_cost_falls_with_the_threshold(mlp_path, digits):
    ts, probs = cascade_member_probs(mlp_path, digits, 8)
    thresholds = [0.0, 0.5, 0.8, 0.9, 0.99, 0.999]
    sweep = sweep_cascade(probs, digits.y_test.numpy(), "confidence", thresholds, ts=ts)
    costs = [p.cost for p in sweep.cascade]
    assert [p.threshold for p in sweep.cascade] == thresholds
    assert costs == sorted(costs) and costs[0] == 1.0 and costs[-1] > costs[1]
    assert [p.cost for p in sweep.plain] == [float(k) for k in range(1, 9)]
    for p in sweep.cascade:
        assert sum(p.members_used) == len(digits.y_test)
        assert p.cost == pytest.approx(
            sum(m * c for m, c in enumerate(p.members_used, start=1)) / len(digits.y_test)
        )


@pytest.mark.parametrize("by", ["agreement", "accuracy"])
def test_the_threshold_is_chosen_on_one_half_and_reported_on_the_other(by):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 400, 5)) * 2 + rng.normal(size=(6, 400, 5))  # (K, n, C)
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    labels = logits[0].argmax(axis=1)
    labels[::7] = (labels[::7] + 1) % 5  # some mistakes
    s = suggest_threshold(probs, labels, "confidence", [0.5, 0.7, 0.9, 1.0], seed=3, by=by)
    assert s is not None and s.choose_n + s.report_n == 400 and s.report_n == 200
    assert s.choose_accuracy >= s.choose_full_accuracy - 0.001 - 1e-12 and s.by == by
    # what it reports is the cascade at that threshold on the inputs it was not chosen on
    report = np.sort(np.random.default_rng(3).permutation(400)[200:])
    held = replay_cascade(probs[:, report], StopRule("confidence", s.threshold))
    assert s.accuracy == pytest.approx(float((held.labels == labels[report]).mean()))
    assert s.cost == pytest.approx(held.mean_cost)
    full = probs[:, report].mean(0).argmax(1)
    assert s.agreement == pytest.approx(float((held.labels == full).mean()))
    assert s.to_json()["within"] == s.within


def test_cli_table_json_plot_and_suggestion(mlp_path, tmp_path, capsys):
    code = main(
        ["--quiet", "evaluate", str(mlp_path), "--cascade", "--k", "4"]
        + ["--thresholds", "0.5,0.9,1", "--json", str(tmp_path / "c.json")]
        + ["--plot", str(tmp_path / "c.png")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "confidence >= 0.9" in out and "plain K=4" in out and "cost" in out
    assert "suggested threshold: confidence" in out and "reported on the other 180" in out
    result = json.loads((tmp_path / "c.json").read_text())["mlp"]
    assert result["k"] == 4 and result["rule"] == "confidence"
    assert [p["threshold"] for p in result["cascade"]] == [0.5, 0.9, 1.0]
    assert len(result["plain"]) == 4 and result["suggestion"]["report_n"] == 180
    # The suggestion comes with the command that serves it; that command builds the cascade.
    serve = next(line for line in out.splitlines() if line.startswith("serve it: "))
    assert main(["--quiet", *serve.split()[3:], "--k", "", "--ts", ""]) == 0
    from modeconn.formats import read_index

    cascade = read_index(mlp_path).cascade
    assert cascade is not None and cascade.k == 4
    assert cascade.threshold == result["suggestion"]["threshold"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_agree_rule_defaults_to_two_to_k(mlp_path, tmp_path, capsys):
    code = main(
        ["--quiet", "evaluate", str(mlp_path), "--cascade", "--k", "3", "--rule", "agree"]
        + ["--json", str(tmp_path / "a.json")]
    )
    assert code == 0 and "the first 2 members agree" in capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())["mlp"]
    assert [p["threshold"] for p in result["cascade"]] == [2.0, 3.0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cascade", "--rule", "vote"], "--rule must be one of confidence, agree"),
        (["--cascade", "--thresholds", "0.5,1.5"], "a probability in [0, 1], got 1.5"),
        (["--cascade", "--thresholds", "high"], "comma-separated numbers"),
        (["--cascade", "--rule", "agree", "--thresholds", "1"], "an integer >= 2"),
        (["--cascade", "--k", "2,4"], "--cascade takes one ensemble size K"),
        (["--rule", "agree"], "--rule and --thresholds go with --cascade"),
        (["--cascade", "--backend", "onnx"], "--cascade runs on torch only"),
    ],
)
def test_cli_bad_rule_or_threshold_is_one_line_exit_2(mlp_path, argv, message, capsys):
    code = main(["--quiet", "evaluate", str(mlp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
