"""``modeconn evaluate DIR...``: ensembles and merges against the endpoints, on the test set.

For each artifact: endpoint A, endpoint B, the ensemble of A and B, the straight-line midpoint
(BatchNorm reset), the path's midpoint, and the path's ensembles of each K (an FGE artifact: its
members and ensembles) — accuracy, NLL, Brier, ECE (15 bins) and member disagreement.

Computed by torch by default; ``--backend onnx`` runs the same networks with onnxruntime, from
the artifact's serving bundle where it holds them (``modeconn serve-build``), else from graphs
exported for the run (the same numbers, slower). One log line per artifact.

``--cascade``: the path's K members (``--k``, one value, default 8) as a confidence cascade
(:mod:`modeconn.cascade`): every member's probabilities are computed once and the cascade is
replayed for each of ``--thresholds`` under ``--rule``; accuracy, NLL and ECE are reported
against the average cost (members run per input), beside the plain ensembles of the first
1..K members in cascade order. The suggested threshold (the cheapest whose labels agree with
the full ensemble's on all but 0.1 % of the inputs) is chosen on one seeded half of the split
and reported on the other half.
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
    comma_list,
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
        "--k",
        default=None,
        help="ensemble sizes, comma-separated (default: 2,4,8; with --cascade one K, default 8)",
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
    p.add_argument(
        "--cascade",
        action="store_true",
        help="evaluate the K members as a cascade: cost against accuracy, NLL and ECE",
    )
    p.add_argument(
        "--rule",
        default=None,
        metavar="RULE",
        help="with --cascade, when an input leaves: confidence (the running mean's top "
        "probability >= threshold) or agree (the first threshold members agree) "
        "(default: confidence)",
    )
    p.add_argument(
        "--thresholds",
        default=None,
        metavar="T,...",
        help="with --cascade, thresholds to sweep, comma-separated (default: "
        "0.5,0.6,...,0.999,1 for confidence; 2..K for agree)",
    )
    add_device(p)
    p.set_defaults(func=run)


def parse_ks(text: str) -> list[int]:
    ks = comma_list(text, int, "--k expects comma-separated positive integers such as 2,4,8")
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


def parse_thresholds(text: str) -> list[float]:
    values = comma_list(
        text, float, "--thresholds expects comma-separated numbers such as 0.8,0.9,0.95"
    )
    if not values:
        raise ValueError(f"--thresholds expects at least one number, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    if args.cascade:
        return _run_cascade(args)
    if args.rule is not None or args.thresholds is not None:
        raise ValueError("--rule and --thresholds go with --cascade")
    return _run_rows(args)


def _run_rows(args: argparse.Namespace) -> int:
    from modeconn.plots import plot_ensembles
    from modeconn.report import evaluate_artifact

    ks = parse_ks(args.k or "2,4,8")
    device = resolve_device(args.device)
    results: dict[str, list[dict]] = {}
    for directory, artifact, data in _load(args):
        m = artifact.manifest
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


def _load(args: argparse.Namespace):
    """(directory, artifact, dataset) for every DIR, data loaded once per spec."""
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import Dataset, load_data

    datasets: dict[str, Dataset] = {}
    out = []
    for directory in args.dirs:
        artifact = load_artifact(directory)
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
        out.append((directory, artifact, data))
    return out


def print_cascade(title: str, sweep) -> None:
    table = Table(
        title=title,
        caption="cost: members run per input; plain K: the first K members in cascade order",
        show_edge=False,
    )
    for col in ("", "cost", "accuracy", "NLL", "ECE", "inputs leaving after 1, 2, ... members"):
        table.add_column(col, justify="right")
    for p in [*sweep.cascade, *sweep.plain]:
        table.add_row(
            p.label,
            f"{p.cost:.3f}",
            f"{100 * p.accuracy:.2f}%",
            f"{p.nll:.4f}",
            f"{100 * p.ece:.2f}%",
            " ".join(str(c) for c in p.members_used) if p.threshold is not None else "",
        )
    console().print(table)
    s = sweep.suggestion
    if s is None:
        print(
            f"suggested threshold: none; even the highest differs from the K={sweep.k} "
            "ensemble by more than 0.1 point on the choosing half"
        )
        return
    print(
        f"suggested threshold: {sweep.rule} {s.threshold:g}: accuracy {100 * s.accuracy:.2f}% "
        f"vs {100 * s.full_accuracy:.2f}% for the K={sweep.k} ensemble (same label on "
        f"{100 * s.agreement:.1f}%) at cost {s.cost:.2f} (chosen on {s.choose_n} inputs, "
        f"reported on the other {s.report_n}; seed {s.seed})"
    )


def _run_cascade(args: argparse.Namespace) -> int:
    from modeconn.cascade import RULES, StopRule
    from modeconn.cascade_eval import cascade_member_probs, default_thresholds, sweep_cascade
    from modeconn.plots import plot_cascade

    ks = parse_ks(args.k or "8")
    if len(ks) != 1:
        raise ValueError(f"--cascade takes one ensemble size K, such as --k 8, got {args.k!r}")
    k = ks[0]
    rule = args.rule or "confidence"
    if rule not in RULES:
        raise ValueError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    if args.backend != "torch":
        raise ValueError("--cascade runs on torch only: drop --backend onnx")
    thresholds = (
        parse_thresholds(args.thresholds) if args.thresholds else default_thresholds(rule, k)
    )
    for th in thresholds:
        StopRule(rule, th)  # type: ignore[arg-type]  # a bad threshold fails before any work
    device = resolve_device(args.device)
    results: dict[str, dict] = {}
    for directory, artifact, data in _load(args):
        ts, probs = cascade_member_probs(artifact, data, k, split=args.split, device=device)
        _, y = data.split(args.split)
        sweep = sweep_cascade(probs, y.numpy(), rule, thresholds, ts=ts)
        m = artifact.manifest
        ordered = ", ".join(f"{t:.3g}" for t in ts)
        print_cascade(
            f"{directory}: cascade of the K={k} {m.method} path ensemble of {m.model.name} on "
            f"{data.name} ({args.split} set; members at t = {ordered})",
            sweep,
        )
        if (s := sweep.suggestion) is not None:
            print(
                f"serve it: modeconn serve-build {directory} --cascade {k} --cascade-rule "
                f"{rule} --cascade-threshold {s.threshold:g}"
            )
        results[Path(directory).name] = sweep.to_json()
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        plot_cascade(results, args.plot, title=f"cascades along paths ({args.split} set)")
        print(f"wrote {args.plot}")
    return 0
