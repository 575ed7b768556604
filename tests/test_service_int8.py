"""Int8 graphs in serving bundles: ``serve-build --int8`` writes a checked int8 copy of every
graph, and the service runs them for ``"precision": "int8"`` (ensembles, merged models, the
cascade, downloads), answering exactly as onnxruntime runs the int8 file."""

from __future__ import annotations

import shutil

import numpy as np

from modeconn.formats import read_index
from modeconn.runtime import OnnxModel
from modeconn.serving import build_serving

PATH = "paths/mlp"  # conftest: built with int8 copies


def test_every_graph_has_a_checked_int8_copy(models_root):
    index = read_index(models_root / PATH)
    fp32 = {g.file for g in index.graphs if g.precision == "fp32"}
    copies = {g.file: g for g in index.int8}
    assert set(copies) == {f.removesuffix(".onnx") + "_int8.onnx" for f in fp32}
    for graph in copies.values():
        check = graph.int8_check or {}
        assert check["examples"] == 360 and 0.9 <= check["agreement"] <= 1.0
        model = OnnxModel((models_root / PATH / "serving" / graph.file).read_bytes())
        assert model.manifest["precision"] == "int8"
    assert index.requested["int8"] is True
    assert sorted(index.ensembles) == [2, 3]  # the fp32 views hold no int8 graph


def test_int8_requests_run_the_int8_files(asgi, models_root, digits):
    x = digits.x_test[:16].numpy()
    serving = models_root / PATH / "serving"
    for body, file in (
        ({"k": 3}, "ensemble_k3_int8.onnx"),
        ({"mode": "merged", "t": 0.0}, "merged_t0.0000_int8.onnx"),
    ):
        got = asgi.post(
            "/predict", json={"path": PATH, "inputs": x.tolist(), "precision": "int8", **body}
        )
        assert got.status_code == 200, got.text
        want = OnnxModel((serving / file).read_bytes()).run(x)["probabilities"]
        np.testing.assert_allclose(got.json()["probabilities"], want, rtol=1e-5, atol=1e-6)
        assert got.json()["precision"] == "int8"
    fp32 = asgi.post("/predict", json={"path": PATH, "inputs": x.tolist()}).json()
    assert fp32["precision"] == "fp32"
    cascade = asgi.post(
        "/predict",
        json={"path": PATH, "inputs": x.tolist(), "mode": "cascade", "precision": "int8"},
    )
    assert cascade.status_code == 200 and cascade.json()["precision"] == "int8"
    download = asgi.get("/export", params={"path": PATH, "k": "2", "precision": "int8"})
    assert download.status_code == 200
    assert download.content == (serving / "ensemble_k2_int8.onnx").read_bytes()


def test_int8_where_none_was_built_is_a_400(asgi):
    got = asgi.post(
        "/predict", json={"path": "paths/cnn", "inputs": [[0.0] * 64], "precision": "int8"}
    )
    assert got.status_code == 400
    assert "has no int8 copy of ensemble_k2.onnx" in got.json()["error"]
    assert "serve-build DIR --int8" in got.json()["error"]
    bad = asgi.get("/export", params={"path": PATH, "precision": "int4"})
    assert bad.status_code == 400 and "expected one of fp32, int8" in bad.json()["error"]


def test_an_int8_copy_over_the_tolerance_is_skipped_with_the_reason(models_root, tmp_path, capsys):
    from modeconn.cli import main

    art = tmp_path / "mlp"
    shutil.copytree(models_root / PATH, art)
    # A negative tolerance demands that int8 be more accurate than fp32 by 100 points: refused.
    index = build_serving(art, ks=(2,), ts=(), cascade=0, int8=True, int8_tolerance=-100.0)
    assert not index.int8
    assert [(s["mode"], s.get("precision")) for s in index.skipped] == [("ensemble", "int8")]
    assert "over the tolerance" in index.skipped[0]["reason"]
    argv = ["--quiet", "serve-build", str(art), "--k", "2", "--ts", "", "--cascade", "0"]
    assert main([*argv, "--int8", "--force"]) == 0
    out = capsys.readouterr().out
    assert "int8 ensemble k=2: top-1 agreement" in out
    assert main([*argv, "--int8-tolerance", "1"]) == 2  # only with --int8
    assert main([*argv, "--data", "digits"]) == 2  # read only with --int8
