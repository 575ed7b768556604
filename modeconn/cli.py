"""The ``modeconn`` command line.

Each sub-command lives in its own module under :mod:`modeconn.commands` and exposes
``register(subparsers)`` and ``run(args)``; a command whose options depend on other options
(``connect --method M``) takes ``register(subparsers, argv)`` and reads the command line
itself. The module list below is the whole table. The modules import only light modules at the
top (never torch), so that ``--help`` is quick; each imports what it needs inside ``run``.

User errors (a missing file, a bad option, data that does not fit the model) print one line on
stderr and exit with status 2; ``--verbose`` shows the traceback instead. Errors in the command
line itself print the usage of the command first, and a mistyped option or command is answered
with the closest valid one. Failures (a fit that diverged, an ONNX check that failed) exit 1.

Several processes: ``torchrun --nproc-per-node N -m modeconn COMMAND ...`` runs the commands of
:data:`DISTRIBUTED` in parallel, with the same command line as one process. Each process joins
the group (gloo for ``--device cpu``, nccl for ``--device cuda``, each rank on the GPU of its
``LOCAL_RANK``) before the command and leaves it after, also on an error, so that no rank is
left waiting. Rank 0 logs, shows progress and writes the results; the other ranks log warnings
only. Every other command does one process's work and so refuses to start under ``torchrun``
(one line on rank 0, status 2) rather than run N times or leave N - 1 processes idle.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

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
    "predict",
    "serve_build",
)

#: The commands that run in parallel under ``torchrun`` (data-parallel fits and training).
DISTRIBUTED = frozenset({"connect", "fge", "train"})

#: What argparse reads as a negative number (a value), not as an option.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
#: Suggestions closer than this (difflib's ratio) are offered: ``--nodse`` -> ``--nodes``.
_CUTOFF = 0.6


class _Parser(argparse.ArgumentParser):
    """argparse whose errors name the way out: an unknown option or command gets the closest
    valid one ("unknown option --nodse; did you mean --nodes?"), from the parser it was given to.

    The top-level parser and, through ``add_subparsers(parser_class=...)``, every sub-command's
    are of this class. Each sub-command refuses its own unknown options, with its own usage:
    plain argparse hands them up to the top-level parser, whose usage lists none of them. So
    ``parse_known_args`` never returns extras here. Every error exits with status 2.
    """

    def __init__(self, *args, **kwargs) -> None:
        # No abbreviations: `compare --method` must not quietly mean `--methods`; a shortened
        # option is answered with the whole name instead.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._seen: list[str] = []  # the arguments being parsed, read again by error()
        self._commands: argparse._SubParsersAction | None = None  # the sub-commands, if any
        self._outer: _Parser | None = None  # for a sub-command: the top-level parser

    def add_subparsers(self, **kwargs):
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_known_args(self, args=None, namespace=None):
        self._seen = list(sys.argv[1:] if args is None else args)
        if self._commands is not None and (unknown := self._unknown_options()):
            # before the command parses the rest, and reports what it lacks instead
            self.error(self._describe_unknown(unknown))
        namespace, extras = super().parse_known_args(self._seen, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        # An unknown option is the likely cause of what argparse reports (the required --out
        # that a mistyped --otu left missing), so it is named first.
        unknown = self._unknown_options()
        if unknown:
            message = self._describe_unknown(unknown)
        elif (command := self._unknown_command()) is not None:
            message = command
        super().error(message)

    def _options(self, *, hidden: bool) -> list[str]:
        """Option strings of the visible options, or of the hidden ones (``help=SUPPRESS``)."""
        return [
            option
            for action in self._actions
            if (action.help == argparse.SUPPRESS) == hidden
            for option in action.option_strings
        ]

    def _knows(self, token: str) -> bool:
        """Whether argparse would take ``token`` (``--x``, ``--x=1``, ``-vq``) as one of ours."""
        options = self._options(hidden=False) + self._options(hidden=True)
        if token.startswith("--"):
            return token.partition("=")[0] in options
        return token[:2] in options  # -v, -vq (flags combined), -n5 (value attached)

    def _unknown_options(self) -> list[str]:
        """The options among the arguments seen that this parser does not know, as argparse
        tells options from values: a leading dash, not a negative number, no space. The
        top-level parser looks only before the command: what follows is the command's."""
        unknown = []
        for token in self._seen:
            if token == "--":
                break
            if not token.startswith("-") or token == "-" or " " in token:
                if self._commands is not None:
                    break
                continue
            if not _NEGATIVE_NUMBER.match(token) and not self._knows(token):
                unknown.append(token.partition("=")[0] if token.startswith("--") else token)
        return unknown

    def _describe_unknown(self, unknown: list[str]) -> str:
        parts = [(option, self._suggest(option)) for option in unknown]
        if len(parts) == 1:
            option, hint = parts[0]
            return f"unknown option {option}; {hint}" if hint else f"unknown option {option}"
        listed = ", ".join(f"{option} ({hint})" if hint else option for option, hint in parts)
        return f"unknown options {listed}"

    def _suggest(self, option: str) -> str | None:
        """The hint for ``option``: "did you mean --nodes?", where it goes, or None."""
        if self._outer is not None and self._outer._knows(option):
            command = self.prog.rsplit(" ", 1)[-1]
            return f"it goes before the command: modeconn {option} {command} ..."
        # Hidden options too: connect's flags of the methods not chosen (a flag of another
        # method is then refused by name, with the flags that apply).
        # Compared without their dashes, which would make --model look like --help.
        names = {o.lstrip("-"): o for o in self._options(hidden=False) + self._options(hidden=True)}
        close = difflib.get_close_matches(option.lstrip("-"), list(names), 1, _CUTOFF)
        return f"did you mean {names[close[0]]}?" if close else None

    def _unknown_command(self) -> str | None:
        """For the top-level parser: the message for a first positional argument that names
        no command, with the closest command, or None."""
        if self._commands is None:
            return None
        given = next((t for t in self._seen if not t.startswith("-")), None)
        names = list(self._commands.choices)
        if given is None or given in names:
            return None
        close = difflib.get_close_matches(given.replace("_", "-"), names, 1, _CUTOFF)
        if close:
            return f"unknown command {given!r}; did you mean {close[0]}?"
        return f"unknown command {given!r}; the commands: {', '.join(names)}"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for the command line ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        prog="modeconn",
        description="Low-loss paths between trained networks, served as ensembles or merged models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks and debug logs"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for name in COMMANDS:
        register = importlib.import_module(f"modeconn.commands.{name}").register
        if len(inspect.signature(register).parameters) > 1:
            register(sub, argv)
        else:
            register(sub)
    for command in sub.choices.values():
        if isinstance(command, _Parser):
            command._outer = parser  # to tell "modeconn connect ... --verbose" where it goes
    return parser


class UserError(Exception):
    """An error whose message is the whole story: shown without a traceback."""


class _OneProcess(UserError):
    """A command that does not run in parallel, started by ``torchrun``: said by rank 0 only."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    rank = _launched_rank()  # None in one process
    quiet = args.quiet or bool(rank)  # ranks other than 0: warnings only, no progress
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s"
        if rank is None
        else f"%(levelname)s %(name)s [rank {rank}]: %(message)s",
    )
    args.progress = not quiet  # a bar on a terminal, plain lines in a log
    try:
        if rank is not None:
            return _run_in_group(args)
        return int(args.func(args) or 0)
    except _OneProcess as err:
        if not rank:
            print(f"modeconn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modeconn: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        user = isinstance(err, UserError | ValueError) or _is_path_error(err)
        kind = "" if user else "failed: "
        print(f"modeconn {args.command}: error: {kind}{_message(err)}", file=sys.stderr)
        return 2 if user else 1


def _launched_rank() -> int | None:
    """This process's rank when ``torchrun`` started it with peers, else None. Read from the
    environment, so that one process never imports torch here."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return rank if world > 1 else None


def _run_in_group(args: argparse.Namespace) -> int:
    """Run a command of :data:`DISTRIBUTED` in the process group, left again however it ends."""
    if args.command not in DISTRIBUTED:
        raise _OneProcess(f"`modeconn {args.command}` runs in one process; run it without torchrun")
    from modeconn import distributed
    from modeconn.commands._common import resolve_device

    device = resolve_device(getattr(args, "device", "cpu"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"--device {args.device}: under torchrun each rank takes the GPU of its "
                "LOCAL_RANK; give --device cuda"
            )
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    distributed.setup(device)
    try:
        return int(args.func(args) or 0)
    finally:
        distributed.teardown()


#: OS errors about the paths given (missing, a file where a folder belongs, no permission):
#: the user's to fix, so status 2. Others (a full disk, an I/O error) are failures, status 1.
_PATH_ERRNOS = frozenset(
    {errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM}
)


def _is_path_error(err: BaseException) -> bool:
    # FileNotFoundError raised with a message only (no errno) is ours: "checkpoint not found".
    return isinstance(err, FileNotFoundError) or (
        isinstance(err, OSError) and err.errno in _PATH_ERRNOS
    )


def _message(err: BaseException) -> str:
    """``err`` in one line: an OS error as "File exists: runs/a" rather than "[Errno 17] ..."."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.strerror}: {err.filename}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
