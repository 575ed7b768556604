"""Benchmark ``"mode": "cascade"`` over HTTP against the fused K=8 ensemble, on trained paths.

For each case of :mod:`benchmarks.bench_cascade` (two endpoints trained on digits, B aligned
onto A, a Bezier path between them), the serving bundle holds the fused K=8 ensemble graph and
the cascade of the same 8 members, with the confidence threshold that
:func:`modeconn.cascade_eval.suggest_threshold` picks on the test split. One real
``bentoml serve`` answers both; one client sends the test images in turn, alternating the two
modes request by request, so that both see the same machine state. Reported: p50/p99 latency
per request at batch 1 and batch 64, the cascade's mean members per input, and the same two
modes called in process on onnxruntime (the HTTP-free cost).

Expect the cascade to win where a member's compute outweighs onnxruntime's per-call cost
(ResNet-20), and to lose at batch 1 on a tiny MLP, whose 8 members fused cost about one call.

    python -m benchmarks.bench_cascade_http [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cascade import CASES, K, cases_cli, prepare  # noqa: E402
from benchmarks.bench_service import SERVER_ENV, _percentiles  # noqa: E402
from benchmarks.server import Server  # noqa: E402

BATCHES = (1, 64)


def _threshold(artifact: Path, data, device: str) -> float:
    """The cheapest threshold within 0.1 point of the full ensemble (the whole test split)."""
    from modeconn.cascade import StopRule
    from modeconn.cascade_eval import cascade_member_probs, suggest_threshold

    _, probs = cascade_member_probs(artifact, data, K, device=device)
    pick = suggest_threshold(probs, data.y_test.numpy(), "confidence", seed=0)
    return pick.threshold if pick is not None else StopRule().threshold


def _requests(x: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``batch`` test inputs, taken in turn (wrapping around)."""
    starts = [(i * batch) % len(x) for i in range(count)]
    return [np.take(x, range(s, s + batch), axis=0, mode="wrap") for s in starts]


def _http(url: str, name: str, batches: list[np.ndarray]) -> dict:
    import base64

    import httpx

    times: dict[str, list[float]] = {"ensemble": [], "cascade": []}
    used: list[int] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, x in enumerate(batches):
            b64 = base64.b64encode(x.astype("<f4").tobytes()).decode()
            for mode in ("ensemble", "cascade") if i % 2 == 0 else ("cascade", "ensemble"):
                body = {"path": name, "inputs_b64": b64, "shape": list(x.shape), "mode": mode}
                if mode == "ensemble":
                    body["k"] = K
                begin = time.perf_counter()
                response = client.post("/predict", json=body)
                elapsed = time.perf_counter() - begin
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
                if i >= 3:  # the first requests warm up
                    times[mode].append(elapsed)
                    if mode == "cascade":
                        used += response.json()["members_used"]
    out: dict = {}
    for mode, seconds in times.items():
        p50, p99 = _percentiles(seconds)
        out[f"{mode} p50 ms"], out[f"{mode} p99 ms"] = round(p50, 3), round(p99, 3)
    out["cascade / ensemble p50"] = round(out["cascade p50 ms"] / out["ensemble p50 ms"], 3)
    out["cascade members per input"] = round(float(np.mean(used)), 3)
    return out


def _in_process(artifact: Path, batches: list[np.ndarray]) -> dict:
    """The same two modes without HTTP: the fused graph's session vs the cascade's sessions."""
    from modeconn.cascade import StopRule, run_cascade
    from modeconn.formats import read_index
    from modeconn.runtime import OnnxModel

    index = read_index(artifact)
    assert index.cascade is not None
    serving = artifact / "serving"
    fused = OnnxModel((serving / index.ensembles[K].file).read_bytes(), device="cpu")
    members = [
        OnnxModel((serving / index.merged[t].file).read_bytes(), device="cpu")
        for t in index.cascade.ts
    ]
    runs = [lambda b, m=m: m.run(b)["probabilities"] for m in members]
    rule = StopRule(index.cascade.rule, index.cascade.threshold)
    times: dict[str, list[float]] = {"ensemble": [], "cascade": []}
    for x in batches:
        for mode in ("ensemble", "cascade"):
            begin = time.perf_counter()
            fused.run(x) if mode == "ensemble" else run_cascade(runs, x, rule)
            times[mode].append(time.perf_counter() - begin)
    p50 = {mode: _percentiles(seconds[3:])[0] for mode, seconds in times.items()}
    return {
        "in-process ensemble p50 ms": round(p50["ensemble"], 3),
        "in-process cascade p50 ms": round(p50["cascade"], 3),
        "in-process cascade / ensemble p50": round(p50["cascade"] / p50["ensemble"], 3),
    }


def run(quick: bool = False, device: str = "cpu", cases: Sequence[str] | None = None) -> dict:
    """HTTP latency of the cascade against the fused K=8 ensemble (see the module doc)."""
    from modeconn.serving import build_serving

    if cases is None:
        cases = ("mlp16_digits",) if quick else tuple(CASES)
    count = 40 if quick else 200
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="modeconn-bench-cascade-http-") as tmp:
        root = Path(tmp)
        models = root / "models"
        prepared = {}
        for name in cases:
            artifact, data, _ = prepare(name, models, device, quick)
            threshold = _threshold(artifact, data, device)
            build_serving(artifact, ks=(K,), ts=(), cascade=K, threshold=threshold)
            prepared[name] = (artifact, data, threshold)
        server = Server(models, root / "bentoml_home", root / "server.log", SERVER_ENV)
        try:
            server.wait_ready()
            for name, (artifact, data, threshold) in prepared.items():
                x = data.x_test.numpy().astype(np.float32)
                for batch in BATCHES:
                    batches = _requests(x, batch, count if batch == 1 else count // 4)
                    row = {"threshold": threshold}
                    row.update(_http(server.url, artifact.name, batches))
                    row.update(_in_process(artifact, batches))
                    results[f"{name} batch {batch}"] = row
        finally:
            server.stop()
    return {
        "k": K,
        "note": "one client, modes alternated request by request; latencies per request",
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    cases_cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
