"""``modeconn compare``: methods side by side, options per method from one file, cached fits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeconn.artifact import load_artifact
from modeconn.cli import main
from modeconn.compare import ComparisonRow, compare_energy, rank_rows
from modeconn.metrics import barriers


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_fits_each_method_with_its_own_options_and_reuses_them(mlp_pair, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("bezier: {epochs: 2, nodes: 4}\n")
    argv = ["compare", *mlp_pair, "--methods", "linear,bezier", "--config", config,
            "--out", tmp_path / "runs", "--k", 2, "--points", 11, "--json", tmp_path / "t.json"]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "t.json").read_text())
    assert sorted(r["label"] for r in rows) == ["bezier", "linear", "linear-unaligned"]
    # ranked, best first, by the train-loss barrier above the chord of the endpoint losses
    assert [r["rank"] for r in rows] == [1, 2, 3]
    linear = [r["loss_barrier_linear"] for r in rows]
    assert linear == sorted(linear) and rows[-1]["label"] == "linear-unaligned"
    for r in rows:  # the other barriers stay in the JSON
        assert {"loss_barrier", "loss_barrier_max", "error_barrier", "error_barrier_linear"} <= set(
            r
        )
        ev = load_artifact(r["artifact"]).manifest.metrics
        want = barriers(ev["train_loss"], ts=ev["ts"])
        assert r["loss_barrier_linear"] == pytest.approx(want["linear"])
        assert r["loss_barrier"] == pytest.approx(want["mean"])
    assert "ranked by loss barrier" in out and "vs mean" in out
    fit = load_artifact(tmp_path / "runs" / "bezier").manifest.fit
    assert fit["config"]["epochs"] == 2 and fit["config"]["nodes"] == 4
    assert fit["stats"]["epochs"] == 2  # the validated options reached the fitter
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and out.count("(cached)") == 3
    code, out, _ = run_cli(capsys, *argv[:-3], 21, *argv[-2:])  # other --points: fit again
    assert code == 0 and "(cached)" not in out
    assert len(load_artifact(tmp_path / "runs" / "bezier").manifest.metrics["ts"]) >= 21


def test_compare_refuses_bad_options_before_reading_any_file(tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("geodesic: {steps: -5}\n")
    code, _, err = run_cli(capsys, "compare", "missing_a.pt", "missing_b.pt", "--config", config)
    assert code == 2
    assert "geodesic" in err and "steps" in err and "missing_a" not in err


def _row(
    label: str, linear: float, mean: float, error: float = 0.01, worst: float = 0.05
) -> ComparisonRow:
    return ComparisonRow(
        label=label,
        method=label,
        aligned=True,
        artifact=None,
        seconds=0.0,
        loss_barrier=mean,
        loss_barrier_max=0.0,
        loss_barrier_linear=linear,
        error_barrier=0.0,
        error_barrier_linear=error,
        worst_test_error=worst,
        weight_length=1.0,
        prediction_length=0.1,
    )


def test_rows_rank_by_the_barrier_above_the_chord_not_the_endpoints_mean():
    # endpoint losses 0.10 and 0.14: every path's mean-endpoint barrier is at least 0.02
    rows = [
        _row("straight", linear=0.030, mean=0.050),
        _row("bumpy", linear=0.004, mean=0.020),  # ties with "flat" on the mean ...
        _row("flat", linear=0.001, mean=0.020),  # ... and is beaten on the chord
        _row("diverged", linear=math.nan, mean=math.nan),
        # on or below the chord: 0 (and the floor of the mean) for all three
        _row("below", linear=0.0, mean=0.020, error=0.010, worst=0.05),
        _row("below, worse worst error", linear=0.0, mean=0.020, error=0.008, worst=0.06),
        _row("below, flatter test error", linear=0.0, mean=0.020, error=0.008, worst=0.05),
    ]
    ranked = rank_rows(rows)
    assert [r.label for r in ranked] == [
        "below, flatter test error",
        "below, worse worst error",
        "below",
        "flat",
        "bumpy",
        "straight",
        "diverged",
    ]
    assert [r.rank for r in ranked] == [1, 2, 3, 4, 5, 6, 7]
    assert ranked[0].to_json()["rank"] == 1 and rows[0].rank == 0  # rows are frozen: copies


def test_compare_energy_reports_the_chord_barrier_by_hand():
    # along the straight line from w0=-1 to w0=1, w0 = 2t - 1: E = 1 + w0 - w0^2, E(0) = -1,
    # E(1) = 1; peak 1.25 at w0 = 0.5 (t = 0.75); chord 2t - 1, so E - chord = 1 - w0^2: 1 at t=0.5
    def hill(w: torch.Tensor) -> torch.Tensor:
        return 1 + w[0] - w[0] ** 2

    start = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    end = torch.tensor([1.0, 0.0], dtype=torch.float64)
    (row,) = compare_energy(hill, start, end, ["linear"], points=101)
    assert row["barrier"] == pytest.approx(1.25)  # above the endpoints' mean, 0
    assert row["barrier_linear"] == pytest.approx(1.0)
    assert row["max_loss"] == pytest.approx(1.25) and row["rank"] == 1
