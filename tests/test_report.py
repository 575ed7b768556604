"""Batch evaluation: the rows it reports, both backends agreeing, and the CLI around it."""

import json

import pytest

from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.pipeline import fit_artifact
from modeconn.report import evaluate_artifact


@pytest.fixture(scope="module")
def mlp_linear(tmp_path_factory, mlp_pair, digits):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    out = tmp_path_factory.mktemp("report") / "linear"
    fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
    return out


def test_rows_and_both_backends_agree(mlp_linear, digits):
    torch_rows = evaluate_artifact(mlp_linear, digits, ks=(2, 3), backend="torch")
    labels = [r.label for r in torch_rows]
    assert labels == [
        "endpoint A",
        "endpoint B",
        "A+B ensemble",
        "straight midpoint",
        "path midpoint",
        "path ensemble K=2",
        "path ensemble K=3",
    ]
    by_label = {r.label: r.metrics for r in torch_rows}
    # endpoint A is A: same accuracy as recorded when it was trained
    a_meta = load_checkpoint(
        json.loads((mlp_linear / "manifest.json").read_text())["endpoints"]["a"]["file"]
    ).meta
    assert by_label["endpoint A"]["accuracy"] == pytest.approx(
        a_meta["metrics"]["test_acc"], abs=1e-6
    )
    # on a straight path the path's midpoint is the straight midpoint, and K=2 is the A+B ensemble
    assert by_label["path midpoint"] == pytest.approx(by_label["straight midpoint"])
    assert by_label["path ensemble K=2"] == pytest.approx(by_label["A+B ensemble"])
    assert by_label["endpoint A"]["disagreement"] == 0.0
    assert by_label["A+B ensemble"]["disagreement"] > 0.0

    onnx_rows = evaluate_artifact(mlp_linear, digits, ks=(3,), backend="onnx")
    onnx_by_label = {r.label: r.metrics for r in onnx_rows}
    for label in ("endpoint A", "A+B ensemble", "path midpoint", "path ensemble K=3"):
        assert onnx_by_label[label]["accuracy"] == by_label[label]["accuracy"]
        assert onnx_by_label[label]["nll"] == pytest.approx(by_label[label]["nll"], abs=1e-4)
        assert onnx_by_label[label]["disagreement"] == pytest.approx(
            by_label[label]["disagreement"], abs=1e-6
        )


def test_evaluate_cli_writes_json_and_plot(mlp_linear, tmp_path, capsys):
    code = main(
        ["--quiet", "evaluate", str(mlp_linear), "--k", "2,4", "--backend", "torch"]
        + ["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    )
    out = capsys.readouterr().out
    assert code == 0 and "path ensemble K=4" in out
    rows = json.loads((tmp_path / "r.json").read_text())["linear"]
    assert {r["label"] for r in rows} >= {"endpoint A", "path ensemble K=4"}
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "two"], "comma-separated positive integers"),
        (["--k", "0"], "positive integers"),
    ],
)
def test_evaluate_cli_errors(mlp_linear, argv, message, capsys):
    code = main(["--quiet", "evaluate", str(mlp_linear), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err
