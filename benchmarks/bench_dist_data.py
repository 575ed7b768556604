"""Benchmark data parallelism: the time per step of two processes against one.

Each case runs the real fitter (``connect`` for bezier, polychain and FGE; ``train_model`` for
endpoint training) on digits with a 64-256-256-10 MLP, batch 128: under ``torchrun
--nproc-per-node 2`` (each process with half the machine's threads), where every rank computes
on half of each batch and the gradients are summed in one all-reduce per step; and alone, once
with all the threads and once with half of them (as much as one rank has). A step's time is the
difference between a long and a short fit over their difference in steps, so start-up, set-up
and the final evaluation cancel out. The launches alternate ``rounds`` times, so that machine
noise hits all alike; reported are the medians and the ratios (two processes / one: below 1 is
a speed-up). No target: on a machine with two cores all launches share the same cores, and the
ratios say what the all-reduce costs rather than what more devices gain.

    python benchmarks/bench_dist_data.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(REPO))

CASES = ("bezier", "polychain", "fge", "train")
#: The model every case fits: registered name and kwargs.
MODEL = ("mlp", {"depth": 2, "width": 256})
#: Epochs of the short and the long fit (digits: 11 steps an epoch at batch 128).
SHORT, LONG = 1, 7


def _fit_seconds(case: str, epochs: int, data, ends, device: str) -> tuple[float, int]:
    """Wall time of one fit of ``case`` (all ranks timed together) and its number of steps."""
    import torch

    from modeconn import distributed
    from modeconn.fit.connect import connect
    from modeconn.models import create_model
    from modeconn.train import TrainConfig, train_model

    name, kwargs = MODEL
    model = create_model(name, data.input_shape, data.num_classes, **kwargs)
    stats: dict = {}
    distributed.barrier()
    start = time.perf_counter()
    if case == "train":
        train_model(model, data, TrainConfig(epochs=epochs), device=device)
        steps = epochs * (len(data.y_train) // 128)
    elif case == "fge":  # two cycles of half the epochs each
        connect(model, ends[0], None, "fge", data=data, device=device, stats=stats,
                cycles=2, cycle_epochs=epochs / 2)  # fmt: skip
        steps = stats["steps"]
    else:
        connect(model, ends[0], ends[1], case, data=data, device=device, stats=stats,
                epochs=epochs)  # fmt: skip
        steps = stats["steps"]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    return time.perf_counter() - start, steps


def _worker(out: str, device: str) -> None:
    """Time every case in this process (under torchrun: in each rank); rank 0 writes
    ``{case: seconds per step}`` as JSON to ``out``."""
    import torch

    from modeconn import distributed
    from modeconn.data import load_data
    from modeconn.models import create_model

    if distributed.launched() and torch.device(device).type == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    distributed.setup(device)
    try:
        data = load_data("digits")
        name, kwargs = MODEL
        ends = []
        for seed in (0, 1):  # the same on every rank: seeded on the CPU
            torch.manual_seed(seed)
            ends.append(
                dict(create_model(name, data.input_shape, data.num_classes, **kwargs).state_dict())
            )
        result = {}
        for case in CASES:
            _fit_seconds(case, SHORT, data, ends, device)  # warm-up: allocator, first calls
            short, short_steps = _fit_seconds(case, SHORT, data, ends, device)
            long, long_steps = _fit_seconds(case, LONG, data, ends, device)
            result[case] = (long - short) / (long_steps - short_steps)
        if distributed.is_main():
            Path(out).write_text(json.dumps(result))
    finally:
        distributed.teardown()


def _launch(processes: int, device: str, threads: int) -> dict[str, float]:
    """One launch of the worker on ``processes`` processes; seconds per step of each case."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        worker = ["-m", "benchmarks.bench_dist_data", "--worker", str(out), "--device", device]
        if processes > 1:
            launcher = ["-m", "torch.distributed.run", "--standalone"]
            command = [sys.executable, *launcher, f"--nproc-per-node={processes}", *worker]
        else:
            command = [sys.executable, *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        subprocess.run(command, cwd=REPO, env=env, check=True, timeout=1800)
        return json.loads(out.read_text())


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Seconds per step of each case on one process and on two, alternated ``rounds`` times."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < 2:
            return {"skipped": "two processes on CUDA need two GPUs", "device": device}
        device = "cuda"
    rounds = 1 if quick else 3
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    # (processes, threads each): two ranks; one process with all threads; with a rank's share
    launches = {"two": (2, half), "one": (1, cores), "one_half_threads": (1, half)}
    times: dict[str, list[dict[str, float]]] = {label: [] for label in launches}
    for _ in range(rounds):
        for label, (processes, threads) in launches.items():
            times[label].append(_launch(processes, device, threads))
    cases = {}
    for case in CASES:
        ms = {label: 1e3 * statistics.median(r[case] for r in times[label]) for label in launches}
        cases[case] = {
            "two_processes_ms": ms["two"],
            "one_process_ms": ms["one"],
            f"one_process_{half}_threads_ms": ms["one_half_threads"],
            "ratio": ms["two"] / ms["one"],
            f"ratio_vs_{half}_threads": ms["two"] / ms["one_half_threads"],
        }
    name, kwargs = MODEL
    return {
        "device": device,
        "model": f"{name} {kwargs} on digits, batch 128",
        "threads": f"two processes: {half} each; one process: {cores}, and {half}",
        "rounds": rounds,
        "cases": cases,
        "notes": "ratio = two processes' time per step / one process's (below 1: faster). "
        "Measured on a shared machine: other work on the same cores distorts every column, and "
        "most the one with more threads than free cores (its threads wait on each other).",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.device)
        return
    results = run(quick=args.quick, device=args.device)
    if "skipped" in results:
        print(results["skipped"])
        return
    print(f"{results['model']}; threads: {results['threads']}; {results['rounds']} rounds")
    for case, row in results["cases"].items():
        print(f"{case:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
