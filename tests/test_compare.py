"""``modeconn compare``: methods side by side, options per method from one file, cached fits."""

from __future__ import annotations

import json

from modeconn.artifact import load_artifact
from modeconn.cli import main


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
    assert [r["label"] for r in rows] == ["linear-unaligned", "linear", "bezier"]
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
