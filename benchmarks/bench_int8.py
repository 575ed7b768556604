"""Benchmark int8 fused ensembles against fp32: throughput side by side, and accuracy.

Throughput: K=8 fused ensemble graphs (``modeconn.export``) of an MLP 64-256-256-10 (digits
shapes) and of ResNet-20 (CIFAR shapes, BatchNorm) are quantized with
:func:`modeconn.quantize.quantize_onnx` (static, QOperator, calibrated on 256 inputs) and timed
with the fp32 graph in the same interleaved rounds (medians; one thread, thread CPU time, as in
``bench_ensemble``) at batch 1 and 256. Members are random networks (the cost depends on shapes
only), so the accuracy columns of these rows are only the agreement with fp32.

Accuracy: real paths on digits. Two trained endpoints per model (MLP 64-256-256-10 and
ResNet-20 at digits shapes), the linear path between them, its K=8 ensemble in fp32 and int8
(calibrated on 256 seeded training inputs): test accuracy of each and their top-1 agreement.

Targets: int8 / fp32 images per second >= 1.5 at batch 256 (worst model); accuracy drop
<= 0.2 points (worst model).

    python benchmarks/bench_int8.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ensemble import CASES, _export, _interleaved, _members  # noqa: E402
from modeconn.quantize import calibration_sample, check_int8, quantize_onnx  # noqa: E402
from modeconn.runtime import OnnxModel  # noqa: E402

TARGET_SPEEDUP_B256 = 1.5
TARGET_ACCURACY_DROP = 0.2
K = 8


def _throughput(case: str, k: int, quick: bool, folder: Path) -> dict:
    name, shape, kwargs = CASES[case]
    members = _members(name, shape, kwargs, k)
    fp32_path = _export(members, shape, folder, f"{case}_fp32", fused=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, *shape)).astype(np.float32)  # (256, *shape)
    calibration = rng.standard_normal((256, *shape)).astype(np.float32)
    labels = np.zeros(len(x), dtype=np.int64)  # random members: only agreement means anything
    q = quantize_onnx(
        fp32_path,
        folder / f"{case}_int8.onnx",
        x_test=x,
        y_test=labels,
        calibration=calibration,
        force=True,
    )
    models = {
        "fp32": OnnxModel(fp32_path, device="cpu", intra_op_threads=1, log_level=logging.DEBUG),
        "int8": OnnxModel(q.path, device="cpu", intra_op_threads=1, log_level=logging.DEBUG),
    }
    rows = {}
    for batch in (1, 256):
        xb = x[:batch]
        if name == "resnet20":
            rounds, inner = (15, 3) if batch == 1 else (3 if quick else 5, 1)
        else:
            rounds, inner = (15 if quick else 40), (50 if batch == 1 else 10)
        fns: dict[str, Callable[[], object]] = {
            n: (lambda m=m, xb=xb: m.session.run(None, {m.input_name: xb}))
            for n, m in models.items()
        }
        wall, cpu = _interleaved(fns, rounds, inner)
        rows[f"{case} K={k} batch={batch}"] = {
            "fp32_images_per_s": batch / cpu["fp32"],
            "int8_images_per_s": batch / cpu["int8"],
            "int8/fp32": cpu["fp32"] / cpu["int8"],
            "int8/fp32 (wall)": wall["fp32"] / wall["int8"],
            "agreement_with_fp32": q.check.agreement,
            "size_ratio": q.size_bytes / q.fp32_size_bytes,
        }
    return rows


def _trained_pair(name: str, kwargs: dict, epochs: int, data, folder: Path) -> list[str]:
    from modeconn.checkpoint import save_checkpoint
    from modeconn.models import create_model
    from modeconn.train import TrainConfig, train_model

    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(name, data.input_shape, data.num_classes, **kwargs)
        metrics = train_model(model, data, TrainConfig(epochs=epochs, seed=seed))
        path = folder / f"{name}_{seed}.safetensors"
        save_checkpoint(path, model, data="digits", seed=seed, metrics=metrics)
        files.append(str(path))
    return files


def _accuracy(case: str, name: str, kwargs: dict, epochs: int, data, folder: Path) -> dict:
    from modeconn.checkpoint import load_checkpoint
    from modeconn.export import export_ensemble
    from modeconn.pipeline import fit_artifact

    a, b = (load_checkpoint(p) for p in _trained_pair(name, kwargs, epochs, data, folder))
    artifact = folder / f"{case}_path"
    fit_artifact(a, b, data, "linear", out=artifact, eval_points=0, served_ts=None)
    fp32_path = folder / f"{case}_acc_fp32.onnx"
    export_ensemble(artifact, fp32_path, K, inputs=data.x_train)
    x, y = data.x_test.numpy(), data.y_test.numpy()
    q = quantize_onnx(
        fp32_path,
        folder / f"{case}_acc_int8.onnx",
        x_test=x,
        y_test=y,
        calibration=calibration_sample(data.x_train.numpy(), 256, seed=0),
        force=True,
    )
    fp32 = OnnxModel(fp32_path, device="cpu", log_level=logging.DEBUG)
    int8 = OnnxModel(q.path, device="cpu", log_level=logging.DEBUG)
    check = check_int8(fp32, int8, x, y)
    return {
        "fp32_accuracy_percent": 100 * check.accuracy_fp32,
        "int8_accuracy_percent": 100 * check.accuracy_int8,
        "drop_points": check.accuracy_drop_points,
        "agreement_percent": 100 * check.agreement,
        "max_abs_prob_diff": check.max_abs_prob_diff,
        "test_examples": check.examples,
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """int8 vs fp32 fused K=8 ensembles: images/s at batch 1 and 256, and digits accuracy."""
    from modeconn.data import load_data

    if device != "cpu":
        raise ValueError(f"the int8 benchmark measures the CPU; got device={device!r}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = ("mlp_64-256-256-10",) if quick else tuple(CASES)
    k = 2 if quick else K
    throughput: dict[str, dict] = {}
    accuracy: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for case in cases:
                throughput.update(_throughput(case, k, quick, folder))
            data = load_data("digits")
            torch.set_num_threads(saved_threads)  # training: every core
            accuracy["mlp_64-256-256-10 digits"] = _accuracy(
                "mlp", "mlp", {"depth": 2, "width": 256}, 3 if quick else 30, data, folder
            )
            if not quick:
                accuracy["resnet20 digits"] = _accuracy(
                    "resnet20", "resnet20", {"width": 1, "norm": "bn"}, 8, data, folder
                )
    finally:
        torch.set_num_threads(saved_threads)
    b256 = [r["int8/fp32"] for key, r in throughput.items() if key.endswith("batch=256")]
    b1 = [r["int8/fp32"] for key, r in throughput.items() if key.endswith("batch=1")]
    return {
        "k": k,
        "clock": "thread CPU time, one onnxruntime thread",
        "throughput": throughput,
        "accuracy": accuracy,
        "min_int8_over_fp32_batch256": min(b256),
        "min_int8_over_fp32_batch1": min(b1),
        "max_accuracy_drop_points": max(r["drop_points"] for r in accuracy.values()),
        "targets": {
            "int8/fp32 images per second at batch 256": f">= {TARGET_SPEEDUP_B256}",
            "accuracy drop (points)": f"<= {TARGET_ACCURACY_DROP}",
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MLP only, K=2 (seconds)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(f"K={results['k']}, clock: {results['clock']} (medians)")
    print(f"{'case':<36} {'fp32 img/s':>11} {'int8 img/s':>11} {'int8/fp32':>9} {'wall':>6}")
    for case, r in results["throughput"].items():
        print(
            f"{case:<36} {r['fp32_images_per_s']:>11.0f} {r['int8_images_per_s']:>11.0f} "
            f"{r['int8/fp32']:>9.2f} {r['int8/fp32 (wall)']:>6.2f}"
        )
    print(f"{'accuracy':<26} {'fp32 %':>8} {'int8 %':>8} {'drop':>6} {'agree %':>8}")
    for case, r in results["accuracy"].items():
        print(
            f"{case:<26} {r['fp32_accuracy_percent']:>8.2f} {r['int8_accuracy_percent']:>8.2f} "
            f"{r['drop_points']:>6.2f} {r['agreement_percent']:>8.2f}"
        )
    print(
        f"worst int8/fp32 at batch 256: {results['min_int8_over_fp32_batch256']:.2f} "
        f"(target >= {TARGET_SPEEDUP_B256}); worst accuracy drop: "
        f"{results['max_accuracy_drop_points']:.2f} points (target <= {TARGET_ACCURACY_DROP})"
    )


if __name__ == "__main__":
    main()
