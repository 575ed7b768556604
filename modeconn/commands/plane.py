"""``modeconn plane DIR --plot F.png``: the loss surface on the plane of a 3-node curve.

The plane through the curve's three nodes (A, the middle node, B), with the curve and the
straight line projected onto it and BatchNorm statistics recomputed at every grid point
(Garipov et al. 2018, Figure 1).
"""

from __future__ import annotations

import argparse

from modeconn.commands._common import (
    add_bn_examples,
    add_data,
    add_device,
    bn_examples_for,
    check_data_fits,
    resolve_device,
    write_json,
)


def register(sub) -> None:
    p = sub.add_parser(
        "plane", help="loss surface on the plane through a 3-node curve", description=__doc__
    )
    p.add_argument("dir", help="artifact directory of a 3-node bezier or polychain curve")
    add_data(p, default=None)
    p.add_argument("--grid", type=int, default=21, help="grid points per side (default: 21)")
    p.add_argument(
        "--margin",
        type=float,
        default=0.2,
        help="margin around the nodes, as a fraction of their extent (default: 0.2)",
    )
    p.add_argument(
        "--split", choices=("train", "test"), default="train", help="loss on which split"
    )
    p.add_argument("--plot", metavar="F.png", help="write the contour plot")
    p.add_argument("--json", metavar="F", help="write the grid and projections as JSON")
    add_bn_examples(p, recorded=True)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.artifact import load_artifact
    from modeconn.checkpoint import Checkpoint
    from modeconn.data import load_data
    from modeconn.plane import loss_plane, plane_basis, plot_plane

    if args.grid < 2:
        raise ValueError(f"--grid must be >= 2, got {args.grid}")
    artifact = load_artifact(args.dir)
    plane_basis(artifact.path)  # fail early on a path without a plane
    m = artifact.manifest
    data = load_data(args.data or artifact.data_spec())
    check_data_fits(data, Checkpoint(state={}, model=m.model_spec(), meta={"file": args.dir}))
    plane = loss_plane(
        artifact.build_model(),
        artifact.path,
        data,
        grid=args.grid,
        margin=args.margin,
        split=args.split,
        device=resolve_device(args.device),
        progress=args.progress,
        bn_examples=bn_examples_for(args, m.bn_examples),
    )
    out = plane.to_json()
    (ax, ay), (tx, ty), (bx, by) = plane.nodes
    print(
        f"{args.dir}: {m.method} curve, plane through A ({ax:.3f}, {ay:.3f}), "
        f"middle node ({tx:.3f}, {ty:.3f}), B ({bx:.3f}, {by:.3f})"
    )
    print(
        f"{args.split} loss on the {args.grid}x{args.grid} grid: min {out['min_loss']:.4f}, "
        f"max {out['max_loss']:.4f}"
    )
    if args.json:
        write_json(args.json, {"artifact": str(args.dir), "method": m.method, **out})
        print(f"wrote {args.json}")
    if args.plot:
        plot_plane(plane, args.plot, title=f"{m.method} curve, {m.model.name} on {data.name}")
        print(f"wrote {args.plot}")
    return 0
