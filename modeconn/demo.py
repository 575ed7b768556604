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

__all__ = ["main", "DEMO_METHODS", "DEMO_PARAMS"]

log = logging.getLogger("modeconn")

#: Methods the demo compares, and the options that keep the whole demo within minutes here.
DEMO_METHODS = ("linear", "bezier", "polychain", "neb", "autoneb", "geodesic")
DEMO_PARAMS: dict[str, dict] = {}
ENDPOINT_ARGS = {"width": 16, "depth": 2}


def _endpoints(out: Path, data, *, progress: bool) -> tuple[Path, Path]:
    import torch

    from modeconn.checkpoint import save_checkpoint
    from modeconn.train import TrainConfig, train_model
    from models import create_model

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

    from modeconn.checkpoint import load_checkpoint
    from modeconn.commands.compare import print_comparison
    from modeconn.compare import compare
    from modeconn.data import load_data
    from modeconn.methods import METHODS
    from modeconn.plots import plot_paths

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
    plot_paths(evaluations, plot, title="every method between two digits MLPs (64-16-16-10)")
    summary = {
        "endpoints": [str(file_a), str(file_b)],
        "paths": {row.label: row.artifact for row in rows},
        "comparison": [row.to_json() for row in rows],
        "plots": [str(plot)],
        "seconds": round(time.perf_counter() - begin, 1),
    }
    done_marker.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nplot: {plot}\nartifacts: {out}/paths/*   summary: {done_marker}")
    print(f"demo finished in {summary['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
