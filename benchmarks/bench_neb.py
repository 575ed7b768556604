"""Benchmark one NEB step over N pivots against N plain gradient steps of one model.

Both sides see the same mini-batch. The plain step is ordinary training: ``zero_grad``,
forward, cross-entropy, backward, ``SGD(momentum=0.9).step()`` on an ``nn.Module``. The NEB
step is the library's own (``modeconn.fit.neb._neb_step``): losses and gradients at the N interior
pivots, improved tangents (the endpoints' losses are computed once per cycle, outside the
step), projection, an Adam step on the stacked pivots and the arc-length re-spacing. The
per-pivot work is run both ways -- stacked with ``torch.func.vmap`` and in a loop -- and the ratio
``NEB step / N plain steps`` is reported for each (target: <= 1.0), with the engine that
``engine="auto"`` picks.

    python benchmarks/bench_neb.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn.bn import batch_stats_mode  # noqa: E402
from modeconn.data import load_data  # noqa: E402
from modeconn.fit.configs import CycleConfig  # noqa: E402
from modeconn.fit.neb import Evaluator, _neb_step, _Optimiser  # noqa: E402
from modeconn.fit.objective import model_objective, model_parameters  # noqa: E402
from modeconn.fit.state import FlatLayout, resolve_engine  # noqa: E402
from modeconn.models import create_model  # noqa: E402

# name -> (registered model, kwargs, data shape: "digits" or a CIFAR-shaped random batch)
CASES = {
    "mlp_64-256-256-10": ("mlp", {"width": 256, "depth": 2}),
    "mlp_64-16-16-10": ("mlp", {"width": 16, "depth": 2}),
    "cnn_bn_8-16": ("cnn", {"channels": [8, 16], "norm": "bn"}),
}
BATCH = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call (CPU time ignores time spent descheduled)."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _bench_case(name: str, kwargs: dict, pivots: int, repeats: int, device: torch.device) -> dict:
    data = load_data("digits")
    torch.manual_seed(0)
    models = [create_model(name, data.input_shape, data.num_classes, **kwargs) for _ in range(2)]
    model = models[0].to(device)
    objective = model_objective(model, data, batch_size=BATCH, device=device)
    x, y = data.x_train[:BATCH].to(device), data.y_train[:BATCH].to(device)
    batch = (x, y)

    # Plain training steps of one model.
    trainee = create_model(name, data.input_shape, data.num_classes, **kwargs).to(device).train()
    sgd = torch.optim.SGD(trainee.parameters(), lr=1e-3, momentum=0.9)

    def plain_steps() -> None:
        for _ in range(pivots):
            sgd.zero_grad(set_to_none=True)
            F.cross_entropy(trainee(x), y).backward()
            sgd.step()

    # A chain of pivots + 2 endpoints between two random networks.
    states = [model_parameters(m, m.state_dict()) for m in models]
    layout = FlatLayout(states[0])
    a, b = (layout.flatten(s).to(device) for s in states)  # (D,)
    alphas = torch.linspace(0, 1, pivots + 2, device=device)[:, None]  # (P, 1)
    chain0 = torch.lerp(a, b, alphas) + 1e-3 * torch.randn(pivots + 2, len(a), device=device)
    weights = torch.ones(pivots + 1, dtype=torch.float64)
    cycle = CycleConfig(steps=1, lr=1e-3)
    results = {"parameters": len(a), "pivots": pivots, "batch": BATCH}
    steps = {"plain": plain_steps}
    with batch_stats_mode(model):
        for engine in ("loop", "vmap"):
            evaluator = Evaluator(objective, layout, engine)
            chain = chain0.clone()
            optimiser = _Optimiser(cycle, chain[1:-1])
            ends = evaluator.values(chain[[0, -1]], batch, loop=True)  # once per cycle
            steps[engine] = lambda ch=chain, ev=evaluator, op=optimiser, e=ends: _neb_step(
                ch, weights, ev, op, batch, e
            )
        for fn in steps.values():  # warm-up
            fn()
            fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):  # interleaved, so that load changes hit every variant alike
            for key, fn in steps.items():
                wall, used = _time(fn, device)
                times[key].append(wall)
                cpu[key].append(used)
    # On a shared machine a step is sometimes descheduled for a whole time slice: the minimum
    # is the reproducible figure, the median is reported beside it, and on CPU the median of
    # the process CPU time too (with several threads it also counts their idle spinning).
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    results.update({f"seconds_{k}": v for k, v in best.items()})
    results.update({f"seconds_{k}_median": v for k, v in median.items()})
    for engine in ("loop", "vmap"):
        results[f"ratio_{engine}"] = best[engine] / best["plain"]
        results[f"ratio_{engine}_median"] = median[engine] / median["plain"]
        if device.type == "cpu":
            results[f"ratio_{engine}_cpu_time"] = cpu_median[engine] / cpu_median["plain"]
    auto = resolve_engine("auto", objective)
    results["auto_engine"] = auto
    results["ratio_auto"] = results[f"ratio_{auto}"]
    results["faster_engine"] = min(("loop", "vmap"), key=lambda e: best[e])
    results["ratio_best"] = results[f"ratio_{results['faster_engine']}"]
    return results


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Ratio of one NEB step over N pivots to N plain gradient steps, per model and N."""
    device = torch.device(device)
    repeats = 7 if quick else 31
    pivot_counts = (8,) if quick else (8, 24)
    cases = {
        f"{case}_N{n}": _bench_case(name, kwargs, n, repeats, device)
        for case, (name, kwargs) in CASES.items()
        for n in pivot_counts
    }
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "worst_ratio_auto": max(c["ratio_auto"] for c in cases.values()),
        "worst_ratio_best": max(c["ratio_best"] for c in cases.values()),
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(quick=args.quick, device=args.device)
    for key, value in results["cases"].items():
        print(
            f"{key:24s} plain {value['seconds_plain'] * 1e3:7.2f} ms   "
            f"loop {value['ratio_loop']:.2f}x   vmap {value['ratio_vmap']:.2f}x   "
            f"auto={value['auto_engine']} -> {value['ratio_auto']:.2f}x   "
            f"(medians: loop {value['ratio_loop_median']:.2f}x vmap {value['ratio_vmap_median']:.2f}x; "
            f"CPU time: loop {value.get('ratio_loop_cpu_time', float('nan')):.2f}x "
            f"vmap {value.get('ratio_vmap_cpu_time', float('nan')):.2f}x)"
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
