"""``MODECONN_WORKERS=2``: a real ``bentoml serve`` with two worker processes, both of which
answer (their access-log lines name them), with the same answers as onnxruntime in process."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from modeconn.runtime import OnnxModel
from tests.bentoml_server import bentoml_server

#: BentoML's access-log lines name the worker: ``[entry_service:ModeConnService:2]``.
_WORKER = re.compile(r"\[entry_service:ModeConnService:(\d+)\].*path=/predict\b")


@pytest.mark.slow
def test_two_workers_both_answer_alike(models_root, digits, tmp_path):
    env = {
        "BENTOML_HOME": str(tmp_path / "bentoml_home"),
        "MODECONN_ARTIFACTS": str(models_root),
        "MODECONN_WORKERS": "2",
        "MODECONN_THREADS": "2",
    }
    x = digits.x_test[:8].numpy()
    serving = models_root / "paths" / "mlp" / "serving"
    want = OnnxModel((serving / "ensemble_k3.onnx").read_bytes()).run(x)["probabilities"]
    answers: list[np.ndarray] = []
    errors: list[str] = []
    with bentoml_server(env, tmp_path / "server.log", ready_s=120) as server:
        import httpx

        def client() -> None:
            for _ in range(6):
                # A new connection per request: each is handed to whichever worker accepts it.
                with httpx.Client(base_url=server["url"], timeout=60) as http:
                    got = http.post("/predict", json={"path": "paths/mlp", "inputs": x.tolist()})
                if got.status_code != 200:
                    errors.append(got.text)
                    continue
                answers.append(np.array(got.json()["probabilities"]))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log = server["log"].read_text()
    assert not errors, errors[:3]
    assert len(answers) == 48
    for got in answers:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    workers = {int(m) for m in _WORKER.findall(log)}
    assert workers == {1, 2}, f"answered by workers {workers}:\n{log[-3000:]}"
