"""Benchmark NEB, AutoNEB and geodesic fits sharded over 2 ranks against one process.

Each case fits a path between two digits MLPs (64-W-W-10: 8,970 numbers a node at W = 64,
301,066 at W = 512) three ways, each a fresh set of processes: one process with one thread,
one process with two threads (the same cores as two ranks), and ``torchrun --nproc-per-node
2`` with one thread a rank (gloo on the CPU, or one device a rank). Every rank draws the same
batches and owns half the nodes. Reported per case: wall seconds per step (the whole fit,
dense evaluations and length measurements included, divided by its steps; the best of
``repeats`` fits), the ratios of two ranks to each one-process run, and the largest difference
between the sharded path and the one-thread path (0: bitwise). The NEB chains have 8 interior
pivots, over the fused Adam kernel's threshold (65,536 numbers), so they also check that
kernel's aligned layout (see ``modeconn.fit.neb._Optimiser``).

Two ranks pay per step three exchanges with each other (NEB: a neighbour's row and loss, its
row after the optimiser step, and an all-reduce of ``2P - 3`` scalars; the geodesic: a
neighbour's predictions and ``N - 1`` scalars). On a machine of two cores shared with other
work each exchange waits for the other process to be scheduled, so small steps (a few ms)
come out slower on two ranks; the point of sharding is memory (a chain too large for one
device), and with larger nodes a step's compute outweighs its exchanges.

    python -m benchmarks.bench_dist_nodes [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: case -> (method, options (steps set per run), width of the 64-W-W-10 digits MLPs).
CASES = {
    "neb": ("neb", {"nodes": 10, "lr": 3e-3}, 64),
    "autoneb": (
        "autoneb",
        {
            "cycles": [
                {"lr": 3e-3, "insert": "equal", "insert_count": 3},
                {"lr": 1e-3, "insert": "highest", "insert_count": 2, "repeat": 2},
            ],
            "insert_threshold": 0.0,
        },
        64,
    ),
    "geodesic": ("geodesic", {"nodes": 10, "optimizer": "adam", "lr": 1e-3}, 64),
    # 301,066 numbers a node: the compute of a step outweighs its exchanges
    "neb (wide)": ("neb", {"nodes": 10, "lr": 3e-3}, 512),
    "geodesic (wide)": ("geodesic", {"nodes": 10, "optimizer": "adam", "lr": 1e-3}, 512),
}
#: Cases also run with --quick.
QUICK = ("neb", "autoneb", "geodesic")
#: The three ways each case runs: (label, processes, threads per process).
LAUNCHES = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 ranks", 2, 1))

DRIVER = """
import json, sys, time
import torch
from safetensors.torch import save_file
from modeconn import distributed
from modeconn.data import load_data
from modeconn.fit.connect import connect
from modeconn.models import create_model

out, device, steps, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cases = json.loads(sys.argv[5])
distributed.setup(device)
data = load_data("digits")
tensors, report = {}, {}
for name, (method, options, width) in cases.items():
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ends.append(create_model("mlp", data.input_shape, data.num_classes, width=width, depth=2))
    model, a, b = ends[0], ends[0].state_dict(), ends[1].state_dict()
    options = dict(options)
    if method == "autoneb":
        options["cycles"] = [{**c, "steps": max(steps // 3, 1)} for c in options["cycles"]]
    else:
        options["steps"] = steps
    best = float("inf")
    for _ in range(repeats):
        stats = {}
        distributed.barrier()
        began = time.perf_counter()
        path = connect(model, a, b, method, data=data, device=device, stats=stats, **options)
        distributed.barrier()
        best = min(best, time.perf_counter() - began)
    numbers = sum(v.numel() for v in a.values() if v.is_floating_point())
    report[name] = {"seconds": best, "steps": stats["steps"], "nodes": path.num_nodes,
                    "numbers_per_node": numbers}
    for key, value in path.nodes.items():
        tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
if distributed.is_main():
    save_file(tensors, out, metadata={"report": json.dumps(report)})
distributed.teardown()
"""


def _launch(folder: Path, label: str, ranks: int, threads: int, args: list[str]) -> Path:
    """Run the driver as ``ranks`` processes of ``threads`` threads; the file rank 0 wrote."""
    out = folder / f"{ranks}x{threads}.safetensors"
    script = folder / "driver.py"
    script.write_text(DRIVER)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={ranks}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, *launcher, str(script), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out


def _read(path: Path) -> tuple[dict, dict]:
    import torch  # noqa: F401  (safetensors' torch backend)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        report = json.loads(handle.metadata()["report"])
    return tensors, report


def _max_diff(tensors: dict, reference: dict, case: str) -> float:
    keys = [k for k in reference if k.startswith(f"{case}/")]
    if any(tensors[k].shape != reference[k].shape for k in keys):
        return float("inf")  # different pivots inserted
    return max(float((tensors[k] - reference[k]).abs().max()) for k in keys)


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Seconds per step of each method under each launch, and the sharded path's deviation."""
    steps, repeats = (30, 1) if quick else (150, 2)
    cases = {k: v for k, v in CASES.items() if k in QUICK or not quick}
    args = [device, str(steps), str(repeats), json.dumps(cases)]
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            label: _read(_launch(Path(tmp), label, ranks, threads, args))
            for label, ranks, threads in LAUNCHES
        }
    reference, one_report = results[LAUNCHES[0][0]]
    rows = {}
    for case in cases:
        row: dict = {k: one_report[case][k] for k in ("nodes", "steps", "numbers_per_node")}
        for label, _, _ in LAUNCHES:
            tensors, report = results[label]
            row[f"s_per_step[{label}]"] = report[case]["seconds"] / max(report[case]["steps"], 1)
            row[f"max_abs_diff[{label}]"] = _max_diff(tensors, reference, case)
        row["ratio_2_ranks_over_1_thread"] = (
            row["s_per_step[2 ranks]"] / row["s_per_step[1 process, 1 thread]"]
        )
        row["ratio_2_ranks_over_2_threads"] = (
            row["s_per_step[2 ranks]"] / row["s_per_step[1 process, 2 threads]"]
        )
        rows[case] = row
    return {
        "device": device,
        "steps": steps,
        "repeats": repeats,
        "cases": rows,
        "notes": "wall time of the whole fit per step, best of the repeats; 2 ranks vs one "
        "process on the same machine; max_abs_diff against the 1-thread process's path",
    }


def _table(results: dict) -> str:
    labels = [label for label, _, _ in LAUNCHES]
    head = ["case", "nodes", "numbers/node", "steps", *(f"ms/step, {label}" for label in labels)]
    head += ["2 ranks / 1 thread", "2 ranks / 2 threads", "max abs diff, 2 ranks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, row in results["cases"].items():
        cells = [case, str(row["nodes"]), f"{row['numbers_per_node']:,}", str(row["steps"])]
        cells += [f"{row[f's_per_step[{label}]'] * 1e3:.1f}" for label in labels]
        cells += [
            f"{row['ratio_2_ranks_over_1_thread']:.2f}",
            f"{row['ratio_2_ranks_over_2_threads']:.2f}",
            f"{row['max_abs_diff[2 ranks]']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU a rank)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    print(_table(results))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
