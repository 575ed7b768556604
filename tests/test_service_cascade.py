"""Mode ``cascade`` over HTTP (in process): the answer is the cascade of the bundle's merged
graphs run with onnxruntime, input by input; its stop rule can be the bundle's or the
request's; a batch of mixed requests keeps each answer; bad cascade requests are 4xx."""

from __future__ import annotations

import numpy as np
import pytest

from modeconn.cascade import StopRule, run_cascade
from modeconn.formats import read_index
from modeconn.runtime import OnnxModel

PATH = "paths/mlp"  # conftest: a cascade of 3 members (t = 0.5, 0, 1), confidence 0.95


@pytest.fixture(scope="module")
def members(models_root):
    """The cascade's member graphs, in the order they run, opened here with onnxruntime."""
    index = read_index(models_root / PATH)
    assert index.cascade is not None
    serving = models_root / PATH / "serving"
    return [
        OnnxModel((serving / index.merged[t].file).read_bytes(), device="cpu")
        for t in index.cascade.ts
    ]


@pytest.fixture(scope="module")
def x(digits) -> np.ndarray:
    return digits.x_test[:40].numpy()


def _expected(members, x: np.ndarray, rule: StopRule, k: int | None = None):
    runs = [lambda batch, m=m: m.run(batch)["probabilities"] for m in members[:k]]
    return run_cascade(runs, x, rule)


def _post(asgi, x: np.ndarray, **body) -> dict:
    got = asgi.post(
        "/predict", json={"path": PATH, "inputs": x.tolist(), "mode": "cascade", **body}
    )
    assert got.status_code == 200, got.text
    return got.json()


def _assert_answer(got: dict, want) -> None:
    np.testing.assert_allclose(got["probabilities"], want.probs, rtol=1e-5, atol=1e-6)
    assert got["members_used"] == want.members_used.tolist()
    assert got["labels"] == want.labels.tolist()
    for name in ("entropy", "mutual_information", "disagreement"):
        np.testing.assert_allclose(got[name], getattr(want, name), atol=1e-5, err_msg=name)


def test_cascade_answers_as_its_member_graphs_run_one_at_a_time(asgi, members, x):
    # A threshold at the first member's median confidence: some inputs leave at once.
    threshold = float(np.median(members[0].run(x)["probabilities"].max(-1)))
    got = _post(asgi, x, threshold=threshold)
    want = _expected(members, x, StopRule("confidence", threshold))
    _assert_answer(got, want)
    assert got["mode"] == "cascade" and got["k"] == 3 and got["ts"] == [0.5, 0.0, 1.0]
    assert got["stop_rule"] == f"confidence >= {threshold:g}"
    used = np.array(got["members_used"])
    assert (used == 1).any() and (used > 1).any()  # easy inputs left early, hard ones did not


def test_bundle_rule_by_default_and_the_extremes_equal_one_model_and_the_ensemble(
    asgi, members, x, models_root
):
    _assert_answer(_post(asgi, x), _expected(members, x, StopRule()))  # confidence 0.95
    first = _post(asgi, x, threshold=0.0)  # every input leaves after the first member
    assert set(first["members_used"]) == {1}
    np.testing.assert_allclose(
        first["probabilities"], members[0].run(x)["probabilities"], rtol=1e-5, atol=1e-6
    )
    assert first["mutual_information"] == [0.0] * len(x)
    whole = _post(asgi, x, rule="agree", threshold=3)  # runs all 3 unless they disagree early
    _assert_answer(whole, _expected(members, x, StopRule("agree", 3)))
    never = _post(asgi, x, threshold=1.0, k=3)
    ensemble = OnnxModel((models_root / PATH / "serving/ensemble_k3.onnx").read_bytes())
    ref = ensemble.run(x)
    done = np.array(never["members_used"]) == 3  # (a member certain to float precision stops)
    np.testing.assert_allclose(
        np.array(never["probabilities"])[done], ref["probabilities"][done], atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(never["disagreement"])[done], ref["uncertainty"][done, 2], atol=1e-6
    )


def test_k_limits_the_members(asgi, members, x):
    got = _post(asgi, x, k=2, threshold=1.0)
    assert got["k"] == 2 and got["ts"] == [0.5, 0.0] and max(got["members_used"]) <= 2
    _assert_answer(got, _expected(members, x, StopRule("confidence", 1.0), k=2))


def test_batch_of_mixed_requests_keeps_each_answer(asgi, x):
    bodies = [
        {"path": PATH, "inputs": x[:5].tolist(), "mode": "cascade", "threshold": 0.9},
        {"path": PATH, "inputs": x[5:7].tolist(), "k": 2},
        {"path": PATH, "inputs": x[7:12].tolist(), "mode": "cascade", "threshold": 0.9},
        {"path": PATH, "inputs": x[12:15].tolist(), "mode": "cascade"},
    ]
    batch = asgi.post("/predict_batch", json=bodies)
    assert batch.status_code == 200, batch.text
    for body, got in zip(bodies, batch.json(), strict=True):
        alone = asgi.post("/predict", json=body).json()
        assert got.get("members_used") == alone.get("members_used")
        np.testing.assert_allclose(got["probabilities"], alone["probabilities"], atol=1e-6)
    assert "members_used" not in batch.json()[1]  # only cascades carry it


def test_image_upload_as_a_cascade(asgi, digits):
    import io

    from PIL import Image

    raw = digits.x_test[0, 0].numpy()
    pixels = (raw - raw.min()) / (raw.max() - raw.min()) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    got = asgi.post(
        "/predict_image",
        files={"image": ("digit.png", buffer.getvalue(), "image/png")},
        data={"path": PATH, "mode": "cascade"},
    )
    assert got.status_code == 200, got.text
    assert got.json()["mode"] == "cascade" and len(got.json()["members_used"]) == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"path": "paths/cnn"}, "has no cascade built"),
        ({"t": 0.5}, "a cascade's members are fixed"),
        ({"k": 4}, "has 3 members; k is how many it may run at most, 1 to 3"),
        ({"rule": "agree"}, "needs its own threshold"),
        ({"rule": "agree", "threshold": 1.5}, "integer >= 2"),
        ({"threshold": 1.5}, "probability in [0, 1]"),
        ({"rule": "vote", "threshold": 2}, "rule: Input should be 'confidence' or 'agree'"),
        ({"mode": "ensemble", "threshold": 0.9}, "stop rule of mode 'cascade'"),
    ],
)
def test_bad_cascade_requests_are_400_with_a_message(asgi, body, fragment):
    request = {"path": PATH, "inputs": [[0.0] * 64], "mode": "cascade", **body}
    got = asgi.post("/predict", json=request)
    assert got.status_code == 400 and fragment in got.json()["error"], got.text


def test_a_cascade_is_not_one_graph_to_export(asgi):
    got = asgi.get("/export", params={"path": PATH, "mode": "cascade"})
    assert got.status_code == 400
    assert "download each with mode 'merged' and t in [0.5, 0, 1]" in got.json()["error"]
