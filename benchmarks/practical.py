"""A new user's run on data larger than the 8x8 digits: wall times of ``compare`` and ``evaluate``.

The data are the digits upsampled to 24x24 and placed at a random offset in a 28x28 frame, three
times each (5,391 images: 4,500 to train, 891 to test), saved as an npz: a stand-in for MNIST
that needs no download. Two CNN endpoints are trained on them (or given), then it times

* ``modeconn compare A B --budget quick`` (every method; and ``--budget standard`` with
  ``--standard``), split into fitting (the artifacts' own fit times) and the rest (evaluation
  along t, ensembles);
* ``modeconn evaluate`` of one artifact with the torch backend (the default) and with ONNX.

Writes ``benchmarks/PRACTICAL.md``.

    python -m benchmarks.practical [--work DIR] [--standard] [--endpoints A B]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_data(path: Path, *, copies: int = 3, train: int = 4500, seed: int = 0) -> Path:
    """Upsampled digits in a 28x28 frame at random offsets, ``copies`` of each, shuffled."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    up = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for _ in range(copies):
        frame = torch.zeros(len(x), 1, 28, 28)
        for i, (dy, dx) in enumerate(rng.integers(0, 5, size=(len(x), 2))):
            frame[i, 0, dy : dy + 24, dx : dx + 24] = up[i, 0]
        frames.append(frame.numpy())
        labels.append(digits.target)
    images, targets = np.concatenate(frames), np.concatenate(labels)
    order = rng.permutation(len(images))
    images, targets = images[order], targets[order]
    np.savez(
        path,
        x_train=images[:train],
        y_train=targets[:train],
        x_test=images[train:],
        y_test=targets[train:],
    )
    return path


def modeconn(*args: str) -> float:
    """Run ``python -m modeconn ARGS``; its wall time in seconds."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modeconn", "--quiet", *args], check=True)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/practical"))
    parser.add_argument("--endpoints", nargs=2, metavar=("A", "B"), help="CNN endpoints to use")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the endpoints")
    parser.add_argument("--standard", action="store_true", help="also time --budget standard")
    parser.add_argument("--out", type=Path, default=HERE / "PRACTICAL.md")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / "digits28.npz"
    if not data_file.exists():
        make_data(data_file)
    data = f"npz:{data_file}"
    if args.endpoints:
        a, b = args.endpoints
    else:
        a, b = str(work / "a.safetensors"), str(work / "b.safetensors")
        for seed, path in ((0, a), (1, b)):
            if not Path(path).exists():
                modeconn("train", "--model", "cnn", "--data", data, "--seed", str(seed),
                         "--epochs", str(args.epochs), "--out", path)  # fmt: skip

    lines = [
        "# A run on 28x28 data",
        "",
        "`python -m benchmarks.practical`: upsampled digits at 28x28 (4,500 training and 891 "
        "test images), two CNN endpoints (`--model cnn`, 32-64 channels, BatchNorm).",
        "",
        "| command | wall time | fitting | the rest (evaluation, ensembles) |",
        "|---|---|---|---|",
    ]
    budgets = ["quick", "standard"] if args.standard else ["quick"]
    for budget in budgets:
        out = work / f"compare-{budget}"
        table = work / f"compare-{budget}.json"
        wall = modeconn("compare", a, b, "--data", data, "--budget", budget, "--out", str(out),
                        "--no-reuse", "--json", str(table), "--plot", str(work / f"{budget}.png"))  # fmt: skip
        rows = json.loads(table.read_text())
        fitting = sum(r["seconds"] for r in rows)
        lines.append(
            f"| `compare --budget {budget}` ({len(rows)} paths) | {wall:.0f} s | {fitting:.0f} s "
            f"| {wall - fitting:.0f} s |"
        )
        for r in rows:
            lines.append(f"| &nbsp;&nbsp;{r['label']} | | {r['seconds']:.0f} s | |")
    artifact = str(work / "compare-quick" / "bezier")
    for backend in ("torch", "onnx"):
        wall = modeconn("evaluate", artifact, "--data", data, "--k", "2,4,8", "--backend", backend)
        lines.append(f"| `evaluate --k 2,4,8 --backend {backend}` (bezier) | {wall:.1f} s | | |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
