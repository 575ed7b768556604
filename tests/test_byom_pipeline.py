"""Bring your own model: torchvision's ResNet-18, end to end through the command line.

Two endpoints trained by ``modeconn train --model torchvision:resnet18`` on a small 3-channel npz
data set; a Bezier curve and an AutoNEB chain between them, both on aligned endpoints
(``--align``), the chain read from the same weights saved as plain ``.pt`` state dicts
(``--model``); ``modeconn evaluate``; the K-member ensemble and the merged midpoint exported to
ONNX and checked against torch at batch sizes other than the traced one; ``modeconn
serve-build`` and the service answering like onnxruntime.

Everything is CPU-sized: 16x16 inputs (ResNet-18's stem takes them to 4x4 before ``layer1``),
128 training images, budgets of a few optimiser steps. The data are gratings whose orientation
is the class, at a random phase, in noise: a signal a convolutional network learns in two
epochs, so that the endpoints are good networks and their straight line has a real barrier.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modeconn.cli import main
from tests.bentoml_server import bentoml_server

# Every test needs the trained endpoints and a fitted path (together ~20 s here), and the
# module takes ~45 s: all of it is left out of the quick `-m "not slow"` run.
pytestmark = pytest.mark.slow

MODEL = "torchvision:resnet18"
INPUT_SHAPE = (3, 16, 16)
NUM_CLASSES = 4


def run_cli(capsys, *argv) -> str:
    """Run ``modeconn -q ARGV`` in process; its stdout (fails on a non-zero exit)."""
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, f"modeconn {argv[0]} exited with {code}: {err}"
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures: data, endpoints, two fitted paths (each made once per module)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread in this module, put back afterwards. Its operators are small (16x16
    inputs), and on a busy 2-core machine each one waits for the second thread to be scheduled:
    a ResNet-18 forward pass of two inputs took 0.66 s on two threads and 0.007 s on one, and
    this module about 4 minutes instead of 45 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gratings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy sine gratings; the class is the orientation (0, 45, 90, 135 degrees)."""
    y = rng.permutation(np.arange(n) % NUM_CLASSES)  # balanced classes
    theta = y * np.pi / NUM_CLASSES  # (n,)
    phase = rng.uniform(0, 2 * np.pi, n)  # (n,)
    rows, cols = np.meshgrid(*(np.arange(s) for s in INPUT_SHAPE[1:]), indexing="ij")  # (H, W)
    along = np.cos(theta)[:, None, None] * rows + np.sin(theta)[:, None, None] * cols  # (n, H, W)
    wave = np.sin(2 * np.pi / 6 * along + phase[:, None, None])  # (n, H, W), period 6 pixels
    x = rng.standard_normal((n, *INPUT_SHAPE)) + wave[:, None]  # (n, C, H, W)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("byom")


@pytest.fixture(scope="module")
def npz(folder) -> str:
    rng = np.random.default_rng(0)
    x_train, y_train = _gratings(rng, 128)
    x_test, y_test = _gratings(rng, 64)
    path = folder / "gratings.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def data(npz):
    from modeconn.data import load_data

    return load_data(npz)


@pytest.fixture(scope="module")
def endpoints(folder, npz) -> tuple[Path, Path]:
    """Two ResNet-18s from seeds 0 and 1, 2 epochs of 8 steps each, by ``modeconn train``."""
    files = []
    for seed in (0, 1):
        out = folder / f"resnet18_{seed}.safetensors"
        argv = ["train", "--model", MODEL, "--data", npz, "--epochs", "2", "--batch-size", "16"]
        assert main(["-q", *argv, "--lr", "0.02", "--seed", str(seed), "--out", str(out)]) == 0
        files.append(out)
    return files[0], files[1]


@pytest.fixture(scope="module")
def paths_root(folder) -> Path:
    """Where the artifacts go; the service serves every bundle below it."""
    return folder / "served"


@pytest.fixture(scope="module")
def bezier(endpoints, npz, paths_root) -> Path:
    out = paths_root / "paths" / "bezier"
    argv = ["connect", *endpoints, "--align", "--method", "bezier", "--data", npz]
    argv += ["--epochs", "4", "--batch-size", "32", "--eval-points", "3", "--out", out]
    assert main(["-q", *map(str, argv)]) == 0
    return out


@pytest.fixture(scope="module")
def plain_endpoints(endpoints, folder) -> tuple[Path, Path]:
    """The same weights as plain ``.pt`` files: a bare state dict, and one saved from DDP."""
    from safetensors.torch import load_file

    a, b = (load_file(str(p)) for p in endpoints)
    plain_a, plain_b = folder / "a.pt", folder / "b.pt"
    torch.save(a, plain_a)
    torch.save({"state_dict": {f"module.{k}": v for k, v in b.items()}}, plain_b)
    return plain_a, plain_b


@pytest.fixture(scope="module")
def autoneb(plain_endpoints, npz, paths_root, folder) -> Path:
    config = folder / "autoneb.yaml"
    config.write_text("cycles:\n  - {steps: 3, lr: 0.001, insert: equal, insert_count: 1}\n")
    out = paths_root / "paths" / "autoneb"
    argv = ["connect", *plain_endpoints, "--model", MODEL, "--data", npz, "--align"]
    argv += ["--method", "autoneb", "--config", config, "--batch-size", "32"]
    argv += ["--eval-size", "64", "--subsample", "2", "--eval-points", "3", "--out", out]
    assert main(["-q", *map(str, argv)]) == 0
    return out


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# Training and fitting


def test_endpoints_name_their_torchvision_model(endpoints, npz):
    from modeconn.checkpoint import load_checkpoint

    for seed, file in enumerate(endpoints):
        ckpt = load_checkpoint(file)
        assert ckpt.model.name == MODEL and ckpt.model.kwargs == {}
        assert ckpt.model.input_shape == INPUT_SHAPE and ckpt.model.num_classes == NUM_CLASSES
        assert ckpt.meta["data"] == npz and ckpt.meta["seed"] == seed
        assert any(k.endswith("running_var") for k in ckpt.state)  # torchvision's BatchNorm2d


def test_aligned_bezier_stays_below_the_unaligned_straight_line(bezier, endpoints, data):
    from modeconn.bn import split_state
    from modeconn.checkpoint import load_checkpoint
    from modeconn.evaluate import evaluate_path
    from modeconn.paths import linear

    m = _manifest(bezier)
    assert m["method"] == "bezier" and m["basis"] == "bezier" and m["num_nodes"] == 3
    assert m["model"] == {
        "name": MODEL,
        "input_shape": list(INPUT_SHAPE),
        "num_classes": NUM_CLASSES,
        "kwargs": {},
    }
    alignment = m["alignment"]
    assert alignment["method"] == "weight_matching" and alignment["spec"] == "inferred"
    assert alignment["groups"] > 0 and alignment["objective_end"] > alignment["objective_start"]
    assert m["fit"]["config"]["epochs"] == 4 and m["fit"]["config"]["batch_size"] == 32
    assert (bezier / "buffers.safetensors").is_file() and 0.5 in m["served_ts"]

    metrics = m["metrics"]
    assert metrics["ts"] == [0.0, 0.5, 1.0]
    assert min(metrics["test_acc"][0], metrics["test_acc"][2]) > 0.6  # chance: 0.25
    # The straight line between the endpoints as trained (not aligned), with BN recomputed at
    # every t, evaluated exactly as the manifest's metrics are.
    a, b = (load_checkpoint(p) for p in endpoints)
    model = a.build_model()
    line = linear(split_state(model, a.state)[0], split_state(model, b.state)[0])
    straight = evaluate_path(model, line, data, ts=[0.0, 0.5]).train_loss
    assert straight[0] == pytest.approx(metrics["train_loss"][0], rel=1e-5, abs=1e-6)  # same A
    ends = max(metrics["train_loss"][0], metrics["train_loss"][2])
    assert straight[1] > 2 * ends  # a real barrier, and the fitted path stays well below it
    assert max(metrics["train_loss"]) < 0.5 * straight[1]


def test_autoneb_from_plain_state_dicts_with_model_option(autoneb, bezier, plain_endpoints):
    m = _manifest(autoneb)
    assert m["method"] == "autoneb" and m["basis"] == "polychain" and m["num_nodes"] == 3
    assert m["model"]["name"] == MODEL and m["model"]["input_shape"] == list(INPUT_SHAPE)
    assert m["endpoints"]["a"]["file"] == str(plain_endpoints[0])
    # The same weights read from plain files (one DDP-prefixed): the same spec, and the same
    # weight-matching objective before any permutation.
    alignment, theirs = m["alignment"], _manifest(bezier)
    assert alignment["method"] == "weight_matching" and alignment["spec"] == "inferred"
    assert alignment["groups"] == theirs["alignment"]["groups"]
    start = theirs["alignment"]["objective_start"]
    assert alignment["objective_start"] == pytest.approx(start, rel=1e-6)
    knots = m["knots"]
    assert knots[0] == 0.0 and knots[-1] == 1.0 and knots[0] < knots[1] < knots[2]
    cycles = m["fit"]["stats"]["cycles"]
    assert [(c["num_nodes"], c["steps"], c["optimizer"]) for c in cycles] == [(3, 3, "adam")]
    assert (autoneb / "buffers.safetensors").is_file()
    # The same ends as the Bezier's, down to the BatchNorm statistics recomputed there: A is
    # A, and B permuted computes what B computes, whichever permutation the matching found.
    ours, theirs = m["metrics"], theirs["metrics"]
    for i in (0, -1):
        assert ours["train_loss"][i] == pytest.approx(theirs["train_loss"][i], rel=1e-5, abs=1e-7)
        assert ours["test_acc"][i] == theirs["test_acc"][i]
    assert all(np.isfinite(ours["train_loss"]))


# ---------------------------------------------------------------------------------------------
# Evaluation, export, serving


def test_evaluate_reports_ensembles_and_merges(bezier, folder, capsys):
    report = folder / "evaluate.json"
    out = run_cli(capsys, "evaluate", bezier, "--k", "2,3", "--backend", "torch", "--json", report)
    assert "path ensemble K=3" in out and MODEL in out
    rows = {row["label"]: row for row in json.loads(report.read_text())["bezier"]}
    expected = ["endpoint A", "endpoint B", "A+B ensemble", "straight midpoint", "path midpoint"]
    assert list(rows) == [*expected, "path ensemble K=2", "path ensemble K=3"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
        assert 0.0 <= row["nll"] < 20.0 and 0.0 <= row["brier"] <= 2.0
        assert 0.0 <= row["disagreement"] <= 1.0
    assert rows["path ensemble K=3"]["ts"] == [0.0, 0.5, 1.0]
    assert rows["path ensemble K=2"]["accuracy"] == rows["A+B ensemble"]["accuracy"]
    assert min(rows["endpoint A"]["accuracy"], rows["endpoint B"]["accuracy"]) > 0.6


@pytest.fixture(scope="module")
def exported(bezier, folder) -> tuple[Path, Path]:
    """``modeconn export`` of the Bezier path's 3-member ensemble and of its merged midpoint."""
    ensemble, merged = folder / "bezier_k3.onnx", folder / "bezier_mid.onnx"
    assert main(["-q", "export", str(bezier), "--ensemble", "3", "--out", str(ensemble)]) == 0
    assert main(["-q", "export", str(bezier), "--t", "0.5", "--out", str(merged)]) == 0
    return ensemble, merged


def test_exported_ensemble_and_midpoint_match_torch(exported, bezier, data):
    from modeconn.ensemble import Ensemble
    from modeconn.merge import merged_model
    from modeconn.runtime import OnnxModel

    ensemble_file, merged_file = exported
    ensemble = OnnxModel(ensemble_file, device="cpu")
    merged = OnnxModel(merged_file, device="cpu")
    for model in (ensemble, merged):
        assert isinstance(model.session.get_inputs()[0].shape[0], str)  # a symbolic batch axis
        assert model.manifest["model"]["name"] == MODEL and model.manifest["alignment"] is True
        assert model.input_shape == INPUT_SHAPE and model.num_classes == NUM_CLASSES
    assert ensemble.manifest["k"] == 3 and ensemble.ts == [0.0, 0.5, 1.0]
    assert ensemble.manifest["bn"] == ["stored"] * 3 and merged.manifest["bn"] == ["stored"]

    reference = Ensemble.from_artifact(bezier, 3)
    midpoint = merged_model(bezier, 0.5)
    for batch in (1, 7):  # the graph was traced at batch 2 and checked at 5
        x = data.x_test[:batch]
        got = ensemble.run(x.numpy())
        ref = reference.predict(x)
        assert got["probabilities"].shape == (batch, NUM_CLASSES)
        np.testing.assert_allclose(got["probabilities"], ref.probs.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["uncertainty"], ref.uncertainty.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["log_probabilities"], ref.log_probs.numpy(), atol=1e-4)
        with torch.no_grad():
            ref_mid = torch.log_softmax(midpoint(x), -1)
        got = merged.run(x.numpy())
        np.testing.assert_allclose(got["log_probabilities"], ref_mid.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["probabilities"], ref_mid.exp().numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def served(bezier, autoneb, paths_root, tmp_path_factory):
    """``modeconn serve-build`` of the Bezier artifact, served by a real ``bentoml serve``.

    The AutoNEB artifact lies beside it without a bundle: the service must leave it out.
    """
    import httpx

    assert (
        main(["-q", "serve-build", str(bezier), "--k", "2", "--ts", "0.5", "--cascade", "0"]) == 0
    )
    env = {
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
        "MODECONN_ARTIFACTS": str(paths_root),
        "MODECONN_MODELS": "",
    }
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with (
        bentoml_server(env, log_file) as running,
        httpx.Client(base_url=running["url"], timeout=60) as client,
    ):
        yield client


def test_service_answers_like_onnxruntime(served, bezier, exported, data):
    from PIL import Image

    from modeconn.runtime import OnnxModel

    listed = served.get("/paths").json()["paths"]
    assert [p["name"] for p in listed] == ["paths/bezier"]
    assert listed[0]["model"]["name"] == MODEL and listed[0]["ks"] == [2]
    assert listed[0]["served_ts"] == [0.5]

    x = data.x_test[:3].numpy()  # (3, 3, 16, 16)
    for body, file in (
        ({"k": 2}, "ensemble_k2.onnx"),
        ({"mode": "merged", "t": 0.5}, "merged_t0.5000.onnx"),
    ):
        got = served.post("/predict", json={"path": "paths/bezier", "inputs": x.tolist(), **body})
        assert got.status_code == 200, got.text
        got = got.json()
        ref = OnnxModel(bezier / "serving" / file, device="cpu").run(x)
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], rtol=1e-5, atol=1e-6)
        assert got["labels"] == ref["probabilities"].argmax(-1).tolist()
        if "uncertainty" in ref:
            assert got["ts"] == [0.0, 1.0]
            np.testing.assert_allclose(
                got["mutual_information"], ref["uncertainty"][:, 1], atol=1e-6
            )

    # The served midpoint is the one `modeconn export --t 0.5` wrote (same artifact, same BN).
    flat = {"path": "paths/bezier", "mode": "merged", "inputs": x.reshape(3, -1).tolist()}
    answer = served.post("/predict", json=flat).json()
    ref = OnnxModel(exported[1], device="cpu").run(x)["probabilities"]
    np.testing.assert_allclose(answer["probabilities"], ref, rtol=1e-5, atol=1e-6)

    # npz inputs are used as given: no raw pixel values to normalise, no image recipe.
    raw = served.post("/predict", json={"path": "paths/bezier", "inputs": x.tolist(), "raw": True})
    assert raw.status_code == 400 and "not trained on images" in raw.text
    png = io.BytesIO()
    Image.new("RGB", (INPUT_SHAPE[2], INPUT_SHAPE[1])).save(png, format="PNG")
    upload = served.post(
        "/predict_image",
        files={"image": ("x.png", png.getvalue(), "image/png")},
        data={"path": "paths/bezier", "k": "2"},
    )
    assert upload.status_code == 400 and "not trained on images" in upload.text
