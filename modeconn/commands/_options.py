"""A method's options as command-line flags, derived from its pydantic config.

Each method's scalar options become one flag group whose help is the config's ``Field``
descriptions and defaults; lists (AutoNEB's ``cycles``) come from ``--config F.yaml`` or
``--set``. A command that runs several methods (``connect``) shows only the chosen method's
group: :func:`requested_method` reads ``--method`` from the command line before the parser is
built, and the other methods' flags are still accepted, hidden, so that :func:`method_config`
can refuse them with a message that lists the flags that do apply.

Options are read from ``--config``, then ``--set KEY=VALUE``, then the flags (each overriding
the one before), and validated once into the method's frozen config. Torch-free.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic.fields import FieldInfo

from modeconn.commands._common import parse_kv
from modeconn.fit.configs import BUDGETS, EVAL_POINTS, MethodConfig, read_options
from modeconn.fit.methods import METHODS, make_config

__all__ = [
    "eval_points",
    "requested_method",
    "add_method_flags",
    "add_config_flags",
    "method_config",
    "option_flag",
]

_COMMON = ("seed", "budget")  # one flag each for every method, added by add_config_flags
_DEST = "opt_"  # argparse dest of option NAME: opt_NAME
_METAVARS = {int: "N", float: "X", str: "TEXT", bool: None}


def option_flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def requested_method(argv: Sequence[str], default: str) -> tuple[str, bool]:
    """The last ``--method X`` or ``--method=X`` in ``argv`` (before a ``--``), else ``default``;
    and whether one was given."""
    method, given = default, False
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--method" and i + 1 < len(argv):
            method, given = argv[i + 1], True
        elif arg.startswith("--method="):
            method, given = arg.partition("=")[2], True
    return method, given


def _flag_fields(config: type[MethodConfig]) -> dict[str, FieldInfo]:
    """The options of ``config`` that are flags: scalars, ``seed`` (a common flag) excluded."""
    return {
        name: info
        for name, info in config.model_fields.items()
        if name not in _COMMON and _scalar(info.annotation) is not None
    }


def _scalar(annotation: Any) -> tuple[type, tuple[str, ...]] | None:
    """(type, choices) of a scalar annotation (``int``, ``float | None``, a ``Literal``), or None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is not typing.Literal and len(args) == 1:
        annotation = args[0]  # X | None
    if annotation in (int, float, str, bool):
        return annotation, ()
    if typing.get_origin(annotation) is typing.Literal:
        return str, tuple(str(a) for a in typing.get_args(annotation))
    return None


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    if not info.is_required() and info.default_factory is None and info.default is not None:
        text += f" (default: {info.default})"  # a None default is explained by its description
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_method_flags(
    parser: argparse.ArgumentParser, method: str | None, *, refused: Iterable[str] = ()
) -> None:
    """A group of ``method``'s option flags (no group for None), titled with its summary.

    The options of the ``refused`` methods that ``method`` lacks are added too, hidden from the
    help, so that :func:`method_config` can name them as not applying instead of argparse
    calling them unrecognised.
    """
    fields: dict[str, FieldInfo] = {}
    if method is not None:
        config = METHODS[method].config
        fields = _flag_fields(config)
        # Options that are not flags (lists) are named in the group's description.
        others = [
            f"{name}: {info.description}"
            for name, info in config.model_fields.items()
            if name not in _COMMON and name not in fields
        ]
        note = ("also: " + "; ".join(others)) if others else (None if fields else "none")
        group = parser.add_argument_group(f"{method} options ({METHODS[method].summary})", note)
        for name, info in fields.items():
            kind, choices = _scalar(info.annotation) or (str, ())
            metavar = "{" + ",".join(choices) + "}" if choices else _METAVARS[kind]
            _add(group, name, kind, help=_help(info), metavar=metavar)
    hidden: dict[str, type] = {}
    for other in refused:
        for name, info in _flag_fields(METHODS[other].config).items():
            if name not in fields:
                kind, _ = _scalar(info.annotation) or (str, ())
                hidden.setdefault(name, bool if kind is bool else str)
    for name, kind in hidden.items():
        # A string: the value is refused (or, when --method was abbreviated and so missed by
        # requested_method, coerced by the config's validation).
        _add(parser, name, kind, help=argparse.SUPPRESS)


def _add(container, name: str, kind: type, *, help: str, metavar: str | None = None) -> None:
    if kind is bool:
        container.add_argument(
            option_flag(name),
            dest=_DEST + name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help,
        )
    else:
        container.add_argument(
            option_flag(name),
            dest=_DEST + name,
            type=kind,
            default=None,
            metavar=metavar,
            help=help,
        )


def add_config_flags(parser: argparse.ArgumentParser, *, checkpoint_default: str) -> None:
    """``--seed``, ``--budget``, ``--config``, ``--set`` and ``--checkpoint-every``: common to
    every method.

    ``checkpoint_default`` says how often the fit state is saved without the flag.
    """
    fields = MethodConfig.model_fields
    parser.add_argument("--seed", type=int, default=None, metavar="N", help=_help(fields["seed"]))
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default=None,
        help=_help(fields["budget"]) + "; each method's help gives its lengths, in epochs",
    )
    parser.add_argument(
        "--config",
        metavar="F.yaml",
        help="options from a YAML mapping of option: value (lists such as AutoNEB's cycles "
        "come from here); --set and flags override it",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any option of the method (a YAML value), repeatable; flags override it",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help=f"steps between saves of the resumable fit state (default: {checkpoint_default})",
    )


def eval_points(given: int | None, budget: str) -> int:
    """The evaluation's number of t values: ``given``, else the budget's."""
    return given if given is not None else EVAL_POINTS[budget]  # type: ignore[index]


def method_config(args: argparse.Namespace, method: str) -> MethodConfig:
    """``method``'s options from ``--config``, then ``--set``, then flags, validated once.

    A flag of another method is refused with the list of the flags that ``method`` takes.
    """
    config = METHODS[method].config
    params: dict[str, Any] = {}
    if args.config:
        params.update(read_options(args.config))
    params.update(parse_kv(args.set, "--set"))
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST) or value is None:
            continue
        name = dest.removeprefix(_DEST)
        if name not in config.model_fields:
            raise ValueError(
                f"{option_flag(name)} does not apply to method {method!r} "
                f"(its options: {_listing(config)})"
            )
        params[name] = value
    for common in _COMMON:
        if getattr(args, common, None) is not None:
            params[common] = getattr(args, common)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    return make_config(method, **params)


def _listing(config: type[MethodConfig]) -> str:
    flags = [option_flag(name) for name in _flag_fields(config)]
    lists = [n for n in config.model_fields if n not in _COMMON and n not in _flag_fields(config)]
    flags += [f"{name} (from --config or --set)" for name in lists]
    return ", ".join(flags) or "none"
