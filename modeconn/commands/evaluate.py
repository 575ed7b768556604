"""``modeconn evaluate DIR...``: ensembles and merges against the endpoints, on the test set.

For each artifact: endpoint A, endpoint B, the ensemble of A and B, the straight-line midpoint
(BatchNorm reset), the path's midpoint, and the path's ensembles of each K (an FGE artifact: its
members and ensembles) — accuracy, NLL, Brier, ECE (15 bins) and member disagreement.

Computed by torch by default; ``--backend onnx`` runs the same networks with onnxruntime, from
the artifact's serving bundle where it holds them (``modeconn serve-build``), else from graphs
exported for the run (the same numbers, slower). One log line per artifact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from modeconn.commands._common import (
    add_bn_examples,
    add_data,
    add_device,
    bn_examples_for,
    check_data_fits,
    console,
    resolve_device,
    write_json,
)


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate ensembles and merges of path artifacts", description=__doc__
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="artifact directories")
    add_data(p, default=None)
    p.add_argument(
        "--k", default="2,4,8", help="ensemble sizes, comma-separated (default: %(default)s)"
    )
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx"),
        help="who computes: torch, or onnxruntime on the serving bundle's graphs where there is "
        "one, else on graphs exported for the run (default: torch)",
    )
    add_bn_examples(p, recorded=True)
    p.add_argument("--json", metavar="F", help="write every row as JSON")
    p.add_argument(
        "--plot", metavar="F.png", help="accuracy and NLL against K, reliability diagram"
    )
    add_device(p)
    p.set_defaults(func=run)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(
            f"--k expects comma-separated positive integers such as 2,4,8, got {text!r}"
        ) from err
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--k expects positive integers such as 2,4,8, got {text!r}")
    return ks


def print_rows(name: str, rows) -> None:
    table = Table(title=name, show_edge=False)
    for col in ("", "K", "accuracy", "NLL", "Brier", "ECE", "disagreement"):
        table.add_column(col, justify="right")
    for row in rows:
        m = row.metrics
        table.add_row(
            row.label,
            str(row.k),
            f"{100 * m['accuracy']:.2f}%",
            f"{m['nll']:.4f}",
            f"{m['brier']:.4f}",
            f"{100 * m['ece']:.2f}%",
            f"{m.get('disagreement', 0.0):.4f}",
        )
    console().print(table)


def run(args: argparse.Namespace) -> int:
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import Dataset, load_data
    from modeconn.plots import plot_ensembles
    from modeconn.report import evaluate_artifact

    ks = parse_ks(args.k)
    device = resolve_device(args.device)
    artifacts = [(d, load_artifact(d)) for d in args.dirs]  # fail early on a bad directory
    datasets: dict[str, Dataset] = {}
    results: dict[str, list[dict]] = {}
    for directory, artifact in artifacts:
        m = artifact.manifest
        if args.bn_examples is not None:  # instead of the artifact's own
            artifact.manifest = m = m.model_copy(
                update={"bn_examples": bn_examples_for(args, m.bn_examples)}
            )
        spec = args.data or artifact.data_spec()
        if spec not in datasets:
            datasets[spec] = load_data(spec)
        data = datasets[spec]
        check_data_fits(data, Checkpoint(state={}, model=m.model_spec(), meta={"file": directory}))
        rows = evaluate_artifact(
            artifact, data, ks, split=args.split, backend=args.backend, device=device
        )
        name = Path(directory).name
        print_rows(
            f"{directory}: {m.method} path of {m.model.name} on {data.name} ({args.split} set, {args.backend})",
            rows,
        )
        results[name] = [r.to_json() for r in rows]
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        plot_ensembles(results, args.plot, title=f"ensembles along paths ({args.split} set)")
        print(f"wrote {args.plot}")
    return 0
