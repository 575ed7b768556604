"""The command line: training, the straight path, eval-path, align, and one-line user errors."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from modeconn.cli import main


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_is_deterministic_and_self_describing(tmp_path, capsys):
    files = []
    for name in ("x", "y"):
        path = tmp_path / f"{name}.safetensors"
        code, out, _ = run_cli(
            capsys, "train", "--arg", "width=16", "--epochs", "3", "--seed", "7", "--out", path
        )
        assert code == 0 and "test acc" in out
        files.append(path)
    a, b = (load_file(str(f)) for f in files)
    assert all((a[k] == b[k]).all() for k in a)

    from modeconn.checkpoint import load_checkpoint

    ckpt = load_checkpoint(files[0])
    assert ckpt.model.name == "mlp" and ckpt.model.kwargs == {"width": 16}
    assert ckpt.meta["seed"] == 7 and ckpt.meta["data"] == "digits"
    assert 0 < ckpt.meta["metrics"]["test_acc"] <= 1


def test_straight_path_between_two_mlps_has_a_clear_barrier(mlp_pair, tmp_path, capsys):
    out_dir = tmp_path / "linear"
    code, _, _ = run_cli(
        capsys, "connect", *mlp_pair, "--method", "linear", "--out", out_dir, "--eval-points", "0"
    )
    assert code == 0
    code, out, _ = run_cli(
        capsys,
        "eval-path",
        out_dir,
        "--points",
        "21",
        "--json",
        tmp_path / "e.json",
        "--plot",
        tmp_path / "e.png",
    )
    assert code == 0 and "loss barrier" in out and "above the chord" in out
    ev = json.loads((tmp_path / "e.json").read_text())
    assert len(ev["ts"]) == 21
    assert ev["loss_barrier"]["mean"] > 0.1  # independently trained: not linearly connected
    assert ev["weight_length"] > 0 and ev["prediction_length"] > 0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_align_keeps_the_function_and_lowers_the_barrier(mlp_pair, tmp_path, capsys):
    out = tmp_path / "b_aligned.safetensors"
    code, text, _ = run_cli(capsys, "align", *mlp_pair, "--out", out, "--points", "11")
    assert code == 0
    before, after = (
        float(line.split("train loss ")[1].split(",")[0])
        for line in text.splitlines()
        if "barrier" in line
    )
    assert after < before


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--model", "transformer", "--out", "{tmp}/m.safetensors"],
            "unknown model 'transformer'",
        ),
        (["train", "--data", "imagenet", "--out", "{tmp}/m.safetensors"], "unknown data set"),
        (["train", "--arg", "widht=3", "--out", "{tmp}/m.safetensors"], "bad arguments for model"),
        (
            ["connect", "{tmp}/missing.safetensors", "{a}", "--out", "{tmp}/p"],
            "checkpoint not found",
        ),
        (["connect", "{a}", "{cnn}", "--out", "{tmp}/p"], "different architectures"),
        (["connect", "{a}", "{b}", "--method", "teleport", "--out", "{tmp}/p"], "unknown method"),
        (
            ["connect", "{a}", "{b}", "--data", "npz:{tmp}/wide.npz", "--out", "{tmp}/p"],
            "expects [1, 8, 8]",
        ),
        (["eval-path", "{tmp}/nowhere"], "artifact directory not found"),
        (["connect", "{a}", "{b}", "--device", "mps", "--out", "{tmp}/p"], "only cpu and cuda"),
        (["connect", "{a}", "{b}", "--device", "gpu0", "--out", "{tmp}/p"], "not a device"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    argv, message, mlp_pair, bn_pair, tmp_path, capsys
):
    import numpy as np

    np.savez(
        tmp_path / "wide.npz",
        x_train=np.zeros((4, 3, 32, 32), np.float32),
        y_train=np.arange(4),
        x_test=np.zeros((2, 3, 32, 32), np.float32),
        y_test=np.arange(2),
    )
    fill = {"tmp": tmp_path, "a": mlp_pair[0], "b": mlp_pair[1], "cnn": bn_pair[0]}
    code, _, err = run_cli(capsys, *[arg.format(**fill) for arg in argv])
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_script_entry_point_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeconn",
            "connect",
            "a.safetensors",
            "b.safetensors",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "modeconn connect: error: checkpoint not found: a.safetensors"
