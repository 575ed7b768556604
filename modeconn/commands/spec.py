"""``modeconn spec --model NAME``: the permutation spec of a network, inferred and proven.

The spec says which axes of which tensors are renamed together when hidden units are permuted
(what weight matching searches over). It is derived from the network's traced graph, then
proven: a random permutation of every group must leave the outputs on real inputs unchanged
(float64). Give a checkpoint to prove it on those weights; otherwise it is proven on the model's
random initialisation, perturbed so that no tensor is trivially symmetric. ``--out`` writes the
JSON that ``--spec`` of ``align``, ``connect --align`` and ``compare`` reads; edit it to freeze or
tie groups by hand.
"""

from __future__ import annotations

import argparse

from modeconn.commands._common import (
    add_data,
    add_model,
    console,
    load_endpoint,
    model_spec,
    write_json,
)

# Tensors listed per group in the table; the JSON has them all.
_SHOWN = 3


def register(sub) -> None:
    p = sub.add_parser(
        "spec", help="infer, prove and show a network's permutation spec", description=__doc__
    )
    p.add_argument("checkpoint", nargs="?", help="an endpoint file to prove the spec on (optional)")
    add_model(p)
    add_data(p, default=None)
    p.add_argument("--out", metavar="FILE.json", help="write the spec as JSON")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse operations that are not understood, instead of leaving their inputs "
        "unpermuted",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random permutation check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeconn.data import load_data
    from modeconn.models.infer import infer_spec
    from modeconn.models.spec import spec_to_json
    from modeconn.models.verify import check_permutation_invariance, perturb_state

    if args.checkpoint:
        ckpt, data = load_endpoint(args.checkpoint, args)
        model, description = ckpt.build_model(), ckpt.model
    elif args.model:
        data = load_data(args.data or "digits")
        description = model_spec(args, data)
        model = description.build()
    else:
        raise ValueError(
            "give a checkpoint file or --model NAME (e.g. --model torchvision:resnet18)"
        )
    inputs = data.x_train[:32]
    inferred = infer_spec(model, inputs[:2], strict=args.strict)
    state = model.state_dict() if args.checkpoint else perturb_state(model, inputs, seed=args.seed)
    diff = check_permutation_invariance(model, inferred.spec, inputs, state=state, seed=args.seed)

    _print_groups(inferred)
    for line in inferred.frozen:
        print(f"left unpermuted: {line}")
    if inferred.unused:
        print(
            f"{len(inferred.unused)} tensors are not read by the forward pass in eval mode and "
            f"stay unpermuted: {', '.join(inferred.unused[:_SHOWN])}"
            + (" ..." if len(inferred.unused) > _SHOWN else "")
        )
    print(
        f"{description.name}: {inferred.summary()}; proven on {len(inputs)} inputs of "
        f"{data.name} (a random permutation changes the outputs by {diff:.1e}, relative)"
    )
    if args.out:
        write_json(
            args.out,
            {
                "model": description.to_json(),
                "spec": spec_to_json(inferred.spec),
                "groups": inferred.groups,
                "frozen": inferred.frozen,
                "unused": inferred.unused,
                "tracer": inferred.tracer,
                "check": {"inputs": len(inputs), "data": data.name, "max_relative_change": diff},
            },
        )
        print(f"wrote {args.out}")
    return 0


def _print_groups(inferred) -> None:
    from rich.table import Table

    members: dict[str, list[str]] = {g: [] for g in inferred.groups}
    for key, axes in inferred.spec.items():
        for axis, entry in enumerate(axes):
            segments = [(entry, 0, 0)] if isinstance(entry, str) else entry or []
            for group, _, _ in segments:
                if group is not None and f"{key}[{axis}]" not in members[group]:
                    members[group].append(f"{key}[{axis}]")
    table = Table(title="permutation groups", show_lines=False)
    table.add_column("group")
    table.add_column("size", justify="right")
    table.add_column("tensors [axis]")
    for group, size in inferred.groups.items():
        shown = members[group][:_SHOWN]
        more = len(members[group]) - len(shown)
        table.add_row(group, str(size), ", ".join(shown) + (f" (+{more} more)" if more else ""))
    console().print(table)
