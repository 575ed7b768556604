"""Soak run of the HTTP service: many clients for minutes, some of them misbehaving.

Starts ``bentoml serve`` on the demo's artifacts (built first when missing), then runs
``--clients`` threads for ``--minutes``; each request is a valid prediction (an ensemble or a
merged model of a served path, batch 1 to 32) except one in ``--bad-every``, which is one of a
set of bad requests (malformed JSON, unknown path, wrong shape, empty or oversized batch, bad
base64, unknown mode, a t that is not served, a huge path name). It records throughput, latency
percentiles of the valid requests, every status code, anything unexpected (a valid request that
did not get 200, a bad one that did not get 4xx, any 5xx or connection error), and the resident
memory of the server's processes at the start and at the end. Writes ``benchmarks/SOAK.md``.

    python -m benchmarks.soak [--minutes 10] [--clients 16] [--artifacts artifacts]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (MiB)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


def _bad_requests(paths: list[dict]) -> list[tuple[str, str, bytes, dict]]:
    """(name, route, body, headers) of requests the service must refuse with a 4xx."""
    info = paths[0]
    shape = info["input_shape"]
    good = {"path": info["name"], "inputs": [[0.0] * _size(shape)]}
    js = {"content-type": "application/json"}

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("malformed JSON", "/predict", b'{"path": "x", "inputs": [[1, 2', js),
        ("malformed JSON batch", "/predict_batch", b"[{]", js),
        ("unknown path", "/predict", body({**good, "path": "no/such/path"}), js),
        ("huge path name", "/predict", body({**good, "path": "p" * 200_000}), js),
        ("wrong shape", "/predict", body({**good, "inputs": [[0.0] * 3]}), js),
        ("empty inputs", "/predict", body({**good, "inputs": []}), js),
        ("unknown mode", "/predict", body({**good, "mode": "bagging"}), js),
        ("t not served", "/predict", body({**good, "mode": "merged", "t": 0.123456}), js),
        ("bad k", "/predict", body({**good, "k": 10_000}), js),
        ("not a number", "/predict", body({**good, "inputs": [["x"] * _size(shape)]}), js),
        ("empty batch", "/predict_batch", body({"requests": []}), js),
        ("wrong content type", "/predict", body(good), {"content-type": "text/plain"}),
    ]


def _size(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.requests = 0

    def record(self, kind: str, status: int | str, seconds: float, ok: bool) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[f"{kind} {status}"] += 1
            if kind == "good" and ok:
                self.latencies.append(seconds)
            if not ok:
                self.unexpected[f"{kind} -> {status}"] += 1


def _client(url: str, paths: list[dict], bad: list, bad_every: int, stop: float, seed: int,
            stats: _Stats) -> None:  # fmt: skip
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        count = 0
        while time.monotonic() < stop:
            count += 1
            began = time.perf_counter()
            if count % bad_every == 0:
                name, route, body, headers = rng.choice(bad)
                try:
                    status = http.post(route, content=body, headers=headers).status_code
                    ok = 400 <= status < 500
                except httpx.HTTPError as err:
                    status, ok = type(err).__name__, False
                stats.record(f"bad ({name})", status, time.perf_counter() - began, ok)
                continue
            info = rng.choice(paths)
            n = rng.choice([1, 1, 1, 4, 32])
            request: dict = {
                "path": info["name"],
                "inputs": [[rng.random() for _ in range(_size(info["input_shape"]))] for _ in range(n)],
            }  # fmt: skip
            if info["served_ts"] and rng.random() < 0.3:
                request.update(mode="merged", t=rng.choice(info["served_ts"]))
            try:
                status = http.post("/predict", json=request).status_code
                ok = status == 200
            except httpx.HTTPError as err:
                status, ok = type(err).__name__, False
            stats.record("good", status, time.perf_counter() - began, ok)


def soak(minutes: float, clients: int, artifacts: Path, bad_every: int) -> dict:
    import httpx

    if not any(artifacts.glob("**/serving/index.json")):
        print(f"building the demo's artifacts in {artifacts} ...", flush=True)
        subprocess.run([sys.executable, "-m", "modeconn.demo", "--out", str(artifacts),
                        "--if-missing", "--quiet"], cwd=REPO, check=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "modeconn", "--quiet", "serve-build",
                        str(artifacts)], cwd=REPO, check=True)  # fmt: skip
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(tempfile.gettempdir()) / "modeconn-soak-server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("bentoml")), "serve", "service.service:ModeConnService",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True",
             "MODECONN_ARTIFACTS": str(artifacts.resolve())},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"bentoml serve exited: see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after 120 s: see {log.name}")
            time.sleep(0.5)
        paths = httpx.get(f"{url}/paths", timeout=10).json()["paths"]
        bad = _bad_requests(paths)
        for _ in range(20):  # warm every graph a little before measuring memory
            for info in paths:
                httpx.post(f"{url}/predict", json={"path": info["name"],
                           "inputs": [[0.0] * _size(info["input_shape"])]}, timeout=60)  # fmt: skip
        rss_start = _rss_mib(server.pid)
        stats = _Stats()
        stop = time.monotonic() + 60 * minutes
        threads = [
            threading.Thread(target=_client, args=(url, paths, bad, bad_every, stop, i, stats))
            for i in range(clients)
        ]
        began = time.perf_counter()
        for t in threads:
            t.start()
        rss_samples = []  # (minute, MiB): a plateau or a leak shows here
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            if not rss_samples or time.perf_counter() - began >= 60 * (rss_samples[-1][0] + 1):
                rss_samples.append(
                    (round((time.perf_counter() - began) / 60), round(_rss_mib(server.pid), 1))
                )
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        rss_end = _rss_mib(server.pid)
        ready = httpx.get(f"{url}/readyz", timeout=5).status_code
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        log.close()
    lat = sorted(stats.latencies)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {
        "minutes": minutes,
        "clients": clients,
        "bad_every": bad_every,
        "paths": len(paths),
        "requests": stats.requests,
        "throughput_rps": round(stats.requests / elapsed, 1),
        "valid_p50_ms": round(pct(0.50), 2),
        "valid_p99_ms": round(pct(0.99), 2),
        "valid_mean_ms": round(1000 * statistics.fmean(lat), 2) if lat else None,
        "statuses": dict(sorted(stats.statuses.items())),
        "unexpected": {k: v for k, v in stats.unexpected.items() if v},
        "server_rss_mib_start": round(rss_start, 1),
        "server_rss_mib_end": round(rss_end, 1),
        "server_rss_mib_each_minute": rss_samples,
        "ready_after": ready,
    }


def _write(result: dict, out: Path) -> None:
    lines = [
        "# Soak run of the HTTP service",
        "",
        f"Written by `python -m benchmarks.soak --minutes {result['minutes']:g} --clients "
        f"{result['clients']}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, on this "
        f"project's 2-core CPU machine: {result['clients']} clients, one request in "
        f"{result['bad_every']} a bad one, the demo's {result['paths']} served paths.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in ("requests", "throughput_rps", "valid_p50_ms", "valid_p99_ms", "valid_mean_ms",
                "server_rss_mib_start", "server_rss_mib_end", "ready_after"):  # fmt: skip
        lines.append(f"| {key} | {result[key]} |")
    lines.append(f"| server_rss_mib_each_minute | {result['server_rss_mib_each_minute']} |")
    lines += ["", "Status codes:", ""]
    lines += [f"- {k}: {v}" for k, v in result["statuses"].items()]
    unexpected = result["unexpected"]
    lines += [
        "",
        f"Unexpected answers (5xx, errors, valid requests refused): {unexpected or 'none'}",
    ]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bad-every", type=int, default=10, help="one bad request in N")
    parser.add_argument("--artifacts", default=str(REPO / "artifacts"))
    parser.add_argument("--out", default=str(HERE / "SOAK.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    result = soak(args.minutes, args.clients, Path(args.artifacts), args.bad_every)
    print(json.dumps(result, indent=1))
    if not args.no_write:
        _write(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0 if not result["unexpected"] and result["ready_after"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
