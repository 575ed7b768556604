"""Check one machine end to end through the command line: train, connect, export, serve.

In a temporary folder, every step a subprocess of the real CLI:

1. ``modeconn train``: two digits MLPs (seeds 0 and 1) on ``--device``;
2. ``modeconn connect --method bezier``: in one process, then under ``torch.distributed.run``
   with two processes (on CUDA: ``min(2, GPUs)``, and skipped with one GPU, since nccl needs a
   GPU per rank). Recorded: wall time and time per step of each (from the manifest's fit stats)
   and the largest ``|difference|`` between the two paths' nodes, which data parallelism with
   summed gradients keeps at float rounding for a model without BatchNorm;
3. ``modeconn export``: the merged midpoint and the K=4 ensemble, then ``modeconn serve-build``;
4. ``bentoml serve service.service:ModeConnService`` on a free loopback port: one ``/predict``
   with K=4 (its ``provider`` must be ``CUDAExecutionProvider`` on a GPU, ``CPUExecutionProvider``
   on CPU), then the p50 latency of 50 more.

A failed step is recorded with the tail of its stderr and the steps that do not need it still
run. The JSON report holds the machine (GPU or CPU model, torch and onnxruntime versions,
onnxruntime's providers), every step's seconds and the figures above. On a GPU machine, from the
repository root, in one command:

    python -m benchmarks.device_check --device cuda --out device_check.json

(default ``--device cpu``, about a minute on two cores). Exit status 0 when every step
passed. A check to run by hand on a machine at hand: CI never depends on a GPU, and runs only
the CPU version of it (``tests/test_device_check.py``, marked slow).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.server import REPO, Server  # noqa: E402

__all__ = ["check", "main"]

PATH_NAME = "bezier"  # the served path's name: its folder below the served root
TRAIN_EPOCHS = 5
CONNECT_EPOCHS = 20  # 220 steps of batch 128 on digits' 1,437 training inputs
EVAL_POINTS = 5
PREDICT_INPUTS = 8
LATENCY_REQUESTS = 50
STEP_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 180.0
TAIL_CHARS = 3000


class _Report:
    """The report being written: one record per step, in the order they ran."""

    def __init__(self, device: str):
        self.device = device
        self.steps: dict[str, dict] = {}
        self.figures: dict[str, dict] = {}

    def ok(self, *names: str) -> bool:
        return all(self.steps.get(n, {}).get("status") == "ok" for n in names)

    def skip(self, name: str, reason: str) -> None:
        self.steps[name] = {"status": "skipped", "reason": reason}

    def needs(self, name: str, *required: str) -> bool:
        """Whether every step in ``required`` passed; if not, ``name`` is recorded as skipped."""
        missing = [r for r in required if not self.ok(r)]
        if missing:
            self.skip(name, f"needs {', '.join(missing)}, which did not pass")
        return not missing

    def command(self, name: str, argv: list[str], *, timeout: float = STEP_TIMEOUT_S) -> str | None:
        """Run ``argv``; record its seconds and, if it fails, its exit status and output tails.
        Returns its stdout when it passed, else None."""
        record: dict = {"command": " ".join(argv[1:] if argv[0] == sys.executable else argv)}
        start = time.perf_counter()
        try:
            done = subprocess.run(
                argv,
                cwd=REPO,
                env=_environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            record.update(status="failed", seconds=round(time.perf_counter() - start, 3))
            record["error"] = f"timed out after {timeout:.0f} s"
            record["stderr_tail"] = _tail(err.stderr)
            self.steps[name] = record
            return None
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["returncode"] = done.returncode
        if done.returncode != 0:
            record.update(status="failed", stderr_tail=_tail(done.stderr))
            record["stdout_tail"] = _tail(done.stdout)
            self.steps[name] = record
            return None
        record["status"] = "ok"
        self.steps[name] = record
        return done.stdout

    def fail(self, name: str, error: str) -> None:
        """Mark ``name`` failed after the fact (its figures contradict what it must show)."""
        self.steps.setdefault(name, {}).update(status="failed", error=error)


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def _environment() -> dict[str, str]:
    """This process's environment, with the repository importable and BentoML quiet."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": python_path, "BENTOML_DO_NOT_TRACK": "True"}


def _machine(device: str) -> dict:
    """What ran the check: CPU or GPU model, library versions, onnxruntime's providers."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict = {
        "device": device,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for package in ("onnxruntime", "onnxruntime-gpu", "bentoml"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as err:
        info["onnxruntime_providers"] = f"onnxruntime not importable: {err}"
    return info


# ---------------------------------------------------------------------------------------------
# Steps


def _modeconn(*args: str) -> list[str]:
    return [sys.executable, "-m", "modeconn", *args]


def _train(report: _Report, root: Path) -> list[Path]:
    files = []
    for seed in (0, 1):
        out = root / f"mlp_{seed}.safetensors"
        report.command(
            f"train_seed{seed}",
            _modeconn("train", "--model", "mlp", "--epochs", str(TRAIN_EPOCHS))
            + ["--seed", str(seed), "--device", report.device, "--out", str(out)],
        )
        files.append(out)
    return files


def _processes(device: str) -> tuple[int, str | None]:
    """How many ranks the parallel fit runs with, or 0 and why it is skipped."""
    if not device.startswith("cuda"):
        return 2, None
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return 0, "no GPU visible (torch.cuda.is_available() is False)"
    if gpus == 1:
        return 0, "one GPU visible: nccl needs one GPU per rank"
    return min(2, gpus), None


def _fit_figures(out: Path, wall_s: float) -> dict:
    """Wall time of the command and time per step of the fit loop, from the manifest."""
    fit = json.loads((out / "manifest.json").read_text())["fit"]
    stats = fit.get("stats", {})
    steps, loop_s = stats.get("steps"), stats.get("seconds_this_run")
    return {
        "wall_s": wall_s,
        "fit_s": fit.get("seconds"),  # the fit, with its setup; without evaluation and saving
        "loop_s": loop_s,  # the optimisation loop alone
        "steps": steps,
        "ms_per_step": round(loop_s / steps * 1e3, 4) if steps and loop_s is not None else None,
        "final_epoch_loss": stats.get("final_epoch_loss"),
    }


def _connect(report: _Report, endpoints: list[Path], root: Path) -> Path:
    """Fit the Bezier curve in one process and in several; returns the first artifact."""
    single, parallel = root / "paths" / PATH_NAME, root / "parallel" / PATH_NAME
    args = ["connect", *map(str, endpoints), "--method", "bezier"]
    args += ["--epochs", str(CONNECT_EPOCHS), "--eval-points", str(EVAL_POINTS)]
    args += ["--device", report.device]
    figures: dict = {}
    if report.needs("connect_1proc", "train_seed0", "train_seed1"):
        report.command("connect_1proc", _modeconn(*args, "--out", str(single)))
    if report.ok("connect_1proc"):
        figures["one_process"] = _fit_figures(single, report.steps["connect_1proc"]["seconds"])
    nproc, reason = _processes(report.device)
    if reason is not None:
        report.skip("connect_torchrun", reason)
    elif report.needs("connect_torchrun", "train_seed0", "train_seed1"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", str(nproc), "-m", "modeconn"]
        report.command("connect_torchrun", launcher + [*args, "--out", str(parallel)])
    if report.ok("connect_torchrun"):
        seconds = report.steps["connect_torchrun"]["seconds"]
        figures["torchrun"] = {"nproc": nproc, **_fit_figures(parallel, seconds)}
    if report.ok("connect_1proc", "connect_torchrun"):
        figures["max_abs_node_diff"] = _node_difference(report, single, parallel)
    report.figures["connect"] = figures
    return single


def _node_difference(report: _Report, a: Path, b: Path) -> float | None:
    """``max |nodes_a - nodes_b|`` over every tensor of the two paths (K, *shape each)."""
    import numpy as np
    from safetensors.numpy import load_file

    nodes_a = load_file(a / "nodes.safetensors")
    nodes_b = load_file(b / "nodes.safetensors")
    if nodes_a.keys() != nodes_b.keys():
        report.fail("connect_torchrun", "the two paths' nodes hold different tensors")
        return None
    return max(
        float(np.abs(nodes_a[k].astype(np.float64) - nodes_b[k].astype(np.float64)).max())
        for k in nodes_a
    )


_EXPORT_DIFF = re.compile(r"max \|onnxruntime - torch\| = ([0-9.eE+-]+)")


def _export(report: _Report, artifact: Path, root: Path) -> None:
    figures: dict = {}
    exports = {
        "export_midpoint": ["--t", "0.5", "--out", str(root / "midpoint.onnx")],
        "export_ensemble_k4": ["--ensemble", "4", "--out", str(root / "ensemble_k4.onnx")],
    }
    for name, args in exports.items():
        if not report.needs(name, "connect_1proc"):
            continue
        stdout = report.command(
            name, _modeconn("export", str(artifact), *args, "--device", report.device)
        )
        if stdout is not None and (found := _EXPORT_DIFF.search(stdout)):
            figures[f"{name.removeprefix('export_')}_max_abs_diff"] = float(found.group(1))
    if report.needs("serve_build", "connect_1proc"):
        # Only what the service check asks for: the K=4 ensemble and the midpoint.
        report.command(
            "serve_build",
            _modeconn("serve-build", str(artifact), "--k", "4", "--ts", "0.5", "--cascade", "0"),
        )
    report.figures["export"] = figures


def _serve(report: _Report, served_root: Path, root: Path) -> None:
    """A real ``bentoml serve``: readiness, one ensemble prediction, then 50 more timed."""
    if not report.needs("serve", "serve_build"):
        return
    import httpx

    from modeconn.data import load_data

    data = load_data("digits")
    x = data.x_test[:PREDICT_INPUTS].numpy()  # (N, 1, 8, 8)
    y = data.y_test[:PREDICT_INPUTS].tolist()  # (N,)
    body = {"path": PATH_NAME, "inputs": x.tolist(), "k": 4}
    home = root / "bentoml_home"
    home.mkdir(exist_ok=True)
    device = "auto" if report.device.startswith("cuda") else "cpu"
    expected = (
        "CUDAExecutionProvider" if report.device.startswith("cuda") else "CPUExecutionProvider"
    )
    record: dict = {"command": "bentoml serve service.service:ModeConnService", "status": "ok"}
    figures: dict = {"provider_expected": expected, "requests": LATENCY_REQUESTS}
    report.steps["serve"] = record
    report.figures["serve"] = figures
    start = time.perf_counter()
    server = Server(served_root, home, root / "server.log", {"MODECONN_DEVICE": device})
    try:
        figures["ready_s"] = round(server.wait_ready(READY_TIMEOUT_S), 3)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            begin = time.perf_counter()
            response = client.post("/predict", json=body)
            figures["first_predict_ms"] = round((time.perf_counter() - begin) * 1e3, 3)
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
            answer = response.json()
            figures["provider"] = answer.get("provider")
            figures["k"] = answer.get("k")
            figures["correct"] = f"{sum(a == b for a, b in zip(answer['labels'], y))}/{len(y)}"
            latencies = []
            for _ in range(LATENCY_REQUESTS):
                begin = time.perf_counter()
                client.post("/predict", json=body).raise_for_status()
                latencies.append((time.perf_counter() - begin) * 1e3)
            figures["latency_ms_p50"] = round(statistics.median(latencies), 3)
            figures["latency_ms_max"] = round(max(latencies), 3)
        if figures["provider"] != expected:
            record.update(
                status="failed", error=f"provider {figures['provider']!r}, not {expected}"
            )
    except (RuntimeError, OSError, ValueError, KeyError, httpx.HTTPError) as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        record["server_log_tail"] = _tail(server.log_tail())
    finally:
        record["stop"] = server.stop()
        record["seconds"] = round(time.perf_counter() - start, 3)
    if record["stop"]["returncode"] is None:
        record.update(status="failed", error="the server did not stop on SIGTERM (killed)")


# ---------------------------------------------------------------------------------------------
# The whole check


def _finite(value: Any) -> Any:
    """The report with every non-finite float as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def check(device: str = "cpu") -> dict:
    """Run every step on ``device`` (``cpu``, ``cuda``) in a temporary folder; the report."""
    started = time.perf_counter()
    report = _Report(device)
    machine = _machine(device)
    with tempfile.TemporaryDirectory(prefix="modeconn_device_check_") as tmp:
        root = Path(tmp)
        endpoints = _train(report, root)
        artifact = _connect(report, endpoints, root)
        _export(report, artifact, root)
        _serve(report, artifact.parent, root)
    failed = sorted(n for n, s in report.steps.items() if s["status"] == "failed")
    return _finite(
        {
            "device": device,
            "ok": not failed,
            "failed": failed,
            "machine": machine,
            "steps": report.steps,
            "figures": report.figures,
            "total_s": round(time.perf_counter() - started, 3),
        }
    )


def _summary(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"device check on {result['device']}: {'all steps passed' if result['ok'] else 'FAILED'} "
        f"in {result['total_s']:.0f} s ({machine.get('gpu', machine['cpu'])}, torch "
        f"{machine['torch']}, onnxruntime providers {machine['onnxruntime_providers']})"
    ]
    for name, step in result["steps"].items():
        seconds = f"{step['seconds']:7.1f} s" if step.get("seconds") is not None else " " * 9
        stderr = step.get("stderr_tail", "").strip().splitlines()
        why = step.get("error") or step.get("reason") or (stderr[-1] if stderr else "")
        lines.append(f"  {name:<20} {step['status']:<8} {seconds}  {why}".rstrip())
    connect = result["figures"].get("connect", {})
    for key, fit in connect.items():
        if isinstance(fit, dict) and fit.get("ms_per_step") is not None:
            lines.append(
                f"  bezier, {key.replace('_', ' ')}: {fit['steps']} steps, "
                f"{fit['ms_per_step']:.2f} ms/step, {fit['wall_s']:.1f} s wall"
            )
    if connect.get("max_abs_node_diff") is not None:
        lines.append(
            f"  max |nodes 1 process - nodes torchrun| = {connect['max_abs_node_diff']:.2e}"
        )
    serve = result["figures"].get("serve", {})
    if "provider" in serve:
        lines.append(
            f"  /predict K=4 on {serve['provider']}: ready in {serve['ready_s']:.1f} s, "
            f"p50 {serve.get('latency_ms_p50', float('nan')):.2f} ms over {serve['requests']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: run :func:`check`, write the JSON report, print a summary; the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("device_check.json"), help="JSON report")
    args = parser.parse_args(argv)
    result = check(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(_summary(result))
    print(f"report: {args.out}")
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
