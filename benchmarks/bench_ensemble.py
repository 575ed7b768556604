"""Benchmark path ensembles: one fused ONNX graph vs K sessions vs torch (loop and vmap).

For K = 2, 4, 8 members of an MLP 64-256-256-10 (digits shapes) and of ResNet-20 (CIFAR
shapes, BatchNorm), at batch 1 and 256, times one ensemble prediction with

* ``fused``: the single ONNX graph holding all K members (``modeconn.export``);
* ``separate``: K onnxruntime sessions, one per member (each a plain merged-model graph:
  probabilities and log-probabilities), run one after the other; averaging their outputs
  would only add to this;
* ``separate+combine``: the same plus what its caller must add to get the fused graph's
  outputs (mean probabilities and the uncertainty columns, in numpy): the like-for-like
  baseline of the batch-1 target;
* ``one``: one member's session alone (``K * one`` is the members' own compute);
* ``torch_loop``: :class:`modeconn.ensemble.Ensemble` looping over K module copies;
* ``torch_vmap``: the same with ``torch.func.vmap`` over stacked parameters.

Every variant of a case is timed in the same interleaved rounds (medians), so the ratios are
side by side. Members are random networks with random BatchNorm statistics: the cost depends on
shapes only. Targets: ``(separate + combine) / fused >= 1.5`` at batch 1; ``K * one / fused >=
0.95`` at batch 256.

    python benchmarks/bench_ensemble.py [--quick] [--device cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn.ensemble import Ensemble  # noqa: E402
from modeconn.export import (  # noqa: E402
    ENSEMBLE_OUTPUTS,
    MERGED_OUTPUTS,
    EnsembleModule,
    MergedModule,
    export_onnx,
)
from modeconn.models import create_model  # noqa: E402
from modeconn.runtime import OnnxModel  # noqa: E402

# name -> (registered model, input shape, kwargs)
CASES = {
    "mlp_64-256-256-10": ("mlp", (1, 8, 8), {"depth": 2, "width": 256}),
    "resnet20_cifar": ("resnet20", (3, 32, 32), {"width": 1, "norm": "bn"}),
}
TARGET_SEPARATE_OVER_FUSED_B1 = 1.5
TARGET_MEMBERS_OVER_FUSED_B256 = 0.95


def _members(name: str, shape, kwargs, k: int) -> list[nn.Module]:
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = create_model(name, shape, 10, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
        members.append(model.eval())
    return members


def _export(members: list[nn.Module], shape, folder: Path, name: str, fused: bool) -> Path:
    """The fused ensemble graph, or (``fused=False``) one member as a plain merged model."""
    out = folder / f"{name}.onnx"
    module = EnsembleModule(members) if fused else MergedModule(members[0])
    export_onnx(
        module,
        out,
        input_shape=shape,
        output_names=ENSEMBLE_OUTPUTS if fused else MERGED_OUTPUTS,
        manifest={"kind": "ensemble" if fused else "merged", "path": "benchmark"},
    )
    return out


def _combine_numpy(log_probs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """What a caller of K separate sessions must add to get the fused graph's outputs."""
    lp = np.stack(log_probs, axis=1)  # (N, K, C)
    k = lp.shape[1]
    probs = np.exp(lp)  # (N, K, C)
    mean = probs.mean(axis=1)  # (N, C)
    log_mean = np.log(np.maximum(mean, np.finfo(np.float32).tiny))  # (N, C)
    entropy = -(mean * log_mean).sum(-1)  # (N,)
    mutual_information = np.maximum((probs * lp).sum(-1).mean(-1) + entropy, 0.0)  # (N,)
    labels = lp.argmax(-1)  # (N, K)
    differ = labels[:, :, None] != labels[:, None, :]  # (N, K, K)
    disagreement = differ.sum(axis=(1, 2)) / max(k * (k - 1), 1)  # (N,)
    return mean, np.stack([entropy, mutual_information, disagreement], -1), log_mean


def _interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, inner: int
) -> tuple[dict, dict]:
    """Median seconds per call of every function, timed in alternating rounds.

    Returns ``(wall, cpu)``: wall-clock medians and medians of this thread's CPU time. With one
    thread everywhere all the work runs on the calling thread, so CPU time measures the work
    itself and is not inflated when other processes take the cores away.
    """
    for fn in fns.values():  # warm-up: allocators, thread pools, caches
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            begin, begin_cpu = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                fn()
            cpu[name].append((time.thread_time() - begin_cpu) / inner)
            wall[name].append((time.perf_counter() - begin) / inner)
    return (
        {name: statistics.median(values) for name, values in wall.items()},
        {name: statistics.median(values) for name, values in cpu.items()},
    )


def _bench_model(
    case: str, ks: tuple[int, ...], batches: tuple[int, ...], quick: bool, device: str, threads
) -> dict:
    name, shape, kwargs = CASES[case]
    ort_device = "cuda" if device.startswith("cuda") else "cpu"
    use_cpu_time = threads == 1 and ort_device == "cpu"
    members = _members(name, shape, kwargs, max(ks))
    states = [m.state_dict() for m in members]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        begin = time.perf_counter()
        singles = [
            OnnxModel(
                _export([m], shape, folder, f"member{i}", fused=False),
                device=ort_device,
                intra_op_threads=threads,
            )
            for i, m in enumerate(members)
        ]
        fused = {
            k: OnnxModel(
                _export(members[:k], shape, folder, f"fused{k}", fused=True),
                device=ort_device,
                intra_op_threads=threads,
            )
            for k in ks
        }
        export_seconds = time.perf_counter() - begin
        provider = singles[0].provider
        for k in ks:
            loop = Ensemble(members[0], states[:k], list(range(k)), device=device)
            vmap = Ensemble(members[0], states[:k], list(range(k)), backend="vmap", device=device)
            for batch in batches:
                gen = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, *shape, generator=gen)  # (B, *shape)
                xn = x.numpy()
                if name == "resnet20":
                    rounds, inner = (15, 3) if batch == 1 else (5 if quick else 7, 1)
                else:
                    rounds, inner = (15 if quick else 40), (50 if batch == 1 else 10)
                fns = {
                    "fused": lambda f=fused[k], x=xn: f.session.run(None, {"input": x}),
                    "separate": lambda s=singles[:k], x=xn: [
                        m.session.run(None, {"input": x}) for m in s
                    ],
                    "separate+combine": lambda s=singles[:k], x=xn: _combine_numpy(
                        [m.session.run(["log_probabilities"], {"input": x})[0] for m in s]
                    ),
                    "one": lambda m=singles[0], x=xn: m.session.run(None, {"input": x}),
                    "torch_loop": lambda e=loop, x=x: e.predict(x, batch_size=len(x)),
                    "torch_vmap": lambda e=vmap, x=x: e.predict(x, batch_size=len(x)),
                }
                wall, cpu = _interleaved(fns, rounds, inner)
                t = cpu if use_cpu_time else wall
                rows[f"K={k} batch={batch}"] = {
                    "fused_ms": 1e3 * t["fused"],
                    "separate_ms": 1e3 * t["separate"],
                    "separate+combine_ms": 1e3 * t["separate+combine"],
                    "one_member_ms": 1e3 * t["one"],
                    "torch_loop_ms": 1e3 * t["torch_loop"],
                    "torch_vmap_ms": 1e3 * t["torch_vmap"],
                    "separate/fused": t["separate"] / t["fused"],
                    "(separate+combine)/fused": t["separate+combine"] / t["fused"],
                    "K*one/fused": k * t["one"] / t["fused"],
                    "torch_loop/fused": t["torch_loop"] / t["fused"],
                    "torch_vmap/torch_loop": t["torch_vmap"] / t["torch_loop"],
                    "(separate+combine)/fused (wall)": wall["separate+combine"] / wall["fused"],
                    "K*one/fused (wall)": k * wall["one"] / wall["fused"],
                }
    return {
        "rows": rows,
        "provider": provider,
        "export_seconds": export_seconds,
        "clock": "thread CPU time" if use_cpu_time else "wall clock",
    }


def run(quick: bool = False, device: str = "cpu", threads: int | None = 1) -> dict:
    """Fused ONNX ensemble vs K sessions vs torch loop vs torch vmap; ratios side by side.

    ``threads`` sets both onnxruntime's intra-op threads and torch's (default 1: on a small
    shared machine, idle spinning thread pools of K sessions and of torch disturb each other's
    timings more than they help; None keeps each library's default).
    """
    cases = ("mlp_64-256-256-10",) if quick else tuple(CASES)
    ks = (2,) if quick else (2, 4, 8)
    batches = (1, 256)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    results: dict = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": threads or "default",
    }
    table: dict[str, dict] = {}
    summary: dict[str, float] = {}
    try:
        measured_cases = {
            case: _bench_model(case, ks, batches, quick, device, threads) for case in cases
        }
    finally:
        torch.set_num_threads(saved_threads)
    for case, measured in measured_cases.items():
        results[f"{case} provider"] = measured["provider"]
        results[f"{case} export seconds"] = round(measured["export_seconds"], 1)
        results["clock"] = measured["clock"]
        for key, row in measured["rows"].items():
            table[f"{case} {key}"] = row
        b1 = [r for key, r in measured["rows"].items() if key.endswith("batch=1")]
        b256 = [r for key, r in measured["rows"].items() if key.endswith("batch=256")]
        summary[f"{case} worst (separate+combine)/fused at batch 1"] = min(
            r["(separate+combine)/fused"] for r in b1
        )
        summary[f"{case} worst separate/fused at batch 1"] = min(r["separate/fused"] for r in b1)
        summary[f"{case} worst K*one/fused at batch 256"] = min(r["K*one/fused"] for r in b256)
    results["cases"] = table
    results["summary"] = summary
    results["min_separate_over_fused_batch1"] = min(
        v for k, v in summary.items() if "(separate+combine)/fused" in k
    )
    results["min_members_over_fused_batch256"] = min(
        v for k, v in summary.items() if "K*one/fused" in k
    )
    results["targets"] = {
        "(separate+combine)/fused at batch 1": f">= {TARGET_SEPARATE_OVER_FUSED_B1}",
        "K*one/fused at batch 256": f">= {TARGET_MEMBERS_OVER_FUSED_B256}",
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="MLP only, K=2, fewer repeats (a few seconds)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime and torch threads (default: 1; 0: each library's default)",
    )
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device, threads=args.threads or None)
    print(
        f"device={results['device']} torch threads={results['torch_threads']} "
        f"onnxruntime threads={results['onnxruntime_threads']}"
    )
    header = (
        f"{'case':<34} {'fused ms':>9} {'sep ms':>9} {'sep+c ms':>9} {'one ms':>8} "
        f"{'loop ms':>9} {'vmap ms':>9} {'sep/fus':>7} {'sep+c/fus':>9} {'K1/fus':>7} "
        f"{'loop/fus':>8} {'vmap/loop':>9} {'sep+c/fus wall':>14} {'K1/fus wall':>11}"
    )
    print(f"clock: {results['clock']} (medians)")
    print(header)
    for case, r in results["cases"].items():
        print(
            f"{case:<34} {r['fused_ms']:>9.3f} {r['separate_ms']:>9.3f} "
            f"{r['separate+combine_ms']:>9.3f} {r['one_member_ms']:>8.3f} "
            f"{r['torch_loop_ms']:>9.3f} {r['torch_vmap_ms']:>9.3f} {r['separate/fused']:>7.2f} "
            f"{r['(separate+combine)/fused']:>9.2f} {r['K*one/fused']:>7.2f} "
            f"{r['torch_loop/fused']:>8.2f} {r['torch_vmap/torch_loop']:>9.2f} "
            f"{r['(separate+combine)/fused (wall)']:>14.2f} {r['K*one/fused (wall)']:>11.2f}"
        )
    for key, value in results["summary"].items():
        print(f"{key}: {value:.3f}")
    print(
        f"targets: (separate+combine)/fused >= {TARGET_SEPARATE_OVER_FUSED_B1} at batch 1, "
        f"K*one/fused >= {TARGET_MEMBERS_OVER_FUSED_B256} at batch 256"
    )


if __name__ == "__main__":
    main()
