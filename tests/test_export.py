"""ONNX export and the onnxruntime runtime: exported graphs match torch for the MLP, the CNN and
ResNet-20 with BatchNorm at batch sizes other than the traced one; the file describes itself;
failed or corrupt exports leave nothing behind; the runtime never imports torch; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from modeconn.checkpoint import load_checkpoint, save_checkpoint
from modeconn.cli import main
from modeconn.ensemble import UNCERTAINTY, Ensemble
from modeconn.export import ENSEMBLE_OUTPUTS, MERGED_OUTPUTS, export_ensemble, export_merged
from modeconn.merge import merged_model
from modeconn.models import create_model
from modeconn.pipeline import fit_artifact
from modeconn.runtime import METADATA_KEY, OnnxModel, read_metadata


def _artifact(pair, digits, folder, name, served_ts=None):
    a, b = (load_checkpoint(p) for p in pair)
    out = folder / name
    fit_artifact(a, b, digits, "linear", out=out, eval_points=0, served_ts=served_ts)
    return out


@pytest.fixture(scope="module")
def arts(tmp_path_factory, mlp_pair, bn_pair, digits):
    folder = tmp_path_factory.mktemp("export")
    return {
        "mlp": _artifact(mlp_pair, digits, folder, "mlp_linear"),
        "cnn": _artifact(bn_pair, digits, folder, "cnn_linear"),
    }


@pytest.fixture(scope="module")
def resnet_art(tmp_path_factory, digits):
    """Two untrained ResNet-20s (BatchNorm) whose running statistics come from digits batches."""
    folder = tmp_path_factory.mktemp("resnet")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("resnet20", digits.input_shape, digits.num_classes, width=1)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for begin in range(0, 512, 128):
                model(digits.x_train[begin : begin + 128])
        path = folder / f"resnet_{seed}.safetensors"
        save_checkpoint(path, model.eval(), data="digits", seed=seed)
        files.append(path)
    return _artifact(files, digits, folder, "resnet_linear", served_ts=[0.0, 0.5, 1.0])


def _symbolic_batch(path) -> str:
    proto = onnx.load(str(path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param


def _check_ensemble_file(path, artifact_dir, ensemble, digits, k):
    assert _symbolic_batch(path)  # the batch axis is a named symbol, not a number
    model = OnnxModel(path, device="auto")
    assert model.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert model.output_names == list(ENSEMBLE_OUTPUTS)
    for batch in (1, 9):  # neither is the traced batch size (2)
        x = digits.x_test[:batch]
        out = model.run(x.numpy())
        ref = ensemble.predict(x)
        assert out["probabilities"].shape == (batch, 10)
        assert out["uncertainty"].shape == (batch, 3)
        assert np.abs(out["probabilities"] - ref.probs.numpy()).max() <= 1e-4
        assert np.abs(out["uncertainty"] - ref.uncertainty.numpy()).max() <= 1e-4
        assert np.abs(out["log_probabilities"] - ref.log_probs.numpy()).max() <= 1e-4
    manifest = model.manifest
    artifact_manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["k"] == k
    assert manifest["path"] == artifact_dir.name and manifest["method"] == "linear"
    assert manifest["ts"] == list(ensemble.ts)
    assert manifest["input_shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["preprocessing"] == artifact_manifest["data"]["preprocessing"]
    assert manifest["outputs"] == list(ENSEMBLE_OUTPUTS)
    assert manifest["uncertainty"] == list(UNCERTAINTY)
    assert manifest["check"]["max_abs_diff"] <= 1e-4
    return model


def test_mlp_ensemble_and_merged_model_match_torch(arts, digits, tmp_path):
    out = tmp_path / "mlp_k3.onnx"
    result = export_ensemble(arts["mlp"], out, 3)
    assert result.path == out and result.max_abs_diff <= 1e-4
    assert not (tmp_path / "mlp_k3.onnx.data").exists()  # every weight inside the one file
    ensemble = Ensemble.from_artifact(arts["mlp"], 3)
    _check_ensemble_file(out, arts["mlp"], ensemble, digits, 3)
    assert read_metadata(out)["ts"] == [0.0, 0.5, 1.0]

    merged = tmp_path / "mlp_mid.onnx"
    export_merged(arts["mlp"], merged, 0.25)
    model = OnnxModel(merged)
    assert model.output_names == list(MERGED_OUTPUTS) and model.ts == [0.25]
    x = digits.x_test
    out = model.run(x.numpy(), batch_size=100)  # chunked: 4 runs of a dynamic batch
    with torch.no_grad():
        ref = torch.softmax(merged_model(arts["mlp"], 0.25)(x), -1).numpy()
    assert np.abs(out["probabilities"] - ref).max() <= 1e-4
    assert model.kind == "merged" and model.num_classes == 10


def test_bn_cnn_ensemble_matches_torch(arts, digits, tmp_path):
    out = tmp_path / "cnn_k2.onnx"
    export_ensemble(arts["cnn"], out, 2, probe=digits.x_test[:32])
    ensemble = Ensemble.from_artifact(arts["cnn"], 2)
    model = _check_ensemble_file(out, arts["cnn"], ensemble, digits, 2)
    assert model.manifest["bn"] == ["stored", "stored"]
    # onnxruntime's test accuracy and NLL equal torch's.
    y = digits.y_test.numpy()
    onnx_out = model.run(digits.x_test.numpy())
    ref = ensemble.predict(digits.x_test)
    nll = -onnx_out["log_probabilities"][np.arange(len(y)), y].mean()
    assert (onnx_out["probabilities"].argmax(1) == y).mean() == pytest.approx(
        float((ref.labels == digits.y_test).float().mean())
    )
    assert nll == pytest.approx(float(-ref.log_probs[torch.arange(len(y)), y].mean()), abs=1e-5)


def test_resnet20_bn_ensemble_matches_torch(resnet_art, digits, tmp_path):
    out = tmp_path / "resnet_k3.onnx"
    export_ensemble(resnet_art, out, 3)
    ensemble = Ensemble.from_artifact(resnet_art, 3)
    _check_ensemble_file(out, resnet_art, ensemble, digits, 3)


def test_a_failed_check_writes_nothing(arts, tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(RuntimeError, match="disagrees with torch.*nothing was written"):
        export_ensemble(arts["mlp"], out, 2, atol=0.0)
    assert list(tmp_path.iterdir()) == []


def _copy_artifact(src, dst):
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def test_corrupt_artifacts_fail_clearly_and_leave_no_file(arts, tmp_path):
    truncated = _copy_artifact(arts["cnn"], tmp_path / "truncated")
    nodes = truncated / "nodes.safetensors"
    nodes.write_bytes(nodes.read_bytes()[: nodes.stat().st_size // 2])
    bad_manifest = _copy_artifact(arts["cnn"], tmp_path / "bad_manifest")
    manifest = json.loads((bad_manifest / "manifest.json").read_text())
    manifest["num_nodes"] = "two"
    (bad_manifest / "manifest.json").write_text(json.dumps(manifest))
    not_json = _copy_artifact(arts["cnn"], tmp_path / "not_json")
    (not_json / "manifest.json").write_text("{ this is not json")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = [
        (truncated, "not a readable safetensors"),
        (bad_manifest, "not a valid manifest.*num_nodes"),
        (not_json, "not a valid manifest"),
    ]
    for directory, match in cases:
        with pytest.raises(ValueError, match=match):
            export_ensemble(directory, out_dir / "model.onnx", 2)
        with pytest.raises(ValueError, match=match):
            export_merged(directory, out_dir / "merged.onnx")
    assert list(out_dir.iterdir()) == []


def test_runtime_never_imports_torch(tmp_path):
    code = (
        "import sys, modeconn.runtime as r; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(r.METADATA_KEY)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == METADATA_KEY


def test_runtime_rejects_bad_inputs(arts, tmp_path):
    out = tmp_path / "m.onnx"
    export_merged(arts["mlp"], out, 0.5)
    model = OnnxModel(out, device="cpu", intra_op_threads=1)
    assert model.provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match=r"expects \[N, 1, 8, 8\]"):
        model.run(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="numeric"):
        model.run(np.array([["a"] * 8] * 8, dtype=object)[None, None])
    with pytest.raises(ValueError, match="empty"):
        model.run(np.zeros((0, 1, 8, 8)))
    assert model.run(np.zeros((3, 1, 8, 8), dtype=np.float64))["probabilities"].shape == (3, 10)
    quiet = OnnxModel(out, device="cpu", intra_op_threads=2, spinning=False)
    x = np.ones((4, 1, 8, 8), dtype=np.float32)
    assert np.array_equal(quiet.run(x)["probabilities"], model.run(x)["probabilities"])
    with pytest.raises(FileNotFoundError):
        OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        OnnxModel(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="device"):
        OnnxModel(out, device="tpu")


def test_cli_export_ensemble_merged_and_safetensors(arts, digits, tmp_path, capsys):
    onnx_out = tmp_path / "ens.onnx"
    assert main(["-q", "export", str(arts["cnn"]), "--ensemble", "3", "--out", str(onnx_out)]) == 0
    assert "ensemble of 3 members" in capsys.readouterr().out
    assert read_metadata(onnx_out)["ts"] == [0.0, 0.5, 1.0]

    st_out = tmp_path / "mid.safetensors"
    args = ["-q", "export", str(arts["cnn"]), "--t", "0.5", "--format", "safetensors"]
    assert main([*args, "--out", str(st_out)]) == 0
    ckpt = load_checkpoint(st_out)  # readable as an endpoint
    assert ckpt.meta["merged"]["t"] == 0.5
    ckpt.build_model()

    merged = tmp_path / "mid.onnx"
    args = ["-q", "export", str(arts["cnn"]), "--t", "0.3", "--data", "digits"]
    assert main([*args, "--out", str(merged)]) == 0
    assert read_metadata(merged)["bn"] == ["recomputed"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ensemble", "0"], "K >= 1"),
        (["--t", "1.5"], r"\[0, 1\]"),
        (["--t", "0.3"], "--data digits"),  # BN statistics for an unserved t
        (["--ts", "0", "2"], r"\[0, 1\]"),
        (["--ensemble", "3", "--format", "safetensors"], "one merged model"),
        (["--ensemble", "3", "--ts", "0", "1"], "does not match"),
        (["--recompute-bn"], "needs --data"),
        (["--data", "mnist"], "needs a folder"),
        (["--out", "."], "is a directory"),
        (["--out", "model.pt"], "writes a onnx file; name it model.onnx"),
        (["--t", "0.5", "--format", "safetensors"], "name it x.safetensors"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(arts, tmp_path, capsys, extra, message):
    out = tmp_path / "x.onnx"
    assert main(["-q", "export", str(arts["cnn"]), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modeconn export: error:") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_cli_missing_artifact_exits_2(tmp_path, capsys):
    code = main(["export", str(tmp_path / "nope"), "--ensemble", "2", "--out", "x.onnx"])
    assert code == 2
    assert "not found" in capsys.readouterr().err
