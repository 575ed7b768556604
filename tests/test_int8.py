"""Int8 export: the quantized graph runs through OnnxModel like the fp32 one (same input, output
names and shapes, manifest), agrees with it on the digits test split, is smaller, and is refused
(exit 2, nothing written) when it loses more accuracy than the tolerance unless ``--force``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.export import ENSEMBLE_OUTPUTS, MERGED_OUTPUTS, export_ensemble
from modeconn.pipeline import fit_artifact
from modeconn.quantize import (
    DEFAULT_TOLERANCE,
    QuantizationRefused,
    calibration_sample,
    quantize_onnx,
)
from modeconn.runtime import OnnxModel, read_metadata


@pytest.fixture(scope="module")
def arts(tmp_path_factory, mlp_pair, bn_pair, digits):
    folder = tmp_path_factory.mktemp("int8")
    out = {}
    for name, pair in (("mlp", mlp_pair), ("cnn", bn_pair)):
        a, b = (load_checkpoint(p) for p in pair)
        out[name] = folder / f"{name}_linear"
        fit_artifact(a, b, digits, "linear", out=out[name], eval_points=0)
    return out


def _symbolic_batch(path) -> str:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def _same_interface(fp32: OnnxModel, int8: OnnxModel, digits) -> None:
    assert int8.input_name == fp32.input_name and int8.input_shape == fp32.input_shape
    assert int8.output_names == fp32.output_names
    for batch in (1, 9):
        x = digits.x_test[:batch].numpy()
        a, b = fp32.run(x), int8.run(x)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert all(v.dtype == np.float32 for v in b.values())
        np.testing.assert_allclose(b["probabilities"].sum(-1), 1.0, atol=1e-5)


def test_mlp_ensemble_int8_matches_fp32(arts, digits, tmp_path):
    fp32_path = tmp_path / "mlp.onnx"
    export_ensemble(arts["mlp"], fp32_path, 3)
    out = tmp_path / "mlp_int8.onnx"
    result = quantize_onnx(
        fp32_path,
        out,
        x_test=digits.x_test.numpy(),
        y_test=digits.y_test.numpy(),
        calibration=calibration_sample(digits.x_train.numpy(), 256, seed=0),
    )
    fp32, int8 = OnnxModel(fp32_path, device="cpu"), OnnxModel(out, device="cpu")
    assert int8.output_names == list(ENSEMBLE_OUTPUTS)
    assert _symbolic_batch(out)  # still any batch size
    _same_interface(fp32, int8, digits)
    check = result.check
    # Measured: 100 % top-1 agreement, accuracy change 0.00 points, max |dp| 0.022.
    assert check.agreement >= 0.98 and check.examples == len(digits.y_test)
    assert abs(check.accuracy_drop_points) <= 1.0
    assert check.max_abs_prob_diff < 0.3
    # Measured: 0.48x (weights 4x smaller; this tiny graph's fp32 head and scales remain).
    assert out.stat().st_size < 0.7 * fp32_path.stat().st_size
    # The manifest is the fp32 one plus precision and the check.
    before, after = read_metadata(fp32_path), read_metadata(out)
    assert {k: v for k, v in after.items() if k not in ("precision", "quantization")} == before
    assert after["precision"] == "int8" and int8.kind == "ensemble" and int8.ts == fp32.ts
    q = after["quantization"]
    assert q["check"]["agreement"] == pytest.approx(check.agreement)
    assert q["calibration_examples"] == 256 and q["forced"] is False
    with pytest.raises(ValueError, match="already int8"):
        quantize_onnx(
            out,
            tmp_path / "again.onnx",
            x_test=digits.x_test.numpy(),
            y_test=digits.y_test.numpy(),
            calibration=digits.x_train[:8].numpy(),
        )


def test_calibration_sample_is_seeded_and_without_repeats(digits):
    x = digits.x_train.numpy()
    a, b = calibration_sample(x, 64, seed=3), calibration_sample(x, 64, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a.reshape(64, -1), axis=0)) == 64
    assert not np.array_equal(a, calibration_sample(x, 64, seed=4))


def test_cli_int8_cnn_ensemble_and_merged(arts, digits, tmp_path, capsys):
    out = tmp_path / "cnn_int8.onnx"
    args = ["-q", "export", str(arts["cnn"]), "--ensemble", "2", "--int8", "--out", str(out)]
    # digits has 360 test inputs: one label flip is 0.28 points, two would pass the default 0.5.
    assert main([*args, "--int8-tolerance", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and f"wrote {out}" in printed
    model = OnnxModel(out, device="cpu")
    assert model.output_names == list(ENSEMBLE_OUTPUTS) and model.kind == "ensemble"
    q = model.manifest["quantization"]
    # Measured: 99.72 % agreement, accuracy 98.61 % vs 98.89 % fp32 (one flip), max |dp| 0.025.
    assert q["check"]["agreement"] >= 0.97 and q["format"] == "qoperator"
    assert q["check"]["accuracy_drop_points"] <= 1.5 and q["tolerance_points"] == 1.5

    merged = tmp_path / "merged_int8.onnx"
    args = ["-q", "export", str(arts["cnn"]), "--t", "0.5", "--int8", "--int8-format", "qdq"]
    assert main([*args, "--out", str(merged)]) == 0
    model = OnnxModel(merged, device="cpu")
    assert model.output_names == list(MERGED_OUTPUTS) and model.kind == "merged"
    assert model.manifest["quantization"]["format"] == "qdq"
    assert model.manifest["precision"] == "int8"
    assert not list(tmp_path.glob(".*tmp"))  # no temporaries left


def test_cli_refuses_an_accuracy_drop_over_the_tolerance_unless_forced(arts, tmp_path, capsys):
    out = tmp_path / "refused.onnx"
    # A tolerance of -100 points demands that int8 be 100 points *more* accurate: impossible.
    args = ["-q", "export", str(arts["mlp"]), "--ensemble", "2", "--int8", "--out", str(out)]
    assert main([*args, "--int8-tolerance", "-100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modeconn export: error: int8 loses")
    assert "over the tolerance of -100" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())

    assert main([*args, "--int8-tolerance", "-100", "--force"]) == 0
    assert "written (--force)" in capsys.readouterr().out
    manifest = read_metadata(out)
    assert manifest["quantization"]["forced"] is True
    assert manifest["quantization"]["tolerance_points"] == -100


def test_library_refusal_writes_nothing(arts, digits, tmp_path):
    fp32_path = tmp_path / "merged.onnx"
    assert main(["-q", "export", str(arts["mlp"]), "--t", "0.5", "--out", str(fp32_path)]) == 0
    out = tmp_path / "merged_int8.onnx"
    with pytest.raises(QuantizationRefused, match="nothing was written"):
        quantize_onnx(
            fp32_path,
            out,
            x_test=digits.x_test.numpy(),
            y_test=digits.y_test.numpy(),
            calibration=digits.x_train[:64].numpy(),
            tolerance=-100.0,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--force"], "--force only apply with --int8"),
        (["--int8-tolerance", "1"], "--int8-tolerance only apply with --int8"),
        (["--int8", "--format", "safetensors"], "drop --format safetensors"),
        (["--int8", "--int8-calibration", "0"], "--int8-calibration N needs N >= 1"),
        (["--int8", "--int8-tolerance", "nan"], "finite number"),
    ],
)
def test_cli_bad_int8_flags_exit_2_with_one_line(arts, tmp_path, capsys, extra, message):
    out = tmp_path / "x.onnx"
    assert main(["-q", "export", str(arts["mlp"]), "--t", "0.5", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_default_tolerance_matches_the_library():
    from modeconn.commands import export

    assert export._DEFAULT_TOLERANCE == DEFAULT_TOLERANCE
