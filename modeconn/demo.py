"""The end-to-end demo on the bundled digits (``make demo``; ``make serve`` builds with it).

train two endpoints -> align -> compare every method -> evaluate ensembles -> export the best
path's ensemble and midpoint to ONNX -> print the tables and where everything was written.
The endpoints are narrow MLPs (64-16-16-10): there, unlike for wide ones, alignment alone does
not flatten the straight path, so the methods have something to show.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from modeconn.fit.configs import DEFAULT_CYCLES

if TYPE_CHECKING:
    from modeconn.compare import ComparisonRow

__all__ = ["main", "DEMO_METHODS", "DEMO_PARAMS"]

log = logging.getLogger("modeconn")

#: Methods the demo compares, and the options that keep the whole demo within minutes here.
DEMO_METHODS = ("linear", "bezier", "polychain", "neb", "autoneb", "geodesic")
#: The lengths are fixed here, not left to the budget: digits epochs are 11 steps, and these
#: give each method room to converge in about a minute in all.
DEMO_PARAMS: dict[str, dict] = {
    "bezier": {"epochs": 200},
    "polychain": {"epochs": 200},
    "neb": {"steps": 1500},
    "autoneb": {"cycles": [c.model_copy(update={"steps": 300}) for c in DEFAULT_CYCLES]},
    # The paper's plain SGD (the method's default) barely moves an aligned, already-low path in
    # 1,500 steps; Adam with a cosine schedule does (peak train loss 0.047 -> 0.023 here).
    "geodesic": {"steps": 1500, "optimizer": "adam", "schedule": "cosine", "lr": 1e-3},
}
DEMO_FGE = {"cycles": 6}
DEMO_KS = (2, 3, 4, 5, 8)
#: Graphs built for the HTTP service per artifact (each export is checked against torch).
SERVE_KS = (2, 4, 5)
SERVE_TS = (0.0, 0.5, 1.0)
ENDPOINT_ARGS = {"width": 16, "depth": 2}


def _endpoints(out: Path, data, *, progress: bool) -> tuple[Path, Path]:
    import torch

    from modeconn.checkpoint import save_checkpoint
    from modeconn.models import create_model
    from modeconn.train import TrainConfig, train_model

    files = []
    for seed in (0, 1):
        path = out / "endpoints" / f"mlp16_seed{seed}.safetensors"
        if not path.exists():
            torch.manual_seed(seed)
            model = create_model("mlp", data.input_shape, data.num_classes, **ENDPOINT_ARGS)
            config = TrainConfig(epochs=100, seed=seed)
            metrics = train_model(model, data, config, progress=progress)
            save_checkpoint(
                path,
                model,
                data=data.name,
                data_fingerprint=data.fingerprint(),
                seed=seed,
                train=config.__dict__,
                metrics=metrics,
            )
            print(
                f"trained {path}: test acc {metrics['test_acc']:.4f}, test loss {metrics['test_loss']:.4f}"
            )
        files.append(path)
    return files[0], files[1]


def _artifact_dir(row: ComparisonRow) -> str:
    """Where ``row``'s path was written (``compare`` writes one for every row it returns)."""
    if row.artifact is None:
        raise ValueError(f"{row.label}: the comparison wrote no artifact")
    return row.artifact


def _export_and_check(artifact_dir: Path, onnx_dir: Path, label: str, data) -> dict:
    """Export the K=5 ensemble and the midpoint; their test accuracy/NLL by onnxruntime and torch."""
    import numpy as np
    import torch.nn.functional as F

    from modeconn.ensemble import Ensemble
    from modeconn.export import export_ensemble, export_merged
    from modeconn.runtime import OnnxModel

    x, y = data.x_test, data.y_test
    ensemble = Ensemble.from_artifact(artifact_dir, 5, inputs=data.x_train)
    torch_lp = {"ensemble K=5": ensemble.predict(x).log_probs}
    mid = Ensemble.from_artifact(artifact_dir, 1, inputs=data.x_train)  # K=1 is the midpoint
    torch_lp["midpoint t=0.5"] = mid.predict(x).log_probs
    files = {
        "ensemble K=5": export_ensemble(
            artifact_dir, onnx_dir / f"{label}_ensemble_k5.onnx", 5, inputs=data.x_train
        ).path,
        "midpoint t=0.5": export_merged(
            artifact_dir, onnx_dir / f"{label}_midpoint.onnx", 0.5, inputs=data.x_train
        ).path,
    }
    report = {}
    for name, file in files.items():
        lp = np.asarray(OnnxModel(file).run(x.numpy())["log_probabilities"])
        onnx_acc = float((lp.argmax(-1) == y.numpy()).mean())
        onnx_nll = float(-lp[np.arange(len(y)), y.numpy()].mean())
        t_lp = torch_lp[name]
        torch_acc = float((t_lp.argmax(-1) == y).float().mean())
        torch_nll = float(F.nll_loss(t_lp, y))
        report[name] = {
            "file": str(file),
            "onnx": [onnx_acc, onnx_nll],
            "torch": [torch_acc, torch_nll],
        }
        print(
            f"{label} {name}: onnxruntime acc {100 * onnx_acc:.2f}% NLL {onnx_nll:.4f} | "
            f"torch acc {100 * torch_acc:.2f}% NLL {torch_nll:.4f}  -> {file}"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeconn.demo", description=__doc__)
    parser.add_argument(
        "--out", default="artifacts", help="where to write everything (default: artifacts)"
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing if the artifacts already exist"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    out = Path(args.out)
    done_marker = out / "demo.json"
    if args.if_missing and done_marker.exists():
        print(f"artifacts found in {out}/ (delete {done_marker} to rebuild)")
        return 0
    progress = not args.quiet and sys.stderr.isatty()
    begin = time.perf_counter()

    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import load_checkpoint
    from modeconn.commands.compare import print_comparison
    from modeconn.commands.evaluate import print_rows
    from modeconn.compare import compare
    from modeconn.data import load_data
    from modeconn.fit.methods import METHODS
    from modeconn.pipeline import fit_artifact
    from modeconn.plots import plot_ensembles, plot_paths
    from modeconn.report import evaluate_artifact

    data = load_data("digits")
    file_a, file_b = _endpoints(out, data, progress=progress)
    a, b = load_checkpoint(file_a), load_checkpoint(file_b)
    methods = [m for m in DEMO_METHODS if m in METHODS]
    rows, evaluations = compare(
        a,
        b,
        data,
        methods,
        out_dir=out / "paths",
        align=True,
        params=DEMO_PARAMS,
        device=args.device,
        progress=progress,
    )
    print()
    print_comparison(rows)
    plot = out / "compare.png"
    plot_paths(
        evaluations, plot, title="every method between two digits MLPs (64-16-16-10), aligned"
    )
    plots = [plot]

    # Fast Geometric Ensembling from endpoint A: the other way to get many members cheaply.
    fge_dir = out / "paths" / "fge"
    if not (fge_dir / "manifest.json").exists():
        fit_artifact(
            a,
            None,
            data,
            "fge",
            params=DEMO_FGE,
            out=fge_dir,
            device=args.device,
            progress=progress,
        )

    # Ensembles and merges, against the endpoints, on the test set.
    fitted = {row.label: row for row in rows}
    curved = [r for r in rows if r.method not in ("linear",) and r.aligned]
    # compare ranks by the loss barrier above the chord of the endpoint losses (rank 1 = lowest)
    best = min(curved, key=lambda r: r.rank) if curved else fitted["linear"]
    to_evaluate = dict.fromkeys(["bezier", best.label, "linear"])
    results = {}
    for label in to_evaluate:
        if label in fitted:
            rows_eval = evaluate_artifact(
                _artifact_dir(fitted[label]), data, DEMO_KS, backend="torch", device=args.device
            )
            print_rows(f"{label} path: ensembles and merges (test set)", rows_eval)
            results[label] = [r.to_json() for r in rows_eval]
    fge_rows = evaluate_artifact(fge_dir, data, DEMO_KS, backend="torch", device=args.device)
    print_rows("FGE from endpoint A (test set)", fge_rows)
    results["fge"] = [r.to_json() for r in fge_rows]
    plot_ens = out / "ensembles.png"
    plot_ensembles(
        results, plot_ens, title="ensembles along paths vs the endpoints (digits test set)"
    )
    plots.append(plot_ens)

    # Export the best path's ensemble (and Bezier's, when they differ) and midpoint to ONNX, and
    # check onnxruntime against torch on the test set.
    exports = {}
    print()
    for label in dict.fromkeys(["bezier", best.label]):
        if label not in fitted:
            continue
        exports[label] = _export_and_check(
            Path(_artifact_dir(fitted[label])), out / "onnx", label, data
        )

    # The loss plane through the Bezier curve's three nodes (Garipov et al., Figure 1).
    if "bezier" in fitted:
        from modeconn.plane import loss_plane, plot_plane

        artifact = load_artifact(_artifact_dir(fitted["bezier"]))
        plane = loss_plane(artifact.build_model(), artifact.path, data, grid=21, progress=progress)
        plot_plane(
            plane, out / "plane_bezier.png", title="train loss on the plane of the Bezier curve"
        )
        plots.append(out / "plane_bezier.png")

    # What `make serve` serves: one ONNX graph per ensemble size and merged t, per artifact.
    from modeconn.serving import build_serving

    for directory in [Path(_artifact_dir(r)) for r in rows] + [fge_dir]:
        build_serving(directory, ks=SERVE_KS, ts=SERVE_TS)

    summary = {
        "endpoints": [str(file_a), str(file_b)],
        "paths": {row.label: row.artifact for row in rows} | {"fge": str(fge_dir)},
        "comparison": [row.to_json() for row in rows],
        "best": best.label,
        "evaluation": results,
        "onnx": exports,
        "plots": [str(p) for p in plots],
        "seconds": round(time.perf_counter() - begin, 1),
    }
    done_marker.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"best path (lowest loss barrier above the endpoints' chord): {best.label}")
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"artifacts: {out}/paths/*   ONNX: {out}/onnx/*   summary: {done_marker}")
    print(f"demo finished in {summary['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
