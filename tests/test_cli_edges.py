"""The command line at its edges: plain state dicts with --model on every command that reads
endpoints, usage errors that name the way out (status 2), and no unformatted placeholders in
the messages of modeconn/, models/ and service/."""

from __future__ import annotations

import argparse
import ast
import errno
import importlib
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modeconn.checkpoint import ModelSpec
from modeconn.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# 1. --model wherever endpoint checkpoints are read

#: The smallest digits model there is: 64 -> 8 -> 10.
PLAIN = ModelSpec("mlp", (1, 8, 8), 10, {"width": 8, "depth": 1})
MODEL_FLAGS = ["--model", "mlp", "--arg", "width=8", "--arg", "depth=1"]


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory) -> tuple[str, str]:
    """Two plain state dicts without modeconn's description: a trainer's ``.pt`` (wrapped,
    DDP prefix) and a bare ``.safetensors``."""
    folder = tmp_path_factory.mktemp("plain")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(PLAIN.build().state_dict())
    a, b = folder / "a.pt", folder / "b.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in states[0].items()}, "epoch": 3}, a)
    save_file(states[1], str(b))
    return str(a), str(b)


#: Every command that reads endpoint checkpoints, with its cheapest run: the files ({a} the
#: .pt, {b} the .safetensors) and options, before --model; {out} is a fresh path.
ENDPOINT_COMMANDS = {
    "align": "{a} {b} --out {out}.safetensors --report none",
    "connect": "{a} {b} --method linear --eval-points 0 --out {out}",
    "compare": "{a} {b} --methods linear --no-align --k 0 --points 2 --out {out}",
    "fge": "{b} --cycles 2 --cycle-epochs 1 --batch-size 512 --out {out}",
    "spec": "{a}",
}


def _argv(command: str, plain_pair, out: Path) -> list[str]:
    fill = {"a": plain_pair[0], "b": plain_pair[1], "out": out}
    return [command, *(arg.format(**fill) for arg in ENDPOINT_COMMANDS[command].split())]


def test_every_command_that_loads_endpoints_is_covered():
    """A command whose module uses the shared endpoint loader is in the table above, so that
    it is run with --model below (and fails there if it lacks the flag)."""
    from modeconn.commands import _common

    loaders = (_common.load_pair, _common.load_endpoint)
    readers = {
        name.replace("_", "-")
        for name in COMMANDS
        if any(
            value in loaders
            for value in vars(importlib.import_module(f"modeconn.commands.{name}")).values()
        )
    }
    assert readers == set(ENDPOINT_COMMANDS)


@pytest.mark.parametrize("command", sorted(ENDPOINT_COMMANDS))
def test_a_plain_state_dict_works_with_model(command, plain_pair, tmp_path, capsys):
    code = main(["--quiet", *_argv(command, plain_pair, tmp_path / "out"), *MODEL_FLAGS])
    err = capsys.readouterr().err
    assert code == 0 and "error" not in err, err


@pytest.mark.parametrize("command", sorted(ENDPOINT_COMMANDS))
def test_without_model_the_message_names_flags_the_command_has(
    command, plain_pair, tmp_path, capsys, monkeypatch
):
    argv = _argv(command, plain_pair, tmp_path / "out")
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err
    first = next(arg for arg in argv if arg in plain_pair)
    assert code == 2 and err.startswith(f"modeconn {command}: error: {first} is a plain state dict")
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert named == {"--model", "--arg"}
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "[--model NAME]" in usage and "[--arg KEY=VALUE]" in usage


# ---------------------------------------------------------------------------------------------
# 2. Usage errors: status 2, the sub-command's usage, the closest valid option or command


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser([])
    choices = next(a.choices for a in parser._actions if a.dest == "command")
    assert isinstance(choices, dict)
    return choices


def _typo(option: str) -> str:
    """``option`` with two adjacent letters of its name swapped: ``--nodes`` -> ``--nodse``."""
    name = option[2:]
    i = max(
        j for j in range(len(name) - 1) if name[j] != name[j + 1] and "-" not in name[j : j + 2]
    )
    return "--" + name[:i] + name[i + 1] + name[i] + name[i + 2 :]


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in COMMANDS])
def test_a_mistyped_option_names_the_closest_one_of_that_command(command, capsys):
    parser = _command_parsers()[command]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    option = max(options, key=len)  # the longest: least likely to be near another
    typo = _typo(option)
    err = _usage_error(capsys, command, typo, "1")
    assert err.startswith(f"usage: modeconn {command}")
    assert err.rstrip().endswith(
        f"modeconn {command}: error: unknown option {typo}; did you mean {option}?"
    )


@pytest.mark.parametrize("method", [[], ["--method", "geodesic"], ["--method=geodesic"]])
def test_the_reported_typo(method, capsys):
    err = _usage_error(capsys, "connect", "A", "B", *method, "--nodse", "5", "--out", "x")
    assert err.strip().splitlines()[-1] == (
        "modeconn connect: error: unknown option --nodse; did you mean --nodes?"
    )


def test_a_mistyped_option_is_named_before_what_it_left_missing(capsys):
    err = _usage_error(capsys, "connect", "A", "B", "--otu", "runs/x")
    assert err.strip().splitlines()[-1] == (
        "modeconn connect: error: unknown option --otu; did you mean --out?"
    )
    err = _usage_error(capsys, "align", "A", "B", "--out", "x.safetensors", "--zzz", "--mdoel=mlp")
    assert err.strip().splitlines()[-1] == (
        "modeconn align: error: unknown options --zzz, --mdoel (did you mean --model?)"
    )


def test_an_artifact_command_refuses_model_without_a_far_fetched_suggestion(capsys):
    # artifacts name their model; compared with their dashes, --model was close to --help
    err = _usage_error(capsys, "eval-path", "runs/x", "--model", "mlp")
    assert err.strip().splitlines()[-1] == "modeconn eval-path: error: unknown option --model"


def test_an_option_of_modeconn_itself_after_the_command_says_where_it_goes(capsys):
    err = _usage_error(capsys, "eval-path", "runs/x", "--verbose")
    assert (
        "unknown option --verbose; it goes before the command: modeconn --verbose eval-path" in err
    )
    err = _usage_error(capsys, "--verbsoe", "train")  # named before train's missing --out
    assert err.startswith("usage: modeconn [-h]")
    assert err.strip().endswith(
        "modeconn: error: unknown option --verbsoe; did you mean --verbose?"
    )


@pytest.mark.parametrize(
    "given, message",
    [
        ("conect", "unknown command 'conect'; did you mean connect?"),
        ("eval_path", "unknown command 'eval_path'; did you mean eval-path?"),
        ("serve", "unknown command 'serve'; did you mean serve-build?"),
        ("zzz", "unknown command 'zzz'; the commands: train, spec, align, connect"),
    ],
)
def test_a_mistyped_command_names_the_closest_one(given, message, capsys):
    err = _usage_error(capsys, "-q", given, "A", "--out", "x")
    assert err.startswith("usage: modeconn [-h]") and f"modeconn: error: {message}" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["connect", "A", "B"], "the following arguments are required: --out"),
        (
            ["align", "A", "B", "--out", "x", "--report", "quik"],
            "argument --report: invalid choice: 'quik'",
        ),
        (["plane", "D", "--grid", "abc"], "argument --grid: invalid int value: 'abc'"),
        (["eval-path", "D", "extra"], "unrecognized arguments: extra"),
        (
            ["export", "D", "--out", "x.onnx", "--t", "0.5", "--ensemble", "3"],
            "not allowed with argument",
        ),
    ],
)
def test_argparse_errors_exit_2_with_the_commands_usage(argv, message, capsys):
    err = _usage_error(capsys, *argv)
    assert err.startswith(f"usage: modeconn {argv[0]}")
    assert f"modeconn {argv[0]}: error: " in err and message in err


@pytest.mark.parametrize(
    "error, code, message",
    [
        (ValueError("bad --k"), 2, "bad --k"),
        (FileNotFoundError("checkpoint not found: a.pt"), 2, "checkpoint not found: a.pt"),
        (FileExistsError(errno.EEXIST, "File exists", "runs/a"), 2, "File exists: runs/a"),
        (PermissionError(errno.EACCES, "Permission denied", "/x"), 2, "Permission denied: /x"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), 2, "Is a directory: runs"),
        (RuntimeError("diverged"), 1, "failed: diverged"),
        (TypeError("a bug"), 1, "failed: a bug"),
        (
            OSError(errno.ENOSPC, "No space left on device", "f"),
            1,
            "failed: No space left on device: f",
        ),
    ],
)
def test_run_time_errors_user_errors_exit_2_failures_1(error, code, message, capsys, monkeypatch):
    import modeconn.commands.eval_path as command

    def run(args):
        raise error

    monkeypatch.setattr(command, "run", run)
    assert main(["eval-path", "runs/x"]) == code
    assert capsys.readouterr().err == f"modeconn eval-path: error: {message}\n"
    with pytest.raises(type(error)):
        main(["--verbose", "eval-path", "runs/x"])  # the traceback


def test_an_out_path_below_a_file_is_a_user_error(plain_pair, tmp_path, capsys):
    code = main(
        ["--quiet", *_argv("connect", plain_pair, Path(plain_pair[0]) / "run"), *MODEL_FLAGS]
    )
    err = capsys.readouterr().err
    assert code == 2 and err == f"modeconn connect: error: File exists: {plain_pair[0]}\n"


# ---------------------------------------------------------------------------------------------
# 3. No unformatted placeholders: the "forgot the f prefix" bug class

#: A named replacement field as str.format reads it: {name}, {a.b}, {a[k]}, {x!r}, {x:.3f}.
_FIELD = re.compile(
    r"(?<!\{)\{(?P<name>[A-Za-z_]\w*(?:\.\w+|\[[^\]{}]*\])*)(?:![rsa])?(?::(?P<spec>[^{}]*))?\}"
)
#: The format-spec mini-language, so that prose such as "{method: {option: value}}" is no field.
_SPEC = re.compile(r"(.?[<>=^])?[-+ ]?z?#?0?\d*[,_]?(\.\d+)?[bcdeEfFgGnosxX%]?")

#: Literals formatted later by a library, on purpose: (file, literal) -> who formats it.
TEMPLATES = {
    ("modeconn/progress.py", "[bold]{task.description}"): "rich's TextColumn, per task",
    ("modeconn/progress.py", "{task.fields[status]}"): "rich's TextColumn, per task",
    ("service/bodies.py", "{message}"): "pydantic's PydanticCustomError, from its context",
}


def _fields(text: str) -> list[str]:
    return [
        m.group(0)
        for m in _FIELD.finditer(text)
        if m.group("spec") is None or _SPEC.fullmatch(m.group("spec"))
    ]


def unformatted_placeholders(source: str) -> list[tuple[int, str, str]]:
    """(line, literal, fields) of each string literal in ``source`` that holds ``{name}``
    fields but is not an f-string and is not formatted.

    Read token by token, since the AST merges ``"{x} " f"{y}"`` (the usual way the bug hides,
    in a message split over lines) into one f-string. Formatted: the receiver of
    ``.format``/``.format_map``, directly or through a name assigned in the same source.
    Skipped: docstrings and other bare string statements. ``%`` and logging calls are not
    exempt: neither fills ``{name}``.
    """
    tree = ast.parse(source)
    formatted_names = {
        node.func.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("format", "format_map")
        and isinstance(node.func.value, ast.Name)
    }
    exempt: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            exempt.append(node.value)  # a docstring or a bare string: never shown
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("format", "format_map")
        ):
            exempt.append(node.func.value)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in formatted_names for t in targets):
                exempt.append(node.value)
    spans = [
        ((n.lineno, n.col_offset), (n.end_lineno or n.lineno, n.end_col_offset or 0))
        for n in exempt
    ]
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING:
            continue  # f-strings are STRING tokens up to 3.11, FSTRING_* from 3.12: skipped
        prefix = token.string[: token.string.index(token.string[-1])].lower()  # rb, u, f...
        if "f" in prefix or "b" in prefix:
            continue
        if any(start <= token.start and token.end <= end for start, end in spans):
            continue
        fields = _fields(ast.literal_eval(token.string))
        if fields:
            found.append((token.start[0], ast.literal_eval(token.string), ", ".join(fields)))
    return found


def _sources() -> list[Path]:
    """The files of modeconn/, models/ and service/, each once (modeconn/models links models/)."""
    found = {
        p.resolve() for d in ("modeconn", "models", "service") for p in (ROOT / d).rglob("*.py")
    }
    return sorted(p.relative_to(ROOT) for p in found)


def test_no_string_literal_holds_an_unformatted_placeholder():
    leaks, used = [], set()
    for path in _sources():
        for line, literal, fields in unformatted_placeholders((ROOT / path).read_text()):
            if (path.as_posix(), literal) in TEMPLATES:
                used.add((path.as_posix(), literal))
            else:
                leaks.append(f"{path}:{line}: {fields} in {literal!r} (a missing f prefix?)")
    assert not leaks, "\n".join(leaks)
    assert used == set(TEMPLATES), f"stale TEMPLATES entries: {set(TEMPLATES) - used}"


PLANTED = '''
"""Module docstring: {not_a_leak}."""
import logging

TEMPLATE = "#/schemas/{model}"
REF = TEMPLATE.format(model="x")


def load(cls_name, path, n):
    """Docstring: ``{"state_dict": ...}`` and {cls_name} are prose."""
    logging.info("%s loaded", path)
    if n:
        raise ValueError(f"{path}: " "unknown class {cls_name}")  # the plain part of an f-string
    message = (
        f"{path} holds {n} tensors, "
        "expected {expected!r} of {cls_name}"  # a continuation line without f
    )
    ok = f"{{literal}} braces, {path:>10} and {n!r}" + "{}" + "{ 1 }" + "{option: value}"
    ok += "{name} is {kind}".format(name=path, kind=n) + "{x}".format_map({"x": 1})
    print("{cls_name} skipped")
    logging.warning("{cls_name} skipped: %s", path)  # logging does not fill {}
    return message + "%s {n:.3f}" % n  # % does not fill {} either
'''


def test_the_scanner_catches_a_missing_f_prefix():
    found = unformatted_placeholders(PLANTED)
    assert [(line, fields) for line, _, fields in found] == [
        (13, "{cls_name}"),
        (16, "{expected!r}, {cls_name}"),
        (20, "{cls_name}"),
        (21, "{cls_name}"),
        (22, "{n:.3f}"),
    ]


def test_the_scanner_catches_the_bug_that_leaked_cls_name():
    """The message of modeconn/data.py that showed users ``datasets.{cls_name}``, as it was."""
    leaked = """
def missing(kind, root, cls_name):
    raise FileNotFoundError(
        f"{kind} folder not found: {root}. Nothing is downloaded here: put the {cls_name} "
        "files there first (as torchvision's datasets.{cls_name}(root, download=True) would)"
    )
"""
    assert [(line, fields) for line, _, fields in unformatted_placeholders(leaked)] == [
        (5, "{cls_name}")
    ]
