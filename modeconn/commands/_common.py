"""Options and helpers shared by several sub-commands.

Light at import, so that ``modeconn --help`` never loads torch: torch, checkpoints, data and
models are imported inside the helpers that use them. The names the help text lists are kept
here as literals; ``tests/test_cli_help.py`` checks them against the modules that own them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    from modeconn.checkpoint import Checkpoint, ModelSpec
    from modeconn.data import Dataset

log = logging.getLogger("modeconn")

_Item = TypeVar("_Item")


def comma_list(text: str, convert: Callable[[str], _Item], expected: str) -> list[_Item]:
    """The comma-separated values of ``text`` through ``convert`` (empty parts skipped); a value
    it refuses is a ``ValueError`` that says ``expected`` and quotes ``text``."""
    try:
        return [convert(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"{expected}, got {text!r}") from err


#: ``modeconn.data.DATA_KINDS``, for the help of ``--data``.
DATA_KINDS = (
    "digits",
    "npz:PATH",
    "mnist:DIR",
    "fashion-mnist:DIR",
    "cifar10:DIR",
    "cifar100:DIR",
    "imagefolder:DIR",
)
#: ``models.list_models()`` and ``models.external.EXTERNAL_FORMS``, for the help of ``--model``.
MODEL_NAMES = ("cnn", "mlp", "resnet20")
EXTERNAL_FORMS = "torchvision:NAME, timm:NAME or module.path:Callable"


def add_data(parser: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    hint = (
        "default: the data set the endpoints were trained on, else digits"
        if default is None
        else "default: %(default)s"
    )
    parser.add_argument(
        "--data",
        default=default,
        metavar="SPEC",
        help=f"data set: {', '.join(DATA_KINDS)} ({hint})",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )


def resolve_device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return device


#: ``modeconn.bn.DEFAULT_BN_EXAMPLES``, for the default of ``--bn-examples``.
BN_EXAMPLES = 2048


def add_bn_examples(parser: argparse.ArgumentParser, *, recorded: bool = False) -> None:
    """``--bn-examples N``: how many seeded training inputs BatchNorm statistics are recomputed
    from (0: all). A command that writes an artifact records it there (default
    :data:`BN_EXAMPLES`); one that reads an artifact (``recorded``) follows the artifact's
    record unless the flag is given (see :func:`bn_examples_for`)."""
    default = None if recorded else BN_EXAMPLES
    when = (
        "default: the artifact's own, from its manifest; all of them for older artifacts"
        if recorded
        else "default: %(default)s; recorded in the artifact, whose later uses take the same"
    )
    parser.add_argument(
        "--bn-examples",
        type=_examples,
        default=default,
        metavar="N",
        help=f"recompute BatchNorm statistics from N seeded training inputs, 0 for all ({when})",
    )


def _examples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 (0: all), got {text!r}")
    return value


def bn_examples_for(args: argparse.Namespace, recorded: int | None) -> int | None:
    """``--bn-examples`` of a command that reads an artifact: its value if given (0: all, as
    None), else the artifact's ``recorded`` one."""
    given = getattr(args, "bn_examples", None)
    return recorded if given is None else (given or None)


def parse_kv(items: list[str] | None, what: str = "--arg") -> dict:
    """``["width=16", "channels=[8, 16]"]`` -> ``{"width": 16, "channels": [8, 16]}`` (YAML scalars)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{what} {item!r}: cannot parse the value ({err})") from err
    return out


def add_model(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--model NAME`` and repeatable ``--arg KEY=VALUE``, for every command that builds a model."""
    when = (
        f"default: {default}"
        if default
        else "needed for plain state dicts; files written by modeconn name their own"
    )
    parser.add_argument(
        "--model",
        default=default,
        metavar="NAME",
        help=f"a registered name ({', '.join(MODEL_NAMES)}), {EXTERNAL_FORMS} ({when})",
    )
    parser.add_argument(
        "--arg",
        action="append",
        metavar="KEY=VALUE",
        help="model keyword argument, repeatable (e.g. --arg width=16 --arg depth=2); "
        "--arg num_classes=N overrides the data's number of classes",
    )


def add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spec",
        metavar="FILE.json",
        help="permutation spec to align with (as `modeconn spec --out` writes it); default: "
        "inferred from the network's graph. Either way it is proven on the data before use",
    )


def load_spec(path: str | None):
    """The permutation spec in ``path`` (JSON), or None when no file is given."""
    if path is None:
        return None
    from modeconn.models.spec import spec_from_json

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--spec {path}: no such file")
    try:
        obj = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--spec {path} is not valid JSON: {err}") from err
    return spec_from_json(obj, source=str(path))


def model_spec(args: argparse.Namespace, data: Dataset) -> ModelSpec:
    """The model ``--model``/``--arg`` name, for inputs of ``data``'s shape.

    The number of classes is ``--arg num_classes=N`` if given (a checkpoint trained for more
    classes than the data has), else the data's.
    """
    from modeconn.checkpoint import ModelSpec

    kwargs = parse_kv(args.arg)
    num_classes = kwargs.pop("num_classes", data.num_classes)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"--arg num_classes must be an integer >= 2, got {num_classes!r}")
    return ModelSpec(
        name=args.model,
        input_shape=tuple(data.input_shape),
        num_classes=num_classes,
        kwargs=kwargs,
    )


def load_endpoint(path: str, args: argparse.Namespace) -> tuple[Checkpoint, Dataset]:
    """One endpoint and the data to use with it (``--data``, else its own data set)."""
    (ckpt,), data = _load_endpoints([path], args)
    return ckpt, data


def load_pair(
    path_a: str, path_b: str, args: argparse.Namespace
) -> tuple[Checkpoint, Checkpoint, Dataset]:
    """Two endpoints of one architecture and the data to use with them, or a clear error."""
    (a, b), data = _load_endpoints([path_a, path_b], args)
    if a.model != b.model:
        raise ValueError(
            f"A and B are different architectures: {path_a} is {_describe(a)}, "
            f"{path_b} is {_describe(b)}"
        )
    return a, b, data


def _load_endpoints(paths: list[str], args: argparse.Namespace) -> tuple[list[Checkpoint], Dataset]:
    """Files written by modeconn name their model and data set. A plain state dict takes the
    model from ``--model``/``--arg`` (or from a file beside it that names one) and its input
    shape and number of classes from the data, so for it the data is loaded first."""
    from modeconn.checkpoint import load_checkpoint, stored_model
    from modeconn.data import load_data

    stored = [stored_model(p) for p in paths]  # None for a plain state dict
    described = {p: load_checkpoint(p) for p, s in zip(paths, stored) if s is not None}
    for ckpt in described.values():
        _check_model_option(args, ckpt)
    if len(described) == len(paths):
        ckpts = [described[p] for p in paths]
        return ckpts, data_for(args.data, ckpts[0])
    first = next(iter(described.values()), None)
    data = load_data(args.data or (first and _recorded_data(first)) or "digits")
    if first is not None:
        spec = first.model  # --model and --arg, if given, were checked against it above
    elif args.model is not None:
        spec = model_spec(args, data)
    else:
        plain = next(p for p, s in zip(paths, stored) if s is None)
        raise ValueError(
            f"{plain} is a plain state dict that does not name its model: give --model NAME "
            "(and --arg KEY=VALUE for its arguments)"
        )
    ckpts = [described.get(p) or load_checkpoint(p, model=spec) for p in paths]
    check_data_fits(data, ckpts[0])
    return ckpts, data


def _check_model_option(args: argparse.Namespace, ckpt: Checkpoint) -> None:
    """``--model``/``--arg`` are for plain state dicts; for a file that names its own model
    they may only repeat it."""
    m = ckpt.model
    if args.model is not None and args.model != m.name:
        raise ValueError(
            f"{ckpt.path_name} holds a {m.name} model, not --model {args.model}; drop --model "
            "for files written by modeconn"
        )
    stored = {**m.kwargs, "num_classes": m.num_classes}
    clash = [f"{k}={v!r}" for k, v in parse_kv(args.arg).items() if stored.get(k, ...) != v]
    if clash:
        raise ValueError(
            f"{ckpt.path_name} holds {_describe(ckpt)}, which --arg {', '.join(clash)} "
            "contradicts; drop --arg for files written by modeconn"
        )


def _describe(ckpt: Checkpoint) -> str:
    m = ckpt.model
    return f"{m.name}({json.dumps(m.kwargs, sort_keys=True)}, input {list(m.input_shape)}, {m.num_classes} classes)"


def _recorded_data(ckpt: Checkpoint) -> str | None:
    """The data set a checkpoint names, a relative path in it resolved from the file's folder."""
    from pathlib import Path

    from modeconn.formats import resolve_data_spec

    spec = ckpt.meta.get("data")
    return resolve_data_spec(spec, Path(ckpt.path_name).parent) if spec else None


def data_for(spec: str | None, ckpt: Checkpoint) -> Dataset:
    """Load ``spec`` (or the endpoint's own data set) and check that it fits the model."""
    from modeconn.data import load_data

    spec = spec or _recorded_data(ckpt) or "digits"
    data = load_data(spec)
    check_data_fits(data, ckpt)
    return data


def check_data_fits(data: Dataset, ckpt: Checkpoint) -> None:
    m = ckpt.model
    if tuple(data.input_shape) != tuple(m.input_shape):
        raise ValueError(
            f"data {data.name!r} has inputs of shape {list(data.input_shape)} but the model "
            f"{m.name} in {ckpt.path_name} expects {list(m.input_shape)}"
        )
    if data.num_classes > m.num_classes:
        raise ValueError(
            f"data {data.name!r} has {data.num_classes} classes but the model in "
            f"{ckpt.path_name} predicts {m.num_classes}"
        )


def write_json(path: str | Path, obj) -> None:
    from modeconn.io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def console():
    """A rich console for tables on stdout: terminal width on a terminal, 160 columns otherwise."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)
