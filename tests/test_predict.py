"""``modeconn predict``: the digits test set written as PNG files, predicted through an artifact
(torch) and an exported graph (onnxruntime), checked against torch on the same inputs."""

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeconn.cli import main

UNCERTAINTY = ["entropy", "mutual_information", "disagreement"]
PROBS = [f"p_{c}" for c in range(10)]  # digits have no class names: 0..9


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[p]) for p in PROBS] for row in rows])  # (N, 10)


@pytest.fixture(scope="module")
def artifact(mlp_pair, digits, tmp_path_factory) -> Path:
    """The straight path between the session's two digits MLPs (BN-free: any t, any K)."""
    from modeconn.checkpoint import load_checkpoint
    from modeconn.pipeline import fit_artifact

    out = tmp_path_factory.mktemp("predict") / "linear"
    a, b = (load_checkpoint(p) for p in mlp_pair)
    fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
    return out


@pytest.fixture(scope="module")
def tree(digits, tmp_path_factory) -> Path:
    """The first 200 digits test images as 8-bit PNGs in ImageFolder layout (folders 0..9)."""
    root = tmp_path_factory.mktemp("digit_pngs")
    mean, std = digits.preprocessing["mean"][0], digits.preprocessing["std"][0]
    raw = digits.x_test[:200, 0].numpy() * std + mean  # (200, 8, 8) in [0, 1]
    for i, (image, label) in enumerate(zip(raw, digits.y_test[:200].tolist())):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(np.round(image * 255).clip(0, 255).astype(np.uint8)).save(
            root / str(label) / f"{i:03d}.png"
        )
    return root


def _inputs(tree: Path, files: list[str], digits) -> torch.Tensor:
    """The model inputs of ``files`` as the service makes them (independently of predict)."""
    from modeconn.images import image_to_input

    return torch.from_numpy(
        np.concatenate(
            [
                image_to_input((tree / f).read_bytes(), digits.preprocessing, (1, 8, 8))
                for f in files
            ]
        )
    )  # (N, 1, 8, 8)


def test_ensemble_csv_matches_torch_on_the_same_images(artifact, tree, digits, tmp_path, capsys):
    from modeconn.ensemble import Ensemble

    out = tmp_path / "preds.csv"
    code, stdout, _ = run_cli(
        capsys, "predict", artifact, "--images", tree, "--k", "3", "--out", out
    )
    assert code == 0 and "200 images, ensemble of 3 members" in stdout
    header, rows = read_csv(out)
    assert header == ["file", "label", "true", *PROBS, *UNCERTAINTY]
    assert len(rows) == 200
    files = [row["file"] for row in rows]
    assert files == sorted(files) and all(f.split("/")[0] == row["true"] for f, row in zip(files, rows))  # fmt: skip
    probs = probabilities(rows)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [int(row["label"]) for row in rows] == probs.argmax(1).tolist()

    pred = Ensemble.from_artifact(artifact, 3).predict(_inputs(tree, files, digits))
    np.testing.assert_allclose(probs, pred.probs.numpy(), atol=2e-6)
    np.testing.assert_allclose(
        [[float(row[c]) for c in UNCERTAINTY] for row in rows], pred.uncertainty.numpy(), atol=2e-5
    )
    assert [int(row["label"]) for row in rows] == pred.labels.tolist()

    # The PNGs hold 8-bit pixels: labels all but equal those of the original float inputs.
    index = [int(Path(f).stem) for f in files]
    reference = Ensemble.from_artifact(artifact, 3).predict(digits.x_test[index]).labels
    assert (pred.labels == reference).float().mean() >= 0.98


def test_imagefolder_metrics_are_those_of_the_csv(artifact, tree, tmp_path, capsys):
    from modeconn.metrics import ece, nll

    out = tmp_path / "preds.csv"
    code, stdout, _ = run_cli(capsys, "predict", artifact, "--images", tree, "--out", out)
    assert code == 0 and "ensemble of 8 members" in stdout  # the default: the service's K
    _, rows = read_csv(out)
    truth = torch.tensor([int(row["true"]) for row in rows])
    accuracy = float(np.mean([row["label"] == row["true"] for row in rows]))
    assert f"accuracy {100 * accuracy:.2f}%" in stdout
    assert accuracy > 0.85
    probs = torch.from_numpy(probabilities(rows))
    found = re.search(r"NLL (\S+)\s+ECE (\S+)%", stdout)
    assert found is not None, stdout
    assert float(found[1]) == pytest.approx(nll(probs.log(), truth), abs=2e-4)
    assert float(found[2]) == pytest.approx(100 * ece(probs, truth), abs=0.02)


def test_merged_model_at_t_has_entropy_only(artifact, tree, digits, tmp_path, capsys):
    from modeconn.artifact import load_artifact
    from modeconn.evaluate import predict
    from modeconn.merge import merge_at

    out = tmp_path / "mid.csv"
    code, stdout, _ = run_cli(capsys, "predict", artifact, "--images", tree, "--t", "0.25", "--out", out)  # fmt: skip
    assert code == 0 and "merged model at t = 0.25" in stdout
    header, rows = read_csv(out)
    assert header == ["file", "label", "true", *PROBS, "entropy"]
    path = load_artifact(artifact)
    inputs = _inputs(tree, [r["file"] for r in rows], digits)
    log_probs = predict(path.build_model(), merge_at(path, 0.25), inputs)  # (N, 10)
    np.testing.assert_allclose(probabilities(rows), log_probs.exp().numpy(), atol=2e-6)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    np.testing.assert_allclose([float(r["entropy"]) for r in rows], entropy.numpy(), atol=2e-5)


def test_an_exported_graph_predicts_the_same(artifact, tree, tmp_path, capsys):
    from modeconn.export import export_ensemble

    graph = tmp_path / "k3.onnx"
    export_ensemble(artifact, graph, 3)
    by_torch, by_onnx = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert run_cli(capsys, "predict", artifact, "--images", tree, "--k", "3", "--out", by_torch)[0] == 0  # fmt: skip
    code, stdout, _ = run_cli(capsys, "predict", graph, "--images", tree, "--out", by_onnx)
    assert code == 0 and "from " + str(graph) in stdout and "onnxruntime" in stdout
    (h1, r1), (h2, r2) = read_csv(by_torch), read_csv(by_onnx)
    assert h1 == h2 and [r["file"] for r in r1] == [r["file"] for r in r2]
    np.testing.assert_allclose(probabilities(r1), probabilities(r2), atol=1e-5)
    assert [r["label"] for r in r1] == [r["label"] for r in r2]
    # The graph runs as exported: --k may only repeat its K.
    assert run_cli(capsys, "predict", graph, "--images", tree, "--k", "3", "--out", by_onnx)[0] == 0  # fmt: skip
    code, _, err = run_cli(capsys, "predict", graph, "--images", tree, "--k", "4", "--out", by_onnx)
    assert code == 2 and "--k 4: " in err and "--ensemble 4" in err
    code, _, err = run_cli(capsys, "predict", graph, "--images", tree, "--t", "0.5", "--out", by_onnx)  # fmt: skip
    assert code == 2 and "--t 0.5: " in err


def test_unreadable_images_are_skipped_and_named_or_stop_with_strict(
    artifact, tree, tmp_path, capsys, caplog
):
    folder = tmp_path / "loose"
    folder.mkdir()
    png = next(iter(sorted((tree / "0").iterdir()))).read_bytes()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(png)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image file name")
    out = tmp_path / "loose.csv"
    with caplog.at_level(logging.WARNING, logger="modeconn"):
        code, stdout, _ = run_cli(capsys, "predict", artifact, "--images", folder, "--out", out)
    assert code == 0 and "3 images" in stdout and "accuracy" not in stdout
    assert "skipped 1 unreadable image: " in caplog.text and "broken.png" in caplog.text
    header, rows = read_csv(out)
    assert "true" not in header and [r["file"] for r in rows] == ["a.png", "b.png", "c.png"]

    strict = tmp_path / "strict.csv"
    code, _, err = run_cli(capsys, "predict", artifact, "--images", folder, "--strict", "--out", strict)  # fmt: skip
    assert code == 2 and "broken.png is not a readable image" in err and "--strict" in err
    assert not strict.exists()  # nothing half-written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "{tmp}/nowhere"], "image folder not found"),
        (["--images", "{empty}"], "no images (.png, .jpg"),
        (["--images", "{tree}", "--k", "0"], "--k K needs K >= 1"),
        (["--images", "{tree}", "--t", "1.5"], "--t must lie in [0, 1]"),
        (["--images", "{tree}", "--k", "2", "--t", "0.5"], "not allowed with argument"),
        (["--images", "{mixed}"], "mixes class folders (3) with folders that name no class"),
        (["--images", "{tree}", "--out", "{tmp}"], "is a directory"),
    ],
)
def test_user_errors_are_one_line(argv, message, artifact, tree, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    png = next(iter(sorted((tree / "3").iterdir()))).read_bytes()
    for name in ("3", "seven"):
        (tmp_path / "mixed" / name).mkdir(parents=True)
        (tmp_path / "mixed" / name / "x.png").write_bytes(png)
    fill = {"tmp": tmp_path, "tree": tree, "empty": tmp_path / "empty", "mixed": tmp_path / "mixed"}
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "p.csv")]
    try:
        code = main(["--quiet", "predict", str(artifact), *argv])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "p.csv").exists()
    if "--t" not in argv or "--k" not in argv:  # argparse adds its usage line to its own errors
        assert len(err.strip().splitlines()) == 1, err


def test_a_model_that_is_not_a_path_or_graph_is_refused(tmp_path, tree, capsys):
    code, _, err = run_cli(capsys, "predict", tmp_path / "nope", "--images", tree, "--out", tmp_path / "p.csv")  # fmt: skip
    assert code == 2 and "no such artifact directory or ONNX file" in err
    other = tmp_path / "model.pt"
    other.write_bytes(b"")
    code, _, err = run_cli(capsys, "predict", other, "--images", tree, "--out", tmp_path / "p.csv")
    assert code == 2 and "neither an artifact directory nor an .onnx file" in err
