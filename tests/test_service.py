"""The HTTP service: serving bundles, image preprocessing, every bad input a 4xx in process
(``to_asgi``), and one real ``bentoml serve`` called over HTTP: answers equal onnxruntime's,
bad inputs leave it ready, 16 concurrent clients, image upload, the model store, no torch."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from modeconn.formats import read_index, read_manifest
from modeconn.runtime import OnnxModel
from modeconn.serving import build_serving, find_served
from tests.bentoml_server import REPO, bentoml_server
from tests.error_bodies import ErrorBodies

MAX_BATCH = 64


# ---------------------------------------------------------------------------------------------
# Fixtures: `models_root` (conftest): two served artifacts and one without a bundle


def _reference(root: Path, path: str, file: str) -> OnnxModel:
    return OnnxModel(root / path / "serving" / file, device="cpu")


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_digit(digits, i: int) -> np.ndarray:
    """Test image i as raw digits values 0..16, shape (8, 8)."""
    mean, std = digits.preprocessing["mean"][0], digits.preprocessing["std"][0]
    return np.clip((digits.x_test[i, 0].numpy() * std + mean) * 16.0, 0.0, 16.0)


# ---------------------------------------------------------------------------------------------
# Serving bundles


def test_bundle_index_lists_built_and_skipped_graphs(models_root):
    assert [name for name, _ in find_served(models_root)] == ["paths/cnn", "paths/mlp"]
    mlp = read_index(models_root / "paths" / "mlp")
    assert sorted(mlp.ensembles) == [2, 3] and sorted(mlp.merged) == [0.0, 0.5, 1.0]
    assert mlp.ensembles[3].ts == [0.0, 0.5, 1.0] and mlp.merged[0.5].bn == ["none"]
    # The cascade's members are the 3-member ensemble's t, middle first; t = 1 was added.
    assert mlp.cascade is not None and mlp.cascade.ts == [0.5, 0.0, 1.0]
    assert (mlp.cascade.rule, mlp.cascade.threshold) == ("confidence", 0.95)
    described = read_manifest(models_root / "paths" / "mlp")  # the artifact's facts, once
    assert described.model.input_shape == [1, 8, 8]
    assert described.preprocessing["raw_max"] == 16.0
    cnn = read_index(models_root / "paths" / "cnn")
    assert cnn.has_batchnorm and sorted(cnn.merged) == [0.5]
    assert cnn.merged[0.5].bn == ["stored"]
    assert [(s["mode"], s["t"]) for s in cnn.skipped] == [("merged", 0.3)]
    assert cnn.cascade is None  # built with cascade=0
    assert "BatchNorm" in cnn.skipped[0]["reason"]
    for graph in mlp.graphs:
        model = _reference(models_root, "paths/mlp", graph.file)
        assert model.manifest["ts"] == graph.ts and model.manifest["k"] == graph.k


def test_bundle_is_kept_when_up_to_date_and_rebuilt_on_force(models_root, tmp_path):
    import shutil

    art = tmp_path / "copy"
    shutil.copytree(models_root / "paths" / "mlp", art)
    before = (art / "serving" / "ensemble_k2.onnx").stat().st_mtime_ns
    for kwargs in ({"ks": (2, 3), "ts": (0.0, 0.5)}, {}):  # {}: whatever the bundle holds
        index = build_serving(art, **kwargs)
        assert (art / "serving" / "ensemble_k2.onnx").stat().st_mtime_ns == before
        assert sorted(index.ensembles) == [2, 3]
    index = build_serving(art, ks=(2,), ts=(), cascade=0, int8=False, force=True)
    assert sorted(index.ensembles) == [2] and not index.merged
    assert sorted(p.name for p in (art / "serving").iterdir()) == ["ensemble_k2.onnx", "index.json"]


def test_cascade_needs_every_member_servable(models_root, tmp_path):
    import shutil

    art = tmp_path / "cnn"
    shutil.copytree(models_root / "paths" / "cnn", art)
    index = build_serving(art, cascade=8)  # BN statistics stored at t = 0, 0.5, 1 only
    assert index.cascade is None
    assert [(s["mode"], s.get("k")) for s in index.skipped if s["mode"] == "cascade"] == [
        ("cascade", 8)
    ]
    assert "BatchNorm" in index.skipped[-1]["reason"]
    index = build_serving(art, cascade=3, rule="agree", threshold=2)
    assert index.cascade is not None and index.cascade.ts == [0.5, 0.0, 1.0]
    assert (index.cascade.rule, index.cascade.threshold) == ("agree", 2)
    assert sorted(index.merged) == [0.0, 0.5, 1.0]  # the members, besides t = 0.5 asked for
    assert build_serving(art).cascade == index.cascade  # kept: what the bundle holds


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ks": (0,)}, "positive integers"),
        ({"ts": (1.5,)}, r"\[0, 1\]"),
        ({"ks": (), "ts": (), "cascade": 0}, "nothing to build"),
        ({"cascade": -1}, "integer >= 0"),
        ({"threshold": 1.5}, r"probability in \[0, 1\]"),
        ({"rule": "agree", "threshold": 0.5}, "integer >= 2"),
        ({"rule": "vote"}, "unknown cascade rule"),
    ],
)
def test_bad_bundle_requests_are_refused(models_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_serving(models_root / "paths" / "mlp", **kwargs)


def test_serve_build_command_finds_artifacts_below_a_folder(models_root, tmp_path, capsys):
    import shutil

    from modeconn.cli import main

    shutil.copytree(models_root / "paths" / "mlp", tmp_path / "arts" / "paths" / "mlp")
    argv = ["--quiet", "serve-build", str(tmp_path / "arts"), "--k", "2,3", "--ts", "0,0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "paths/mlp: ensembles K = 2, 3; merged t = 0, 0.5, 1; cascade: 3 members, confidence "
        in out
    )
    assert main(["--quiet", "serve-build", str(tmp_path / "nothing_here")]) == 2


def test_service_modules_do_not_import_torch():
    code = (
        "import sys, service.service, service.catalog, modeconn.runtime, modeconn.serving;"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Image preprocessing


def test_png_of_a_digit_becomes_the_normalised_test_input(digits):
    from service.preprocess import image_to_input

    for i in range(5):
        raw = _raw_digit(digits, i)
        x = image_to_input(_png(np.round(raw / 16 * 255)), digits.preprocessing, (1, 8, 8))
        assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
        # PNG stores 8 bits: one grey level is 1/255 of the range, i.e. 1/(255 std) here.
        tolerance = 0.5 / 255 / digits.preprocessing["std"][0] + 1e-6
        np.testing.assert_allclose(x[0], digits.x_test[i].numpy(), atol=tolerance)


def test_dark_ink_on_white_paper_is_inverted_and_upscaled_images_are_shrunk(digits):
    from service.preprocess import image_to_input

    raw = _raw_digit(digits, 3)
    light = np.round(raw / 16 * 255)
    big = np.kron(light, np.ones((4, 4)))  # (32, 32): each pixel a 4x4 block
    reference = image_to_input(_png(light), digits.preprocessing, (1, 8, 8))
    inverted = image_to_input(_png(255 - big), digits.preprocessing, (1, 8, 8))
    np.testing.assert_allclose(inverted, reference, atol=1e-5)
    # Forced not to invert, the paper stays white: a very different input.
    kept = image_to_input(_png(255 - big), digits.preprocessing, (1, 8, 8), invert=False)
    assert np.abs(kept - reference).max() > 1.0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a readable image"),
        (b"GIF89a", "not a readable image"),
        ("truncated", "could not be decoded"),
        ("gif", "expected one of PNG, JPEG"),
    ],
)
def test_non_images_are_refused(digits, data, match):
    from PIL import Image

    from service.preprocess import image_to_input

    if data == "truncated":
        data = _png(np.full((32, 32), 200))[:60]
    elif data == "gif":
        buffer = io.BytesIO()
        Image.new("L", (8, 8)).save(buffer, format="GIF")
        data = buffer.getvalue()
    with pytest.raises(ValueError, match=match):
        image_to_input(data, digits.preprocessing, (1, 8, 8))


def test_raw_inputs_are_normalised_and_range_checked(digits):
    from service.preprocess import normalize_raw

    raw = np.stack([_raw_digit(digits, i) for i in range(4)])[:, None]  # (4, 1, 8, 8)
    x = normalize_raw(raw.astype(np.float32), digits.preprocessing, (1, 8, 8))
    np.testing.assert_allclose(x, digits.x_test[:4].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        normalize_raw(raw + 1.0, digits.preprocessing, (1, 8, 8))


# ---------------------------------------------------------------------------------------------
# In process: the ASGI app (BentoML's recommended unit test), many bad inputs


def _x(n: int = 2, seed: int = 0) -> list:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).round(5).tolist()


def test_paths_lists_what_is_served_with_barrier_and_accuracy(asgi):
    listed = asgi.get("/paths").json()
    assert listed == asgi.post("/paths", json={}).json()
    assert listed["max_batch"] == MAX_BATCH
    paths = {p["name"]: p for p in listed["paths"]}
    assert sorted(paths) == ["paths/cnn", "paths/mlp"]  # "unbuilt" has no bundle
    mlp = paths["paths/mlp"]
    assert mlp["method"] == "linear" and mlp["model"]["name"] == "mlp"
    assert mlp["ks"] == [2, 3] and mlp["served_ts"] == [0.0, 0.5, 1.0]
    assert mlp["cascade"] == {
        "k": 3,
        "ts": [0.5, 0.0, 1.0],
        "rule": "confidence",
        "threshold": 0.95,
    }
    assert mlp["ensemble_ts"]["3"] == [0.0, 0.5, 1.0]
    assert mlp["barrier"]["loss_mean"] is not None and 0.5 < mlp["accuracy"]["t0"] <= 1.0
    assert isinstance(mlp["barrier"]["loss_linear"], float)  # above the chord
    assert paths["paths/cnn"]["served_ts"] == [0.5]
    one = asgi.get("/paths", params={"path": "paths/cnn"}).json()["paths"]
    assert [p["name"] for p in one] == ["paths/cnn"]


def test_openapi_documents_the_endpoints_with_examples(asgi):
    spec = asgi.get("/docs.json")
    assert spec.status_code == 200
    spec = spec.json()
    for route in ("/predict", "/predict_batch", "/predict_image", "/paths", "/export", "/readyz"):
        assert route in spec["paths"], route
    request = spec["components"]["schemas"]["PredictRequestIODescriptor"]["properties"]
    assert request["path"]["examples"] == ["paths/bezier"]
    assert np.array(request["inputs"]["examples"][0]).shape == (1, 1, 8, 8)
    assert request["mode"]["enum"] == ["ensemble", "merged", "point", "cascade"]
    assert asgi.get("/").status_code == 200  # the Swagger page


def test_predictions_equal_onnxruntime(asgi, models_root):
    x = _x(5)
    for body, file in (
        ({"k": 3}, "ensemble_k3.onnx"),
        ({}, "ensemble_k3.onnx"),  # default: the largest K built
        ({"mode": "merged", "t": 0.0}, "merged_t0.0000.onnx"),
        ({"mode": "point"}, "merged_t0.5000.onnx"),  # default t: 0.5
    ):
        got = asgi.post("/predict", json={"path": "paths/mlp", "inputs": x, **body})
        assert got.status_code == 200, got.text
        got = got.json()
        ref = _reference(models_root, "paths/mlp", file).run(np.array(x, dtype=np.float32))
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], rtol=1e-5, atol=1e-6)
        assert got["labels"] == ref["probabilities"].argmax(-1).tolist()
        if "uncertainty" in ref:
            assert got["mode"] == "ensemble" and got["k"] == 3 and got["ts"] == [0.0, 0.5, 1.0]
            np.testing.assert_allclose(got["entropy"], ref["uncertainty"][:, 0], atol=1e-6)
            np.testing.assert_allclose(
                got["mutual_information"], ref["uncertainty"][:, 1], atol=1e-6
            )
            np.testing.assert_allclose(got["disagreement"], ref["uncertainty"][:, 2], atol=1e-6)
        else:
            p = ref["probabilities"].astype(np.float64)
            np.testing.assert_allclose(got["entropy"], -(p * np.log(p)).sum(-1), atol=1e-5)
            assert got["mutual_information"] is None and got["k"] == 1


def test_flat_and_raw_inputs_give_the_same_answer(asgi, digits):
    x = digits.x_test[:3].numpy()
    raw = np.stack([_raw_digit(digits, i) for i in range(3)])[:, None]
    answers = [
        asgi.post("/predict", json={"path": "paths/mlp", "inputs": body, "raw": raw_flag}).json()
        for body, raw_flag in (
            (x.tolist(), False),
            (x.reshape(3, 64).tolist(), False),
            (raw.tolist(), True),
        )
    ]
    assert answers[0] == answers[1]
    np.testing.assert_allclose(answers[2]["probabilities"], answers[0]["probabilities"], atol=1e-5)


def test_base64_inputs_give_the_same_answer_as_lists(asgi):
    x = np.array(_x(4), dtype=np.float32)
    b64 = base64.b64encode(x.astype("<f4").tobytes()).decode()
    lists = asgi.post("/predict", json={"path": "paths/cnn", "inputs": x.tolist()}).json()
    for shape in ([4, 1, 8, 8], [4, 64]):
        got = asgi.post(
            "/predict", json={"path": "paths/cnn", "inputs_b64": b64, "shape": shape}
        ).json()
        assert got == lists


def test_batch_endpoint_groups_requests_and_keeps_their_order(asgi):
    items = [
        {"path": "paths/mlp", "inputs": _x(2, 1), "k": 2},
        {"path": "paths/cnn", "inputs": _x(3, 2), "mode": "merged"},
        {"path": "paths/mlp", "inputs": _x(1, 3), "k": 2},
        {"path": "paths/mlp", "inputs": _x(4, 4), "mode": "merged", "t": 0.0},
    ]
    got = asgi.post("/predict_batch", json=items)
    assert got.status_code == 200, got.text
    for item, answer in zip(items, got.json()):
        alone = asgi.post("/predict", json=item).json()
        assert answer["path"] == item["path"] and len(answer["labels"]) == len(item["inputs"])
        np.testing.assert_allclose(answer["probabilities"], alone["probabilities"], atol=1e-6)


def test_export_downloads_the_served_graph(asgi, models_root):
    for response in (
        asgi.post("/export", json={"path": "paths/mlp", "mode": "ensemble", "k": 2}),
        asgi.get("/export", params={"path": "paths/mlp", "k": "2"}),
    ):
        assert response.status_code == 200
        assert "paths_mlp_ensemble_k2.onnx" in response.headers["content-disposition"]
        assert response.content == (models_root / "paths/mlp/serving/ensemble_k2.onnx").read_bytes()
    merged = asgi.get("/export", params={"path": "paths/cnn", "mode": "merged", "t": "0.5"})
    assert merged.status_code == 200
    assert OnnxModel(merged.content, device="cpu").manifest["kind"] == "merged"


def test_image_upload_in_process(asgi, digits, models_root):
    png = _png(np.round(_raw_digit(digits, 0) / 16 * 255))
    got = asgi.post(
        "/predict_image",
        files={"image": ("digit.png", png, "image/png")},
        data={"path": "paths/mlp", "k": "2"},
    )
    assert got.status_code == 200, got.text
    ref = _reference(models_root, "paths/mlp", "ensemble_k2.onnx").run(digits.x_test[:1].numpy())
    assert got.json()["labels"] == ref["probabilities"].argmax(-1).tolist()


# (body, status, fragment of the message). Bodies are JSON text, so NaN and Infinity literals
# (which Python's json module writes and reads) are sent as they are.
_X = json.dumps(_x(1))


def _with(rest: str, path: str = "paths/mlp") -> str:
    """A /predict body for one valid input plus ``rest`` (JSON text: '"k": 7')."""
    return '{"path": "' + path + '", "inputs": ' + _X + rest + "}"


BAD_PREDICTIONS = [
    (_with("", path="nope"), 404, "unknown path 'nope'; served paths: ["),
    ('{"path": "paths/mlp", "inputs": [[1, 2, 3]]}', 400, "expects [N, 1, 8, 8] or [N, 64]"),
    ('{"path": "paths/mlp", "inputs": [[[1, 2], [3, 4]]]}', 400, "expects [N, 1, 8, 8]"),
    ('{"path": "paths/mlp", "inputs": [["1.0", 2]]}', 400, "expected a number, got '1.0' (str)"),
    ('{"path": "paths/mlp", "inputs": [[1.0, true]]}', 400, "expected a number, got True (bool)"),
    ('{"path": "paths/mlp", "inputs": [[1.0, null]]}', 400, "inputs[0][1]: expected a number"),
    ('{"path": "paths/mlp", "inputs": [[1.0, NaN]]}', 400, "inputs[0][1] is nan"),
    ('{"path": "paths/mlp", "inputs": [[Infinity, 1.0]]}', 400, "inputs[0][0] is inf"),
    ('{"path": "paths/mlp", "inputs": [[-Infinity]]}', 400, "finite numbers"),
    ('{"path": "paths/mlp", "inputs": [[1e39]]}', 400, "does not fit in float32"),
    ('{"path": "paths/mlp", "inputs": []}', 400, "inputs is empty"),
    ('{"path": "paths/mlp", "inputs": [[]]}', 400, "expects [N, 1, 8, 8]"),
    ('{"path": "paths/mlp", "inputs": [1, 2, 3]}', 400, "batch first"),
    ('{"path": "paths/mlp", "inputs": 5}', 400, "valid list"),
    ('{"path": "paths/mlp", "inputs": [[1, 2], [3]]}', 400, "ragged: inputs[1] has 1 elements"),
    (
        '{"path": "paths/mlp", "inputs": [[1, 2], [[3], [4]]]}',
        400,
        "inputs[1][0]: expected a number",
    ),
    (
        '{"path": "paths/mlp", "inputs": [[0]], "t": 1.5, "mode": "merged"}',
        400,
        "less than or equal to 1",
    ),
    ('{"path": "paths/mlp", "inputs": [[0]], "t": NaN, "mode": "merged"}', 400, "finite number"),
    (
        _with(', "t": 0.3, "mode": "merged"'),
        400,
        "served t values: [0, 0.5, 1]",
    ),
    (_with(', "t": 0.5'), 400, "t selects a merged model"),
    (_with(', "k": 7'), 400, "available ensemble sizes: [2, 3]"),
    (_with(', "k": 0'), 400, "greater than or equal to 1"),
    (_with(', "k": "2"'), 400, "valid integer"),
    (_with(', "k": 2.5'), 400, "valid integer"),
    (
        _with(', "k": 3, "mode": "merged"'),
        400,
        "k=3 selects an ensemble",
    ),
    (
        _with(', "mode": "best"'),
        400,
        "'ensemble', 'merged', 'point' or 'cascade'",
    ),
    (
        _with(', "raw": true'),
        400,
        "raw inputs must lie in [0, 16]",
    ),
    ('{"inputs": ' + _X + "}", 400, "Field required"),
    (
        _with(', "mdoe": "merged"'),
        400,
        "Extra inputs are not permitted",
    ),
    ('{"path": "paths/mlp", "inputs": [[1, 2]', 400, "Invalid JSON"),
    ("", 400, "Field required"),
    ("[1, 2]", 400, "should be an object"),
    ('{"path": 3, "inputs": [[1]]}', 400, "valid string"),
]
_NAN_B64 = base64.b64encode(np.array([[np.nan]], dtype="<f4").tobytes()).decode()
BAD_PREDICTIONS += [
    ('{"path": "paths/mlp"}', 400, "either as inputs (nested lists) or as inputs_b64"),
    (_with(', "inputs_b64": "AAAA"'), 400, "either as inputs"),
    ('{"path": "paths/mlp", "inputs_b64": "AAAA"}', 400, "inputs_b64 needs shape"),
    (_with(', "shape": [1, 64]'), 400, "shape goes with inputs_b64"),
    (
        '{"path": "paths/mlp", "inputs_b64": "AAAA", "shape": [1, 64]}',
        400,
        "holds 3 bytes; shape [1, 64] of float32 needs 256",
    ),
    ('{"path": "paths/mlp", "inputs_b64": "@@@@", "shape": [1, 1]}', 400, "not valid base64"),
    ('{"path": "paths/mlp", "inputs_b64": "AAAA", "shape": [0, 1]}', 400, "every size >= 1"),
    ('{"path": "paths/mlp", "inputs_b64": "AAAA", "shape": [3]}', 400, "batch first"),
    (
        '{"path": "paths/mlp", "inputs_b64": "' + _NAN_B64 + '", "shape": [1, 1]}',
        400,
        "inputs_b64[0, 0] is nan",
    ),
    (
        '{"path": "paths/mlp", "inputs_b64": "AAAAAAAAAAAAAAAA", "shape": [1, 3]}',
        400,
        "expects [N, 1, 8, 8]",
    ),
]
BATCH_ABOVE_MAX = '{"path": "paths/mlp", "inputs": ' + json.dumps(_x(MAX_BATCH + 1)) + "}"


@pytest.mark.parametrize(("body", "status", "fragment"), BAD_PREDICTIONS)
def test_bad_predictions_are_4xx_with_a_message(asgi, body, status, fragment):
    got = asgi.post("/predict", content=body, headers={"content-type": "application/json"})
    assert got.status_code == status, got.text
    assert fragment in got.text, got.text


def test_oversized_requests_are_refused(asgi):
    got = asgi.post(
        "/predict", content=BATCH_ABOVE_MAX, headers={"content-type": "application/json"}
    )
    assert got.status_code == 400 and f"above the maximum of {MAX_BATCH}" in got.text
    huge = b'{"path": "paths/mlp", "inputs": [[' + b"0," * 600_000 + b"0]]}"  # 1.2 MB > 1 MB
    got = asgi.post("/predict", content=huge, headers={"content-type": "application/json"})
    assert got.status_code == 413 and "MODECONN_MAX_BODY_MB" in got.text

    def chunked():  # no Content-Length: the limit holds while reading
        yield huge[: len(huge) // 2]
        yield huge[len(huge) // 2 :]

    got = asgi.post("/predict", content=chunked(), headers={"content-type": "application/json"})
    assert got.status_code == 413


@pytest.mark.parametrize(
    ("content_type", "status", "fragment"),
    [
        ("text/plain", 415, "takes a JSON body"),
        ("application/vnd.bentoml+pickle", 415, "takes a JSON body"),
        ("multipart/form-data", 415, "takes a JSON body"),
    ],
)
def test_wrong_content_types_are_refused(asgi, content_type, status, fragment):
    got = asgi.post(
        "/predict", content=b'{"path": "paths/mlp"}', headers={"content-type": content_type}
    )
    assert got.status_code == status and fragment in got.text


def test_bad_batch_items_fail_before_batching(asgi):
    items = [{"path": "paths/mlp", "inputs": _x(1)}, {"path": "paths/mlp", "inputs": _x(1), "k": 9}]
    got = asgi.post("/predict_batch", json=items)
    assert got.status_code == 400 and "available ensemble sizes: [2, 3]" in got.text
    assert got.json()["detail"][0]["loc"] == ["root", 1]
    assert asgi.post("/predict_batch", json=[]).status_code == 400  # as /predict: not empty
    assert asgi.post("/predict_batch", json={"path": "paths/mlp"}).status_code == 400


def _upload(client, image: bytes | None, **fields):
    files = {"image": ("x.png", image, "image/png")} if image is not None else None
    data = {"path": "paths/mlp", **fields}
    if files is None:  # a multipart body without a file
        return client.post("/predict_image", files={"other": ("x", b"")}, data=data)
    return client.post("/predict_image", files=files, data=data)


def test_bad_uploads_are_4xx_with_a_message(asgi):
    png = _png(np.zeros((8, 8)))
    cases = [
        (_upload(asgi, b"not an image"), 400, "not a readable image"),
        (_upload(asgi, _png(np.full((32, 32), 200))[:60]), 400, "could not be decoded"),
        (_upload(asgi, None), 400, "Field required"),
        (_upload(asgi, png, path="nope"), 404, "unknown path"),
        (_upload(asgi, png, k="5"), 400, "available ensemble sizes"),
        (_upload(asgi, png, t="2", mode="merged"), 400, "less than or equal to 1"),
        (
            asgi.post("/predict_image", json={"path": "paths/mlp"}),
            415,
            "takes a multipart/form-data upload",
        ),
        (
            asgi.post(
                "/predict_image", content=b"--x", headers={"content-type": "multipart/form-data"}
            ),
            400,
            "without a boundary",
        ),
        (
            asgi.post(
                "/predict_image",
                content=b"garbage",
                headers={"content-type": "multipart/form-data; boundary=xyz"},
            ),
            400,
            "malformed multipart/form-data body",
        ),
    ]
    for got, status, fragment in cases:
        assert got.status_code == status and fragment in got.text, got.text


def test_bad_exports_are_4xx(asgi):
    assert asgi.post("/export", json={"path": "nope"}).status_code == 404
    got = asgi.post("/export", json={"path": "paths/cnn", "mode": "merged", "t": 0.25})
    assert got.status_code == 400 and "served t values: [0.5]" in got.text
    for params, fragment in (
        ({"path": "paths/mlp", "k": "two"}, "not a valid int"),
        ({"path": "paths/mlp", "mode": "merged", "t": "2"}, "must lie in [0, 1]"),
        ({"mode": "merged"}, "path is required"),
        ({"path": "paths/mlp", "mode": "best"}, "expected one of ensemble, merged"),
    ):
        got = asgi.get("/export", params=params)
        assert got.status_code == 400 and fragment in got.text, got.text


def test_client_errors_are_logged_in_one_line(asgi, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        asgi.post("/predict", content=b'{"path": "paths/mlp", "inputs": []}')
    records = [r for r in caplog.records if "client error 400" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO and not r.exc_info for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------------------
# One real `bentoml serve`, called over HTTP


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {
        "BENTOML_HOME": str(home),
        "MODECONN_ARTIFACTS": str(models_root),
        "MODECONN_MAX_BATCH": str(MAX_BATCH),
    }
    # One artifact also goes to the (temporary) BentoML model store, served by its tag.
    saved = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from modeconn.serving import save_to_store; "
            "print(save_to_store(sys.argv[1], 'modeconn-store-mlp'))",
            str(models_root / "paths" / "mlp"),
        ],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert saved.returncode == 0, saved.stderr
    env["MODECONN_MODELS"] = saved.stdout.strip().splitlines()[-1]
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with bentoml_server(env, log_file) as running:
        yield running


def _workers(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_real_server_answers_like_onnxruntime(server, models_root, digits):
    import bentoml
    import httpx

    x = digits.x_test[:7].numpy()
    ref = _reference(models_root, "paths/mlp", "ensemble_k3.onnx").run(x)
    with bentoml.SyncHTTPClient(server["url"]) as client:
        via_client = client.predict({"path": "paths/mlp", "inputs": x.tolist(), "k": 3})
        listed = client.paths({})
        with pytest.raises(bentoml.exceptions.NotFound, match="unknown path"):
            client.predict({"path": "nope", "inputs": x.tolist()})
    via_httpx = httpx.post(
        f"{server['url']}/predict", json={"path": "paths/mlp", "inputs": x.tolist(), "k": 3}
    ).json()
    for got in (via_client, via_httpx):
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.stack([got["entropy"], got["mutual_information"], got["disagreement"]], -1),
            ref["uncertainty"],
            atol=1e-6,
        )
        assert got["labels"] == ref["probabilities"].argmax(-1).tolist()
        assert got["provider"] == "CPUExecutionProvider"
    names = sorted(p["name"] for p in listed["paths"])
    assert names == ["modeconn-store-mlp", "paths/cnn", "paths/mlp"]
    stored = httpx.post(
        f"{server['url']}/predict",
        json={"path": "modeconn-store-mlp", "inputs": x.tolist(), "k": 3},
    ).json()
    assert stored["probabilities"] == via_httpx["probabilities"]
    # The worker never loaded torch.
    for pid in _workers(server["proc"].pid):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"worker {pid} mapped libtorch"


def test_real_server_answers_a_cascade(server, models_root, digits):
    import bentoml
    import httpx

    from modeconn.cascade import StopRule, run_cascade

    x = digits.x_test[:9].numpy()
    body = {"path": "paths/mlp", "inputs": x.tolist(), "mode": "cascade", "threshold": 0.9}
    via_httpx = httpx.post(f"{server['url']}/predict", json=body).json()
    with bentoml.SyncHTTPClient(server["url"]) as client:
        via_client = client.predict(body)
    files = ("merged_t0.5000.onnx", "merged_t0.0000.onnx", "merged_t1.0000.onnx")
    members = [_reference(models_root, "paths/mlp", f) for f in files]
    want = run_cascade(
        [lambda b, m=m: m.run(b)["probabilities"] for m in members], x, StopRule("confidence", 0.9)
    )
    for got in (via_httpx, via_client):
        assert got["members_used"] == want.members_used.tolist()
        np.testing.assert_allclose(got["probabilities"], want.probs, rtol=1e-5, atol=1e-6)


def test_real_server_refuses_bad_input_and_stays_ready(server):
    import httpx

    url = server["url"]
    with httpx.Client(base_url=url, timeout=30) as client:
        ErrorBodies(client.get("/docs.json").json()).install(client)
        for body, status, fragment in [*BAD_PREDICTIONS, (BATCH_ABOVE_MAX, 400, "maximum")]:
            got = client.post(
                "/predict", content=body, headers={"content-type": "application/json"}
            )
            assert got.status_code == status and fragment in got.text, (body[:80], got.text)
        assert _upload(client, b"GIF89a...").status_code == 400
        multipart = {"content-type": "multipart/form-data"}
        assert client.post("/predict_image", content=b"--x", headers=multipart).status_code == 400
        assert client.get("/readyz").status_code == 200
        assert client.get("/livez").status_code == 200
        metrics = client.get("/metrics").text
        assert 'bentoml_service_request_total{endpoint="/predict"' in metrics
        totals = {
            line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("bentoml_service_request_total{")
        }
        assert sum(v for k, v in totals.items() if 'http_response_code="400"' in k) > 30
        assert sum(v for k, v in totals.items() if 'http_response_code="500"' in k) == 0
    log = server["log"].read_text()
    assert "Traceback" not in log and "client error 400" in log


@pytest.mark.slow
def test_real_server_under_16_concurrent_clients(server, models_root):
    import httpx

    requests = []
    for i in range(16):
        path, body, file = (
            ("paths/mlp", {"k": 2}, "ensemble_k2.onnx"),
            ("paths/mlp", {"mode": "merged", "t": 0.0}, "merged_t0.0000.onnx"),
            ("paths/cnn", {"k": 2}, "ensemble_k2.onnx"),
            ("paths/cnn", {"mode": "merged"}, "merged_t0.5000.onnx"),
        )[i % 4]
        x = np.array(_x(1 + i % 3, seed=100 + i), dtype=np.float32)
        expected = _reference(models_root, path, file).run(x)["probabilities"]
        route = "/predict_batch" if i % 2 else "/predict"  # half of them adaptively batched
        payload = {"path": path, "inputs": x.tolist(), **body}
        requests.append((route, [payload] if route == "/predict_batch" else payload, expected))
    failures: list[str] = []

    def client(i: int) -> None:
        route, payload, expected = requests[i]
        with httpx.Client(base_url=server["url"], timeout=60) as http:
            for _ in range(50):
                got = http.post(route, json=payload)
                if got.status_code != 200:
                    failures.append(f"{i}: {got.status_code} {got.text[:200]}")
                    return
                answer = got.json()
                answer = answer[0] if route == "/predict_batch" else answer
                if not np.allclose(answer["probabilities"], expected, rtol=1e-5, atol=1e-6):
                    failures.append(f"{i}: wrong answer")
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:5]


def test_real_server_predicts_an_uploaded_png(server, models_root, digits):
    import bentoml
    import httpx

    x = digits.x_test[:6].numpy()
    reference = _reference(models_root, "paths/cnn", "ensemble_k2.onnx").run(x)["probabilities"]
    with bentoml.SyncHTTPClient(server["url"]) as client:
        for i in range(6):
            png = _png(np.round(_raw_digit(digits, i) / 16 * 255))
            file = Path(server["log"]).with_name(f"digit{i}.png")
            file.write_bytes(png)
            if i % 2:
                got = client.predict_image(image=file, path="paths/cnn", k=2)
            else:
                got = httpx.post(
                    f"{server['url']}/predict_image",
                    files={"image": (file.name, png, "image/png")},
                    data={"path": "paths/cnn", "k": "2"},
                ).json()
            assert got["labels"] == [int(reference[i].argmax())]
            np.testing.assert_allclose(got["probabilities"][0], reference[i], atol=0.05)
