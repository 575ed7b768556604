"""Atomic file and directory writes, and safetensors files that carry JSON metadata.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modeconn.types import StateDict

__all__ = ["atomic_file", "atomic_dir", "save_tensors", "load_tensors", "load_meta", "META_KEY"]

#: The safetensors metadata key under which modeconn stores its JSON description.
META_KEY = "modeconn"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes 0600: others (a service user) must read what we write
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only on success.

    An existing ``path`` is moved aside first and removed after the swap, so a crash at any
    moment leaves either the old directory or the new one, never half of either.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: str | os.PathLike, tensors: StateDict, meta: dict | None = None) -> None:
    """Write ``tensors`` (contiguous, CPU) and JSON ``meta`` to a safetensors file, atomically."""
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(meta or {}, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file(payload, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, *, what: str = "file") -> tuple[StateDict, dict]:
    """Read a safetensors file written by :func:`save_tensors`: ``(tensors, meta)``."""
    meta = load_meta(path, what=what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors {what} ({err})") from err
    return tensors, meta


def load_meta(path: str | os.PathLike, *, what: str = "file") -> dict:
    """The JSON metadata of a safetensors file (``{}`` if it has none), from its header only."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors {what} ({err})") from err
    try:
        return json.loads(metadata.get(META_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its modeconn metadata is not valid JSON ({err})") from err
