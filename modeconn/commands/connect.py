"""``modeconn connect A B --method M --out DIR``: fit a path and save it as an artifact.

Method options are derived from the methods' configs: every option of every method is a flag,
and a flag that does not apply to the chosen method is refused with the list of those that do.
``--config F.yaml`` gives options from a file (flags override it).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import yaml

from modeconn.commands._common import (
    add_data,
    add_device,
    add_model,
    add_spec,
    load_pair,
    load_spec,
    parse_kv,
    resolve_device,
)
from modeconn.methods import METHODS

_SKIP = {"seed"}  # a common flag, added once below


def _option_fields() -> dict[str, tuple[type, str]]:
    """Every scalar option of every method: name -> (type, help)."""
    fields: dict[str, tuple[type, str]] = {}
    for method in METHODS.values():
        for name, info in method.config.model_fields.items():
            if name in _SKIP or name in fields:
                continue
            kind = _scalar_type(info.annotation)
            if kind is None:
                continue  # lists and nested schedules come from --config
            users = [m.name for m in METHODS.values() if name in m.config.model_fields]
            fields[name] = (kind, f"{info.description or name} (methods: {', '.join(users)})")
    return fields


def _scalar_type(annotation) -> type | None:
    if annotation in (int, float, str, bool):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, str, bool):
        return args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return None


def register(sub) -> None:
    p = sub.add_parser(
        "connect", help="fit a low-loss path between two endpoints", description=__doc__
    )
    p.add_argument(
        "a", help="endpoint A (.safetensors from `modeconn train`, or a plain state dict)"
    )
    p.add_argument("b", help="endpoint B (same architecture)")
    p.add_argument(
        "--method", default="linear", help=f"one of: {', '.join(METHODS)} (default: linear)"
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    add_data(p, default=None)
    add_model(p)
    p.add_argument("--align", action="store_true", help="permute B onto A (weight matching) first")
    add_spec(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", metavar="F.yaml", help="method options from a YAML file")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any method option, repeatable"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted fit of --out")
    p.add_argument(
        "--eval-points",
        type=int,
        default=61,
        help="t values for the evaluation stored in the manifest (0: skip)",
    )
    add_device(p)
    group = p.add_argument_group("method options")
    for name, (kind, help_text) in _option_fields().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag,
                dest=f"opt_{name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(flag, dest=f"opt_{name}", type=kind, default=None, help=help_text)
    p.set_defaults(func=run)


def method_params(args: argparse.Namespace) -> dict:
    """Options for ``args.method`` from --config, then --set, then flags; refuse stray flags."""
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; available: {', '.join(METHODS)}")
    params: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{path} must hold a mapping of option: value, got {type(loaded).__name__}"
            )
        params.update(loaded)
    params.update(parse_kv(args.set, "--set"))
    fields = METHODS[args.method].config.model_fields
    for key, value in vars(args).items():
        if not key.startswith("opt_") or value is None:
            continue
        name = key[4:]
        if name not in fields:
            valid = (
                ", ".join("--" + f.replace("_", "-") for f in fields if f not in _SKIP) or "none"
            )
            raise ValueError(
                f"--{name.replace('_', '-')} does not apply to method {args.method!r} (its options: {valid})"
            )
        params[name] = value
    params["seed"] = args.seed
    return params


def run(args: argparse.Namespace) -> int:
    from modeconn.commands.eval_path import print_summary
    from modeconn.pipeline import fit_artifact

    params = method_params(args)
    device = resolve_device(args.device)
    a, b, data = load_pair(args.a, args.b, args)
    artifact, metrics = fit_artifact(
        a,
        b,
        data,
        args.method,
        out=args.out,
        align=args.align,
        spec=load_spec(args.spec),
        params=params,
        device=device,
        progress=args.progress,
        resume=args.resume,
        eval_points=args.eval_points,
    )
    fit = artifact.manifest.fit
    print(
        f"{args.out}: {args.method} path with {artifact.path.num_nodes} nodes, fitted in {fit['seconds']:.1f}s"
    )
    if metrics:
        print_summary(metrics)
    return 0
