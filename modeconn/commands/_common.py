"""Options and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import yaml

from modeconn.checkpoint import Checkpoint, load_checkpoint
from modeconn.data import DATA_KINDS, Dataset, load_data

log = logging.getLogger("modeconn")


def add_data(parser: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    hint = (
        "default: the data set the endpoints were trained on"
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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return device


def parse_kv(items: list[str] | None, what: str = "--arg") -> dict:
    """``["width=16", "channels=[8, 16]"]`` -> ``{"width": 16, "channels": [8, 16]}`` (YAML scalars)."""
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


def load_endpoint(path: str) -> Checkpoint:
    return load_checkpoint(path)


def load_pair(path_a: str, path_b: str) -> tuple[Checkpoint, Checkpoint]:
    """Two endpoints of one architecture, or a clear error."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    if a.model != b.model:
        raise ValueError(
            f"A and B are different architectures: {path_a} is {_describe(a)}, "
            f"{path_b} is {_describe(b)}"
        )
    return a, b


def _describe(ckpt: Checkpoint) -> str:
    m = ckpt.model
    return f"{m.name}({json.dumps(m.kwargs, sort_keys=True)}, input {list(m.input_shape)}, {m.num_classes} classes)"


def data_for(spec: str | None, ckpt: Checkpoint) -> Dataset:
    """Load ``spec`` (or the endpoint's own data set) and check that it fits the model."""
    spec = spec or ckpt.meta.get("data") or "digits"
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
