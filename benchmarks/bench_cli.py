"""Benchmark the command line's start-up: ``modeconn --help`` must not wait for torch.

Each command runs as a fresh ``python -m modeconn ...`` process, the way a person runs it;
``python -c "import torch"`` (what every help would cost if it loaded torch) and ``python -c
pass`` (the interpreter alone) run beside them, round-robin, so all are timed under the same
load. Reports the median and minimum wall time of each (target: the slowest help <= 0.5 s).

    python benchmarks/bench_cli.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: label -> arguments after ``python``; the first two are the helps the target is about.
COMMANDS = {
    "modeconn --help": ["-m", "modeconn", "--help"],
    "modeconn connect --method geodesic --help": [
        "-m", "modeconn", "connect", "--method", "geodesic", "--help",
    ],
    "python -c 'import torch'": ["-c", "import torch"],
    "python -c pass": ["-c", "pass"],
}  # fmt: skip
HELPS = ("modeconn --help", "modeconn connect --method geodesic --help")


def _seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Time each command ``repeats`` times, round-robin, after one warm-up run of each."""
    del device  # start-up only: nothing runs on a device
    repeats = 3 if quick else 5
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for args in COMMANDS.values():  # warm-up: the file-system cache, .pyc files
        _seconds(args)
    for _ in range(repeats):
        for label, args in COMMANDS.items():
            times[label].append(_seconds(args))
    commands = {
        label: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}
        for label, ts in times.items()
    }
    worst = max(commands[label]["median_s"] for label in HELPS)
    return {
        "commands": commands,
        "worst_help_seconds": worst,
        "worst_help_over_torch_import": worst / commands["python -c 'import torch'"]["median_s"],
        "notes": "fresh processes, medians; the helps import pydantic and the methods' "
        "configs but never torch (tests/test_cli_help.py checks that)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each instead of 5")
    parser.add_argument("--device", default="cpu", help="ignored: start-up only")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    print(f"{'command':<45} {'median s':>9} {'min s':>9}")
    for label, r in results["commands"].items():
        print(f"{label:<45} {r['median_s']:>9.3f} {r['min_s']:>9.3f}")
    print(
        f"slowest help: {results['worst_help_seconds']:.3f} s, "
        f"{results['worst_help_over_torch_import']:.2f}x the torch import"
    )


if __name__ == "__main__":
    main()
