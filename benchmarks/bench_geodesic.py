"""Benchmark one geodesic step (Tan et al. 2023) against training one model for N steps.

One geodesic step runs N = 25 models on the same mini-batch (the 2 fixed endpoints without
gradient, the 23 interior ones stacked with ``torch.func.vmap`` or in a loop), takes the JSD
energy's gradient and an SGD step. The reference is N plain training steps of one model on the
same batch (forward, cross-entropy, backward, SGD). Ratio = geodesic step / reference; target
<= 1.0. Repeats are interleaved so that both sides see the same machine load.

    python benchmarks/bench_geodesic.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn.data import load_data  # noqa: E402
from modeconn.fit.geodesic import chain_energy, chain_log_probs, initial_nodes  # noqa: E402
from modeconn.fit.objective import model_objective  # noqa: E402
from modeconn.fit.state import resolve_engine  # noqa: E402
from modeconn.models import create_model  # noqa: E402

NODES = 25
BATCH = 256
# name -> (registered model, kwargs)
CASES = {
    "mlp_w256": ("mlp", {"width": 256}),
    "mlp_w16": ("mlp", {"width": 16}),
    "cnn_bn_8-16": ("cnn", {"channels": [8, 16], "norm": "bn"}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_case(name: str, kwargs: dict, data, repeats: int, device: torch.device) -> dict:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(create_model(name, data.input_shape, data.num_classes, **kwargs).to(device))
    model = models[0]
    start = {k: v.detach() for k, v in models[0].named_parameters()}
    end = {k: v.detach() for k, v in models[1].named_parameters()}
    objective = model_objective(model, data, batch_size=BATCH, device=device)
    x = data.x_train[:BATCH].to(device)  # (B, ...)
    y = data.y_train[:BATCH].to(device)  # (B,)

    def geodesic_step(engine: str, interior, optimizer) -> None:
        energy = chain_energy(chain_log_probs(objective, start, interior, end, x, engine))
        optimizer.zero_grad(set_to_none=True)
        energy.backward()
        optimizer.step()

    single = create_model(name, data.input_shape, data.num_classes, **kwargs).to(device)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.01)

    def reference_steps() -> None:  # N training steps of one model on the same batch
        for _ in range(NODES):
            single_opt.zero_grad(set_to_none=True)
            F.cross_entropy(single(x), y).backward()
            single_opt.step()

    runners = {"reference": reference_steps}
    for engine in ("vmap", "loop"):
        interior = {
            k: v.requires_grad_() for k, v in initial_nodes(start, end, NODES, noise=0.0).items()
        }
        optimizer = torch.optim.SGD(list(interior.values()), lr=1e-3)
        runners[engine] = lambda e=engine, i=interior, o=optimizer: geodesic_step(e, i, o)

    times: dict[str, list[float]] = {key: [] for key in runners}
    with objective.session():
        single.train()
        for fn in runners.values():  # warm-up
            fn()
            fn()
        for _ in range(repeats):
            for key, fn in runners.items():
                _sync(device)
                began = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - began)
    auto = resolve_engine("auto", objective)
    med = {key: statistics.median(values) for key, values in times.items()}
    return {
        "parameters": sum(v.numel() for v in start.values()),
        "repeats": repeats,
        "auto_engine": auto,
        **{f"{key}_ms_median": 1000 * value for key, value in med.items()},
        **{f"{key}_ms_min": 1000 * min(values) for key, values in times.items()},
        "ratio_vmap": med["vmap"] / med["reference"],
        "ratio_loop": med["loop"] / med["reference"],
        "ratio": med[auto] / med["reference"],
        # minima are less sensitive to other work on a shared machine
        "ratio_min": min(times[auto]) / min(times["reference"]),
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """One geodesic step over 25 nodes vs 25 training steps of one model, per architecture."""
    device = torch.device(device)
    data = load_data("digits")
    repeats = 5 if quick else 25
    results: dict = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "nodes": NODES,
        "batch_size": BATCH,
    }
    for case, (name, kwargs) in CASES.items():
        results[case] = _bench_case(name, kwargs, data, repeats, device)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (seconds)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    print(
        f"device={results['device']} threads={results['torch_threads']} "
        f"nodes={results['nodes']} batch={results['batch_size']}"
    )
    print(
        f"{'case':<13} {'params':>8} {'ref ms':>8} {'vmap ms':>8} {'loop ms':>8} "
        f"{'auto':>5} {'ratio':>6} {'(min)':>6}"
    )
    for case in CASES:
        r = results[case]
        print(
            f"{case:<13} {r['parameters']:>8,} {r['reference_ms_median']:>8.1f} "
            f"{r['vmap_ms_median']:>8.1f} {r['loop_ms_median']:>8.1f} {r['auto_engine']:>5} "
            f"{r['ratio']:>6.2f} {r['ratio_min']:>6.2f}"
        )


if __name__ == "__main__":
    main()
