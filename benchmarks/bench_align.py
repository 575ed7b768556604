"""Benchmark Git Re-Basin weight matching (``modeconn.matching.weight_matching``).

Two independently initialised networks per architecture (seeds 0 and 1, random init: the cost
of matching depends on shapes, not on training), aligned repeatedly; reports the median wall
time, the share of it spent in ``scipy.optimize.linear_sum_assignment``, and the sweeps taken.

    python benchmarks/bench_align.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeconn.matching import weight_matching  # noqa: E402
from models import create_model, infer_spec  # noqa: E402

# name -> (registered model, input shape, kwargs)
CASES = {
    "mlp_64-256-256-10": ("mlp", (1, 8, 8), {"depth": 2, "width": 256}),
    "resnet20x4_cifar": ("resnet20", (3, 32, 32), {"width": 4, "norm": "bn"}),
}


def _bench_case(name: str, shape, kwargs, repeats: int, device: str) -> dict:
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(name, shape, 10, **kwargs)
        states.append({k: v.to(device) for k, v in model.state_dict().items()})
    spec = infer_spec(model, torch.zeros(2, *shape)).spec
    weight_matching(spec, *states, device=device)  # warm-up (allocator, BLAS threads)
    runs = [weight_matching(spec, *states, device=device) for _ in range(repeats)]
    seconds = [r.seconds for r in runs]
    return {
        "parameters": sum(v.numel() for k, v in states[0].items() if v.is_floating_point()),
        "groups": len(runs[0].perms),
        "repeats": repeats,
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "lsa_share": statistics.median(r.lsa_seconds / r.seconds for r in runs),
        "lsa_calls": runs[0].lsa_calls,
        "sweeps": runs[0].sweeps,
        "objective_identity": runs[0].objective[0],
        "objective_final": runs[0].objective[-1],
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Measure weight matching on an MLP 64-256-256-10 and a ResNet-20x4 (CIFAR shapes)."""
    repeats = {"mlp_64-256-256-10": 5 if quick else 30, "resnet20x4_cifar": 2 if quick else 7}
    results = {"device": device, "torch_threads": torch.get_num_threads()}
    for case, (name, shape, kwargs) in CASES.items():
        results[case] = _bench_case(name, shape, kwargs, repeats[case], device)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    print(f"device={results['device']} threads={results['torch_threads']}")
    header = f"{'case':<20} {'params':>9} {'sweeps':>6} {'median s':>9} {'min s':>9} {'LSA %':>6}"
    print(header)
    for case in CASES:
        r = results[case]
        print(
            f"{case:<20} {r['parameters']:>9,} {r['sweeps']:>6} {r['seconds_median']:>9.4f} "
            f"{r['seconds_min']:>9.4f} {100 * r['lsa_share']:>5.1f}%"
        )


if __name__ == "__main__":
    main()
