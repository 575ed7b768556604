"""Atomic file and directory writes, and safetensors files that carry JSON metadata.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.

A write goes to a hidden temporary beside its target, named after the process that owns it
(``.<name>.<pid>@<host>.<random>.tmp``; a replaced directory waits as ``...old`` until the
swap is done). A run that is killed leaves its temporary behind; the next write of the same
target removes those whose process is gone (on this host), never one of a live run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modeconn.types import StateDict

__all__ = ["atomic_file", "atomic_dir", "save_tensors", "load_tensors", "load_meta", "META_KEY"]

#: The safetensors metadata key under which modeconn stores its JSON description.
META_KEY = "modeconn"

log = logging.getLogger("modeconn")


def _host_tag() -> str:
    """Where a pid means something: the host name, and on Linux the pid namespace too (two
    containers may share a host name and a volume, not their pids)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "localhost"
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
        host += "-" + "".join(c for c in namespace if c.isdigit())
    return host


#: The host part of temporary names: a pid means something only where it was written.
_HOST = _host_tag()
#: Temporaries named before they carried their owner (``.<name>.<random>.tmp``) are removed
#: once untouched for this long.
_UNOWNED_STALE_S = 24 * 3600.0
#: A live process that started this long after a temporary's last change did not write it
#: (its pid was reused); the margin covers clock skew of network file systems.
_PID_REUSE_MARGIN_S = 300.0


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def _alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` may be the one that last changed a temporary at ``since``."""
    try:
        import psutil
    except ImportError:  # without psutil: any live pid counts (never delete a live run's)
        if os.name != "posix":
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return psutil.Process(pid).create_time() <= since + _PID_REUSE_MARGIN_S
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _clean_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` left by killed runs; a directory that was moved aside
    by a run killed mid-swap is put back if ``path`` is missing."""
    prefix = re.escape(f".{path.name}.")
    owned = re.compile(prefix + r"(\d+)@([A-Za-z0-9-]+)\.[a-z0-9_]+\.(tmp|old)")
    unowned = re.compile(prefix + r"(?:[a-z0-9_]{8}\.tmp|old-(\d+))")  # earlier versions
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(f".{path.name}.")]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            changed = entry.lstat().st_mtime
        except OSError:
            continue
        if match := owned.fullmatch(entry.name):
            pid, host, kind = int(match[1]), match[2], match[3]
            if host != _HOST or _alive(pid, changed):
                continue
        elif match := unowned.fullmatch(entry.name):
            pid, kind = (int(match[1]), "old") if match[1] else (None, "tmp")
            if pid is not None and _alive(pid, changed):
                continue
            if pid is None and now - changed < _UNOWNED_STALE_S:
                continue
        else:
            continue
        try:
            if kind == "old" and not path.exists():
                os.replace(entry, path)
                log.warning(
                    "restored %s from %s (a run was killed while replacing it)", path, entry
                )
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                log.info("removed %s, left behind by a killed run", entry)
            else:
                entry.unlink()
                log.info("removed %s, left behind by a killed run", entry)
        except OSError as err:  # e.g. removed meanwhile by another run
            log.debug("could not remove %s: %s", entry, err)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Temporaries of ``path`` left by killed runs are removed first (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
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
    moment leaves the old directory or the new one, never half of either (a crash between the
    two renames leaves the old one aside: the next write of ``path`` puts it back). Temporaries
    of ``path`` left by killed runs are removed first; those of live runs are kept.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.{_owner()}.{uuid.uuid4().hex[:8]}.old")
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
