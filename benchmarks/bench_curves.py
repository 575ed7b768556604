"""Benchmark one curve-fitting step (Garipov et al. 2018, K = 3) against one plain training step.

Both steps see the same mini-batch of the same model: the plain step is ``model(x)``,
cross-entropy, backward and an SGD step (momentum 0.9, weight decay 5e-4, as endpoints are
trained) on the module's parameters; the curve step is ``w(t)`` from the three nodes,
``functional_call`` on it, cross-entropy, backward into the interior node (weight decay on
``w(t)``) and its SGD step (``modeconn.fit.curves.CurveTrainer.step``). They are timed
alternately, so that machine noise hits both alike; reported are the ratio of the medians,
of the minimums, and the median of the ratios of adjacent pairs (target: at most 1.2).

    python benchmarks/bench_curves.py [--quick] [--device cuda]
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

from modeconn.data import Dataset  # noqa: E402
from modeconn.fit.configs import CurveConfig  # noqa: E402
from modeconn.fit.curves import CurveTrainer  # noqa: E402
from modeconn.fit.objective import model_objective, model_parameters  # noqa: E402
from modeconn.models import create_model  # noqa: E402

# name -> (registered model, input shape, kwargs, batch size)
CASES = {
    "mlp_64-256-256-10": ("mlp", (1, 8, 8), {"depth": 2, "width": 256}, 128),
    "resnet20_cifar": ("resnet20", (3, 32, 32), {"width": 1, "norm": "bn"}, 128),
}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _bench_case(name: str, shape, kwargs, batch_size: int, repeats: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=gen)  # (B, *shape)
    y = torch.randint(0, 10, (batch_size,), generator=gen)  # (B,)
    data = Dataset("bench", x, y, x, y, num_classes=10)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(create_model(name, shape, 10, **kwargs).state_dict())
    model = create_model(name, shape, 10, **kwargs).to(device)
    plain_model = create_model(name, shape, 10, **kwargs).to(device).train()
    # As endpoints are trained (modeconn.train): SGD, momentum 0.9, weight decay 5e-4.
    optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xb, yb = x.to(device), y.to(device)

    def plain_step() -> None:
        loss = F.cross_entropy(plain_model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    objective = model_objective(model, data, batch_size=batch_size, device=device)
    a, b = ({k: v.to(device) for k, v in model_parameters(model, s).items()} for s in states)
    trainer = CurveTrainer(objective, a, b, CurveConfig(nodes=3, lr=0.01), basis="bezier")
    ts = torch.rand(repeats + 3, generator=gen, dtype=torch.float64).tolist()

    def curve_step(t: float) -> None:
        trainer.step((xb, yb), t)

    plain, curve = [], []
    with objective.session():
        for i in range(repeats + 3):
            for kind in ("plain", "curve") if i % 2 == 0 else ("curve", "plain"):
                _sync(device)
                start = time.perf_counter()
                plain_step() if kind == "plain" else curve_step(ts[i])
                _sync(device)
                seconds = time.perf_counter() - start
                if i >= 3:  # warm-up steps (allocator, BLAS threads, momentum buffers)
                    (plain if kind == "plain" else curve).append(seconds)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size,
        "repeats": repeats,
        "plain_ms_median": 1e3 * statistics.median(plain),
        "curve_ms_median": 1e3 * statistics.median(curve),
        "plain_ms_min": 1e3 * min(plain),
        "curve_ms_min": 1e3 * min(curve),
        "ratio_median": statistics.median(curve) / statistics.median(plain),
        "ratio_min": min(curve) / min(plain),
        # each curve step over the plain step timed next to it: robust to a machine whose
        # load changes during the run
        "ratio_paired": statistics.median(c / p for c, p in zip(curve, plain)),
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """One K=3 Bezier curve step vs one plain SGD step, MLP (digits) and ResNet-20 (CIFAR)."""
    repeats = {"mlp_64-256-256-10": 60 if quick else 400, "resnet20_cifar": 6 if quick else 30}
    results = {"device": device, "torch_threads": torch.get_num_threads(), "target_ratio": 1.2}
    for case, (name, shape, kwargs, batch) in CASES.items():
        results[case] = _bench_case(name, shape, kwargs, batch, repeats[case], device)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(quick=args.quick, device=args.device)
    print(f"device={results['device']} threads={results['torch_threads']} target ratio <= 1.2")
    print(
        f"{'case':<20} {'params':>9} {'batch':>5} {'plain ms':>9} {'curve ms':>9} "
        f"{'ratio':>6} {'ratio(min)':>10} {'paired':>6}"
    )
    for case in CASES:
        r = results[case]
        print(
            f"{case:<20} {r['parameters']:>9,} {r['batch_size']:>5} {r['plain_ms_median']:>9.3f} "
            f"{r['curve_ms_median']:>9.3f} {r['ratio_median']:>6.3f} {r['ratio_min']:>10.3f} "
            f"{r['ratio_paired']:>6.3f}"
        )


if __name__ == "__main__":
    main()
