"""``modeconn eval-path DIR``: loss and accuracy along a path, barriers and lengths."""

from __future__ import annotations

import argparse

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
    p = sub.add_parser("eval-path", help="evaluate a path artifact along t", description=__doc__)
    p.add_argument("dir", help="artifact directory")
    add_data(p, default=None)
    p.add_argument("--points", type=int, default=61, help="evenly spaced t values (default: 61)")
    p.add_argument("--json", metavar="F", help="write the evaluation as JSON")
    p.add_argument("--plot", metavar="F.png", help="plot loss and error along t")
    p.add_argument(
        "--every", type=int, default=None, help="print every n-th row (default: about 13 rows)"
    )
    add_bn_examples(p, recorded=True)
    add_device(p)
    p.set_defaults(func=run)


def print_table(ev: dict, every: int | None = None) -> None:
    ts = ev["ts"]
    step = every or max(1, len(ts) // 12)
    table = Table(title="along the path", show_edge=False)
    for col in ("t", "train loss", "train acc", "test loss", "test acc"):
        table.add_column(col, justify="right")
    rows = sorted(set(range(0, len(ts), step)) | {len(ts) - 1, ev["loss_barrier"]["t_peak_index"]})
    for i in rows:
        table.add_row(
            f"{ts[i]:.3f}",
            f"{ev['train_loss'][i]:.4f}",
            f"{ev['train_acc'][i]:.4f}",
            f"{ev['test_loss'][i]:.4f}",
            f"{ev['test_acc'][i]:.4f}",
        )
    console().print(table)


def print_summary(ev: dict) -> None:
    lb, eb = ev["loss_barrier"], ev["error_barrier"]
    # Older artifacts' metrics lack the barrier above the chord.
    loss_chord = f", {lb['linear']:.4f} above the chord" if "linear" in lb else ""
    error_chord = f", {100 * eb['linear']:.2f} above the chord" if "linear" in eb else ""
    print(
        f"loss barrier (train): {lb['mean']:.4f} above the endpoints' mean, {lb['max']:.4f} above the worse"
        f"{loss_chord} (peak {lb['peak']:.4f} at t={ev['ts'][lb['t_peak_index']]:.3f})"
    )
    print(
        f"error barrier (test): {100 * eb['mean']:.2f} points above the mean, {100 * eb['max']:.2f} above "
        f"the worse{error_chord}; worst test error {100 * ev['worst_test_error']:.2f}%"
    )
    print(
        f"length: {ev['weight_length']:.4f} in weights, {ev['prediction_length']:.4f} in predictions (sum sqrt JSD)"
    )


def run(args: argparse.Namespace) -> int:
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import load_data
    from modeconn.evaluate import evaluate_path
    from modeconn.plots import plot_paths

    artifact = load_artifact(args.dir)
    m = artifact.manifest
    data = load_data(args.data or artifact.data_spec())
    check_data_fits(data, Checkpoint(state={}, model=m.model_spec(), meta={"file": args.dir}))
    model = artifact.build_model()
    # The stored statistics came from the same inputs unless other data or counts are asked.
    same = args.data is None and args.bn_examples is None
    ev = evaluate_path(
        model,
        artifact.path,
        data,
        points=args.points,
        device=resolve_device(args.device),
        progress=args.progress,
        bn_examples=bn_examples_for(args, m.bn_examples),
        buffers=artifact.buffers if same else None,
    ).to_json()
    print(
        f"{args.dir}: {m.method} path ({m.basis}, {m.num_nodes} nodes) of {m.model.name} on {data.name}"
    )
    print_table(ev, args.every)
    print_summary(ev)
    if args.json:
        write_json(args.json, {"artifact": str(args.dir), "method": m.method, **ev})
        print(f"wrote {args.json}")
    if args.plot:
        plot_paths(
            {m.method: ev}, args.plot, title=f"{m.method} path, {m.model.name} on {data.name}"
        )
        print(f"wrote {args.plot}")
    return 0
