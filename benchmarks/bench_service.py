"""Benchmark the HTTP service against the same onnxruntime graph called in process.

For each case a K-member ensemble graph is built (``modeconn.serving.build_serving``) and served
by a real ``bentoml serve`` subprocess; the same graph file is opened in this process with
:class:`modeconn.runtime.OnnxModel` under the same thread settings. Measured side by side:

* latency p50/p99 of ``POST /predict`` with one client (batch 1 and 64) vs ``session.run``;
  the p50 difference is the HTTP overhead (target at batch 1: <= 5 ms);
* throughput with 16 concurrent clients (threads, httpx) vs 16 threads calling the session
  (target: HTTP >= 50 % of in process), and the same through ``/predict_batch``, BentoML's
  adaptive batching;
* memory: the worker's RSS (``/proc``) serving a K-member ensemble vs a worker serving nothing
  plus K times one member's weights (target <= 1.2).

Cases: ``digits_mlp`` (a 64-32-32-10 MLP, overhead-dominated: microseconds of compute) and
``cifar_cnn`` (a VGG-style CNN 32-64-128 on 3x32x32 inputs, 10 M multiply-adds per member). Weights
are random: cost depends on shapes, not on training. Clients run on the same machine as the
server, so on few cores they compete with it for CPU.

    python -m benchmarks.bench_service [--quick]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.server import Server  # noqa: E402

CLIENTS = 16
SERVER_THREADS = 4  # concurrent requests per worker (MODECONN_THREADS)
ORT_THREADS = 1  # threads per onnxruntime operator, in the server and in process alike

# name -> (model, input shape, kwargs, K)
CASES = {
    "digits_mlp": ("mlp", (1, 8, 8), {"width": 32, "depth": 2}, 4),
    "cifar_cnn": ("cnn", (3, 32, 32), {"channels": [32, 64, 128], "norm": "none"}, 4),
}


# ---------------------------------------------------------------------------------------------
# Artifacts with one ensemble graph each


def _artifact(root: Path, name: str, model_name: str, shape, kwargs: dict, k: int) -> Path:
    import torch

    from modeconn.checkpoint import load_checkpoint, save_checkpoint
    from modeconn.data import Dataset
    from modeconn.models import create_model
    from modeconn.pipeline import fit_artifact
    from modeconn.serving import build_serving

    gen = torch.Generator().manual_seed(0)
    data = Dataset(
        name="random",
        x_train=torch.randn(64, *shape, generator=gen),
        y_train=torch.randint(0, 10, (64,), generator=gen),
        x_test=torch.randn(16, *shape, generator=gen),
        y_test=torch.randint(0, 10, (16,), generator=gen),
        num_classes=10,
    )
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(model_name, shape, 10, **kwargs)
        files.append(root / f"{name}_{seed}.safetensors")
        save_checkpoint(files[-1], model, data="random", seed=seed)
    a, b = (load_checkpoint(f) for f in files)
    out = root / "models" / name
    fit_artifact(a, b, data, "linear", out=out, eval_points=0, served_ts=[])
    build_serving(out, ks=(k,), ts=(), cascade=0, max_ensemble_mb=4096)
    return out


def _member_bytes(model_name: str, shape, kwargs: dict) -> int:
    from modeconn.models import create_model

    model = create_model(model_name, shape, 10, **kwargs)
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


# ---------------------------------------------------------------------------------------------
# A real server


#: The server's settings in every case (see benchmarks/server.py for the rest).
SERVER_ENV = {
    "MODECONN_THREADS": str(SERVER_THREADS),
    "MODECONN_ORT_THREADS": str(ORT_THREADS),
    "MODECONN_MAX_BATCH": "4096",
    "MODECONN_DEVICE": "cpu",
}


def _server(models: Path, home: Path, log: Path) -> Server:
    return Server(models, home, log, SERVER_ENV)


def _memory_mb(pid: int) -> dict:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


# ---------------------------------------------------------------------------------------------
# Measurements


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _sequential(call, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return times


def _concurrent(make_call, clients: int, per_client: int) -> tuple[float, list[float], int]:
    """``clients`` threads making ``per_client`` calls each: wall time, the latencies of the
    calls that succeeded, and how many failed (a 503 is BentoML shedding load)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    barrier = threading.Barrier(clients + 1, timeout=600)

    def worker(i: int) -> None:
        call = make_call()
        with contextlib.suppress(Exception):
            call()  # warm-up (connection, first run)
        barrier.wait()
        for _ in range(per_client):
            begin = time.perf_counter()
            try:
                call()
            except Exception:
                failures[i] += 1
                continue
            latencies[i].append(time.perf_counter() - begin)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    return wall, [t for per in latencies for t in per], sum(failures)


def _http_call(url: str, route: str, payload: bytes):
    import httpx

    def make():
        client = httpx.Client(base_url=url, timeout=120)

        def call():
            response = client.post(
                route, content=payload, headers={"content-type": "application/json"}
            )
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
            return response

        return call

    return make


def _bench_case(url: str, model_file: Path, name: str, shape, quick: bool) -> dict:
    from modeconn.runtime import OnnxModel

    model = OnnxModel(model_file, device="cpu", intra_op_threads=ORT_THREADS)
    session, input_name = model.session, model.input_name
    rng = np.random.default_rng(0)
    heavy = name == "cifar_cnn"
    results = {}
    for batch in (1, 64):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        payload = json.dumps({"path": name, "inputs": x.tolist()}).encode()
        batched = json.dumps([{"path": name, "inputs": x.tolist()}]).encode()
        b64 = base64.b64encode(x.astype("<f4").tobytes()).decode()
        binary = json.dumps({"path": name, "inputs_b64": b64, "shape": list(x.shape)}).encode()
        # Fewer calls where each one is long (the CNN at batch 64), fewer still when quick.
        cost = (4 if heavy else 1) * (4 if batch == 64 else 1)
        repeats = max(10, (40 if quick else 300) // cost)
        per_client = max(3, (6 if quick else 60) // cost)

        local = _sequential(lambda x=x: session.run(None, {input_name: x}), repeats, 3)
        http = _sequential(_http_call(url, "/predict", payload)(), repeats, 3)
        make_local = lambda x=x: lambda: session.run(None, {input_name: x})  # noqa: E731
        local_calls = per_client * (1 if heavy else 4)
        local_wall, _, _ = _concurrent(make_local, CLIENTS, local_calls)
        http_wall, http_lat, http_failed = _concurrent(
            _http_call(url, "/predict", payload), CLIENTS, per_client
        )
        batch_wall, batch_lat, batch_failed = _concurrent(
            _http_call(url, "/predict_batch", batched), CLIENTS, per_client
        )
        b64_http = _sequential(_http_call(url, "/predict", binary)(), repeats, 3)
        b64_wall, _, b64_failed = _concurrent(
            _http_call(url, "/predict", binary), CLIENTS, per_client
        )
        if http_failed or b64_failed:
            raise RuntimeError(f"{http_failed} /predict calls failed under {CLIENTS} clients")
        local_p50, local_p99 = _percentiles(local)
        http_p50, http_p99 = _percentiles(http)
        local_thr = CLIENTS * local_calls * batch / local_wall
        http_thr = CLIENTS * per_client * batch / http_wall
        batch_thr = (CLIENTS * per_client - batch_failed) * batch / batch_wall
        results[f"batch{batch}"] = {
            "inproc_p50_ms": local_p50,
            "inproc_p99_ms": local_p99,
            "http_p50_ms": http_p50,
            "http_p99_ms": http_p99,
            "overhead_p50_ms": http_p50 - local_p50,
            "inproc_16_inputs_per_s": local_thr,
            "http_16_inputs_per_s": http_thr,
            "http_16_p50_ms": _percentiles(http_lat)[0],
            "http_16_p99_ms": _percentiles(http_lat)[1],
            "throughput_ratio_16": http_thr / local_thr,
            "batched_16_inputs_per_s": batch_thr,
            "batched_16_p50_ms": _percentiles(batch_lat)[0] if batch_lat else None,
            "batched_16_failed": batch_failed,
            "batched_ratio_16": batch_thr / local_thr,
            "json_body_kb": len(payload) / 1024,
            "b64_http_p50_ms": _percentiles(b64_http)[0],
            "b64_overhead_p50_ms": _percentiles(b64_http)[0] - local_p50,
            "b64_16_inputs_per_s": CLIENTS * per_client * batch / b64_wall,
            "b64_ratio_16": CLIENTS * per_client * batch / b64_wall / local_thr,
            "b64_body_kb": len(binary) / 1024,
        }
    return results


def _memory(root: Path, home: Path, quick: bool) -> dict:
    """Worker RSS with a K-member ensemble vs a worker serving a tiny path (the baseline: a
    server with nothing to serve stops) plus K members' weights."""
    model_name, shape, k = "mlp", (1, 8, 8), 4 if quick else 5
    kwargs = {"width": 1024 if quick else 2048, "depth": 2}
    _artifact(root / "memory", "wide_mlp", model_name, shape, kwargs, k)
    _artifact(root / "tiny", "tiny", model_name, shape, {"width": 4, "depth": 1}, 2)
    servers = {
        "baseline": _server(root / "tiny" / "models", home, root / "baseline.log"),
        "ensemble": _server(root / "memory" / "models", home, root / "ensemble.log"),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        import httpx

        # One prediction, so that the ensemble worker has run its graph at least once.
        x = np.zeros((64, *shape), dtype=np.float32).tolist()
        response = httpx.post(
            f"{servers['ensemble'].url}/predict", json={"path": "wide_mlp", "inputs": x}, timeout=60
        )
        response.raise_for_status()
        httpx.post(f"{servers['baseline'].url}/paths", json={}, timeout=60).raise_for_status()
        usage = {
            name: max((_memory_mb(pid) for pid in s.worker_pids()), key=lambda m: m["VmRSS"])
            for name, s in servers.items()
        }
    finally:
        for server in servers.values():
            server.stop()
    member_mb = _member_bytes(model_name, shape, kwargs) / 2**20
    expected = usage["baseline"]["VmRSS"] + k * member_mb
    return {
        "model": f"mlp 64-{kwargs['width']}-{kwargs['width']}-10",
        "k": k,
        "member_mb": member_mb,
        "baseline_rss_mb": usage["baseline"]["VmRSS"],
        "ensemble_rss_mb": usage["ensemble"]["VmRSS"],
        "ensemble_peak_mb": usage["ensemble"]["VmHWM"],
        "ratio": usage["ensemble"]["VmRSS"] / expected,
        "peak_ratio": usage["ensemble"]["VmHWM"] / (usage["baseline"]["VmHWM"] + k * member_mb),
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Measure /predict over HTTP against the in-process onnxruntime session, and memory."""
    import logging

    logging.getLogger("modeconn").setLevel(logging.WARNING)
    cases = {"digits_mlp": CASES["digits_mlp"]} if quick else CASES
    results: dict = {
        "device": "cpu" if device == "cpu" else f"{device} requested; the benchmark serves on cpu",
        "clients": CLIENTS,
        "server": {"workers": 1, "threads": SERVER_THREADS, "ort_threads": ORT_THREADS},
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_service_") as tmp:
        root = Path(tmp)
        home = root / "bentoml_home"
        home.mkdir()
        for name, (model_name, shape, kwargs, k) in cases.items():
            _artifact(root, name, model_name, shape, kwargs, k)
        server = _server(root / "models", home, root / "server.log")
        try:
            results["startup_s"] = server.wait_ready()
            for name, (_, shape, _, k) in cases.items():
                file = root / "models" / name / "serving" / f"ensemble_k{k}.onnx"
                results[f"{name}_k{k}"] = _bench_case(server.url, file, name, shape, quick)
        finally:
            server.stop()
        log = (root / "server.log").read_text()
        results["server_errors_logged"] = log.count("Traceback")
        results["memory"] = _memory(root, home, quick)
    mlp = results["digits_mlp_k4"]
    results["summary"] = {
        "overhead_p50_ms_batch1": mlp["batch1"]["overhead_p50_ms"],
        "throughput_ratio_16_batch1": mlp["batch1"]["throughput_ratio_16"],
        "throughput_ratio_16_batch64": mlp["batch64"]["throughput_ratio_16"],
        "memory_ratio": results["memory"]["ratio"],
    }
    if "cifar_cnn_k4" in results:
        cnn = results["cifar_cnn_k4"]
        results["summary"]["cnn_overhead_p50_ms_batch1"] = cnn["batch1"]["overhead_p50_ms"]
        results["summary"]["cnn_throughput_ratio_16_batch1"] = cnn["batch1"]["throughput_ratio_16"]
        results["summary"]["cnn_throughput_ratio_16_batch64"] = cnn["batch64"][
            "throughput_ratio_16"
        ]
        results["summary"]["cnn_b64_throughput_ratio_16_batch64"] = cnn["batch64"]["b64_ratio_16"]
    results["notes"] = [
        "ratios compare HTTP with the same ONNX graph run in this process, same thread settings",
        "client threads share the machine's cores with the server",
    ]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, few requests")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    print(
        f"server ready in {results['startup_s']:.1f} s; {CLIENTS} clients; {results['cores']} cores"
    )
    header = (
        f"{'case':<22} {'local p50':>9} {'http p50':>9} {'http p99':>9} {'overhead':>9} "
        f"{'local 16/s':>11} {'http 16/s':>10} {'ratio':>6} {'batched/s':>10} "
        f"{'b64 p50':>8} {'b64 16/s':>9} {'ratio':>6}"
    )
    print(header)
    for case in (c for c in results if c.endswith("_k4")):
        for batch, r in results[case].items():
            print(
                f"{case + ' ' + batch:<22} {r['inproc_p50_ms']:>8.2f}ms {r['http_p50_ms']:>7.2f}ms "
                f"{r['http_p99_ms']:>7.2f}ms {r['overhead_p50_ms']:>7.2f}ms "
                f"{r['inproc_16_inputs_per_s']:>11.0f} {r['http_16_inputs_per_s']:>10.0f} "
                f"{r['throughput_ratio_16']:>6.3f} {r['batched_16_inputs_per_s']:>10.0f} "
                f"{r['b64_http_p50_ms']:>6.2f}ms {r['b64_16_inputs_per_s']:>9.0f} "
                f"{r['b64_ratio_16']:>6.3f}"
            )
    m = results["memory"]
    print(
        f"memory ({m['model']}, K={m['k']}, {m['member_mb']:.1f} MB/member): worker "
        f"{m['ensemble_rss_mb']:.0f} MB (peak {m['ensemble_peak_mb']:.0f}) vs empty worker "
        f"{m['baseline_rss_mb']:.0f} MB + K members -> ratio {m['ratio']:.3f} "
        f"(peak {m['peak_ratio']:.3f})"
    )


if __name__ == "__main__":
    main()
