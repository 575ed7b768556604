"""``modeconn fge A --cycles N --cycle-epochs C --out DIR``: Fast Geometric Ensembling.

From the trained endpoint A, SGD with a triangular cyclical learning rate (lr1 -> lr2 at
mid-cycle -> lr1) collects one member at each low point (Garipov et al. 2018). The members are
saved as an artifact of kind ``points`` (same format as a path, BN statistics per member), which
the ensemble, export and serving commands use like points of a path.

Under ``torchrun`` the fit is data-parallel; rank 0 evaluates, writes the artifact and reports.
"""

from __future__ import annotations

import argparse

from modeconn.commands._common import (
    add_bn_examples,
    add_data,
    add_device,
    add_model,
    load_endpoint,
    resolve_device,
)
from modeconn.commands._options import add_config_flags, add_method_flags, method_config


def register(sub) -> None:
    p = sub.add_parser(
        "fge", help="Fast Geometric Ensembling from one trained endpoint", description=__doc__
    )
    p.add_argument(
        "a", help="trained endpoint (.safetensors from `modeconn train`, or a plain state dict)"
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    add_data(p, default=None)
    add_model(p)
    add_config_flags(p, checkpoint_default="once per epoch")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of --out")
    add_bn_examples(p)
    add_device(p)
    add_method_flags(p, "fge")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn import distributed
    from modeconn.pipeline import fit_artifact

    config = method_config(args, "fge")  # bad options fail before any file is read
    device = resolve_device(args.device)
    a, data = load_endpoint(args.a, args)
    artifact, metrics = fit_artifact(
        a,
        None,
        data,
        "fge",
        config=config,
        out=args.out,
        device=device,
        progress=args.progress,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        bn_examples=args.bn_examples,
    )
    if not distributed.is_main():
        return 0  # rank 0 evaluated and wrote the artifact, and reports it
    assert metrics is not None  # a point set's members are always evaluated
    fit = artifact.manifest.fit
    print(
        f"{args.out}: FGE ensemble of {artifact.path.num_nodes} members from {args.a}, "
        f"{fit['stats']['steps']} steps in {fit['seconds']:.1f}s"
    )
    accs = ", ".join(f"{100 * acc:.2f}" for acc in metrics["test_acc"])
    print(f"members' test accuracy (%): {accs}")
    ens, start = metrics["ensemble"], metrics["start"]
    print(
        f"ensemble: test acc {100 * ens['test_acc']:.2f}%, NLL {ens['test_nll']:.4f}; "
        f"start: test acc {100 * start['test_acc']:.2f}%, NLL {start['test_nll']:.4f}"
    )
    return 0
