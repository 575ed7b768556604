"""``modeconn connect A B --method M --out DIR``: fit a path and save it as an artifact.

Each method's options are flags derived from its config; `modeconn connect --method M --help`
lists M's. ``--config F.yaml`` gives options from a file, ``--set KEY=VALUE`` any option, and
flags override both. A flag of another method is refused with the list of those that apply.

Under ``torchrun`` the fit runs in parallel (bezier and polychain data-parallel); rank 0
evaluates, writes the artifact and reports.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from modeconn.commands._common import (
    add_bn_examples,
    add_data,
    add_device,
    add_model,
    add_spec,
    load_pair,
    load_spec,
    resolve_device,
)
from modeconn.commands._options import (
    add_config_flags,
    add_method_flags,
    eval_points,
    method_config,
    requested_method,
)
from modeconn.fit.methods import METHODS, method_names

_DEFAULT = "linear"


def register(sub, argv: Sequence[str] = ()) -> None:
    names = method_names(endpoints=2)
    method, given = requested_method(argv, _DEFAULT)
    listing = "\n".join(f"  {name:10s} {METHODS[name].summary}" for name in names)
    p = sub.add_parser(
        "connect",
        help="fit a low-loss path between two endpoints",
        description=__doc__,
        # The method list on its own lines; shown until a method is chosen.
        epilog=None
        if given and method in names
        else f"methods:\n{listing}\n\n`modeconn connect --method M --help` shows M's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "a", help="endpoint A (.safetensors from `modeconn train`, or a plain state dict)"
    )
    p.add_argument("b", help="endpoint B (same architecture)")
    p.add_argument(
        "--method",
        default=_DEFAULT,
        metavar="M",
        help=f"one of: {', '.join(names)} (default: {_DEFAULT})",
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    add_data(p, default=None)
    add_model(p)
    p.add_argument("--align", action="store_true", help="permute B onto A (weight matching) first")
    add_spec(p)
    add_config_flags(
        p,
        checkpoint_default="the method's own: once per epoch for bezier and polychain, every "
        "500 steps for NEB and AutoNEB, 100 for geodesic",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit of --out")
    p.add_argument(
        "--eval-points",
        type=int,
        default=None,
        metavar="N",
        help="t values for the evaluation stored in the manifest (0: skip; default: 21 with "
        "--budget quick, else 61)",
    )
    add_bn_examples(p)
    add_device(p)
    if given and method in names:
        add_method_flags(p, method, refused=[m for m in names if m != method])
    else:  # no method named (or an unknown one, refused by run): every method's flags, hidden
        add_method_flags(p, None, refused=names)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn import distributed
    from modeconn.commands.eval_path import print_summary
    from modeconn.pipeline import fit_artifact

    names = method_names(endpoints=2)
    if args.method not in names:
        hint = (
            f"{args.method} starts from one endpoint: use `modeconn {args.method} A`"
            if args.method in METHODS
            else f"unknown method {args.method!r}"
        )
        raise ValueError(f"{hint}; methods between two endpoints: {', '.join(names)}")
    config = method_config(args, args.method)  # bad options fail before any file is read
    device = resolve_device(args.device)
    a, b, data = load_pair(args.a, args.b, args)
    artifact, metrics = fit_artifact(
        a,
        b,
        data,
        args.method,
        config=config,
        out=args.out,
        align=args.align,
        spec=load_spec(args.spec),
        device=device,
        progress=args.progress,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        eval_points=eval_points(args.eval_points, config.budget),
        bn_examples=args.bn_examples,
    )
    if not distributed.is_main():
        return 0  # rank 0 evaluated and wrote the artifact, and reports it
    fit = artifact.manifest.fit
    print(
        f"{args.out}: {args.method} path with {artifact.path.num_nodes} nodes, fitted in {fit['seconds']:.1f}s"
    )
    if metrics:
        print_summary(metrics)
    return 0
