"""The ``modeconn`` command line.

Each sub-command lives in its own module under :mod:`modeconn.commands` and exposes
``register(subparsers)`` and ``run(args)``; a command whose options depend on other options
(``connect --method M``) takes ``register(subparsers, argv)`` and reads the command line
itself. The module list below is the whole table. The modules import only light modules at the
top (never torch), so that ``--help`` is quick; each imports what it needs inside ``run``.

User errors (a missing file, a bad option, data that does not fit the model) print one line on
stderr and exit with status 2; ``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = (
    "train",
    "spec",
    "align",
    "connect",
    "eval_path",
    "compare",
    "evaluate",
    "fge",
    "plane",
    "export",
    "serve_build",
)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for the command line ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="modeconn",
        description="Low-loss paths between trained networks, served as ensembles or merged models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks and debug logs"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        register = importlib.import_module(f"modeconn.commands.{name}").register
        if len(inspect.signature(register).parameters) > 1:
            register(sub, argv)
        else:
            register(sub)
    return parser


class UserError(Exception):
    """An error whose message is the whole story: shown without a traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.progress = not args.quiet and sys.stderr.isatty()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("modeconn: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if args.verbose:
            raise
        kind = "" if isinstance(err, UserError | ValueError | FileNotFoundError) else "failed: "
        print(f"modeconn {args.command}: error: {kind}{err}", file=sys.stderr)
        return 2 if not kind else 1


if __name__ == "__main__":
    sys.exit(main())
