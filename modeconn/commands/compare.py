"""``modeconn compare A B``: every connection method on the same endpoints, in one table and one plot."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.table import Table

from modeconn.commands._common import (
    add_bn_examples,
    add_data,
    add_device,
    add_model,
    add_spec,
    console,
    load_pair,
    load_spec,
    resolve_device,
    write_json,
)
from modeconn.commands._options import eval_points
from modeconn.fit.configs import BUDGETS, MethodConfig
from modeconn.fit.methods import make_config, method_names


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare connection methods side by side", description=__doc__
    )
    p.add_argument("a", help="endpoint A (.safetensors, or a plain state dict with --model)")
    p.add_argument("b", help="endpoint B")
    add_data(p, default=None)
    add_model(p)
    add_spec(p)
    p.add_argument(
        "--methods",
        default=",".join(method_names(endpoints=2)),
        help="comma-separated (default: every method between two endpoints, %(default)s)",
    )
    p.add_argument(
        "--out", default="runs/compare", help="folder for the artifacts (default: %(default)s)"
    )
    p.add_argument(
        "--no-align", action="store_true", help="connect A to B as it is (no weight matching)"
    )
    p.add_argument(
        "--no-reuse", action="store_true", help="refit even when a matching artifact exists"
    )
    p.add_argument(
        "--config",
        metavar="F.yaml",
        help="per-method options, a YAML mapping {method: {option: value}} "
        "(`modeconn connect --method M --help` lists M's options)",
    )
    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default=None,
        help="how long every method fits, unless --config gives its length: quick (minutes on "
        "a few thousand 28x28 images), standard (the default), or paper (the papers' epochs); "
        "`modeconn connect --method M --help` gives M's lengths",
    )
    p.add_argument(
        "--k", type=int, default=4, help="ensemble size for the accuracy/NLL columns (0: skip)"
    )
    p.add_argument(
        "--points",
        type=int,
        default=None,
        metavar="N",
        help="t values per path (default: 21 with --budget quick, else 61)",
    )
    p.add_argument("--json", metavar="F", help="write the table as JSON")
    p.add_argument("--plot", metavar="F.png", help="train and test loss along t for every method")
    add_bn_examples(p)
    add_device(p)
    p.set_defaults(func=run)


def print_comparison(rows) -> None:
    table = Table(title="connection methods, same endpoints", show_edge=False)
    for col in (
        "#",
        "path",
        "loss barrier",
        "vs mean",
        "err barrier",
        "worst test err",
        "len (w)",
        "len (pred)",
        "time",
    ):
        table.add_column(col, justify="right")
    has_ensemble = any(r.ensemble_acc is not None for r in rows)
    if has_ensemble:
        table.add_column(f"ens K={rows[0].ensemble_k} acc", justify="right")
        table.add_column("ens NLL", justify="right")
    for r in rows:
        cells = [
            str(r.rank or "-"),
            r.label,
            f"{r.loss_barrier_linear:.4f}",
            f"{r.loss_barrier:.4f}",
            f"{100 * r.error_barrier_linear:.2f}",
            f"{100 * r.worst_test_error:.2f}%",
            f"{r.weight_length:.2f}",
            f"{r.prediction_length:.3f}",
            f"{r.seconds:.1f}s" + (" (cached)" if r.reused else ""),
        ]
        if has_ensemble:
            cells += [
                f"{100 * r.ensemble_acc:.2f}%" if r.ensemble_acc is not None else "-",
                f"{r.ensemble_nll:.4f}" if r.ensemble_nll is not None else "-",
            ]
        table.add_row(*cells)
    console().print(table)
    print(
        "ranked by loss barrier: max over t of train loss minus (1-t) L(0) + t L(1), the chord of the "
        "endpoint losses; vs mean: max train loss minus the endpoints' mean (never below half their "
        "gap, so near-flat paths tie there); err barrier: test error above its chord, in points"
    )


def method_params(
    path: str | None, *, budget: str | None = None, methods: Sequence[str] = ()
) -> dict[str, MethodConfig]:
    """The per-method options in ``path`` (with ``budget`` for each of ``methods`` unless the
    file sets one), each validated (once) into its method's config."""
    from modeconn.fit.configs import read_options

    params = read_options(path) if path is not None else {}
    for method, options in params.items():
        if not isinstance(options, dict):
            raise ValueError(
                f"{path} must map method names to option mappings; {method!r} maps to "
                f"{type(options).__name__}"
            )
    if budget is not None:
        for method in methods:
            params[method] = {"budget": budget, **params.get(method, {})}
    # bad options fail here, before any file is read
    return {method: make_config(method, **options) for method, options in params.items()}


def run(args: argparse.Namespace) -> int:
    from modeconn.compare import compare
    from modeconn.plots import plot_paths

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    params = method_params(args.config, budget=args.budget, methods=methods)
    a, b, data = load_pair(args.a, args.b, args)
    rows, evaluations = compare(
        a,
        b,
        data,
        methods,
        out_dir=args.out,
        align=not args.no_align,
        params=params,
        ensemble_k=args.k,
        device=resolve_device(args.device),
        progress=args.progress,
        reuse=not args.no_reuse,
        eval_points=eval_points(args.points, args.budget or "standard"),
        spec=load_spec(args.spec),
        bn_examples=args.bn_examples,
    )
    print_comparison(rows)
    if args.json:
        write_json(args.json, [r.to_json() for r in rows])
        print(f"wrote {args.json}")
    if args.plot:
        plot_paths(evaluations, args.plot, title=f"methods between {args.a} and {args.b}")
        print(f"wrote {args.plot}")
    return 0
