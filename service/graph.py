"""One ONNX graph of a served path: opened with onnxruntime only from bytes its serving index
vouches for, and refused (a 503, one log line) otherwise.

A graph is opened or exported only as its serving index records it: a regular file of its
bundle whose SHA-256 matches (:func:`modeconn.formats.read_graph`). The check is repeated
whenever the file's identity, size or times change, and skipped while they stay the same.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np

from modeconn.formats import IntegrityError, ServedGraph, read_graph, verify_graph
from modeconn.runtime import Device, OnnxModel

from .errors import REFUSED, RequestError

__all__ = ["Graph", "release_freed_memory"]

log = logging.getLogger("modeconn.service")


_FileId = tuple[int, int, int, int, int]  # device, inode, size, mtime and ctime (ns)


def _file_id(info: os.stat_result) -> _FileId:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass
class Graph:
    """One ONNX graph of a served path, opened on first use (or at start with ``preload``).

    It is opened from bytes checked against the serving index, and its file is exported only
    after the same check (repeated whenever the file's identity, size or times change); a
    graph that fails it is refused: one log line, and a 503 for every request that needs it.
    """

    entry: ServedGraph  # what the serving index says of it
    file: Path
    name: str
    directory: Path  # the artifact (the file is directory/serving/entry.file)
    device: Device = "auto"
    threads: int | None = None
    _model: OnnxModel | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The last check of the file: its identity then, and the refusal (None: it matched).
    _checked: tuple[_FileId, str | None] | None = field(default=None, repr=False)
    _logged: str | None = field(default=None, repr=False)  # the refusal last logged
    _log_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model(self) -> OnnxModel:
        """The onnxruntime session (``RequestError`` 503 if the graph is refused)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    seen = self._seen()
                    try:
                        data = read_graph(self.directory, self.entry)
                    except IntegrityError as err:
                        raise RequestError(REFUSED, self._refuse(err, seen)) from None
                    # No busy-waiting pool threads: many sessions share the worker's cores.
                    self._model = OnnxModel(
                        data,
                        device=self.device,
                        intra_op_threads=self.threads,
                        name=self.name,
                        spinning=False,
                    )
                    del data
                    release_freed_memory()
        return self._model

    def open(self) -> OnnxModel:
        """The session, opened now if it is not yet (``RequestError`` 503 if refused)."""
        return self.model

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs on ``x`` (``(N, *input_shape)`` float32), by name."""
        model = self.model
        # The graphs' outputs are dense tensors: numpy arrays (not sparse tensors, maps, lists).
        out = cast(list[np.ndarray], model.session.run(None, {model.input_name: x}))
        return dict(zip(model.output_names, out))

    def verified_file(self) -> Path:
        """The graph's file, checked against the serving index (``RequestError`` 503 if it is
        refused): a regular file of the bundle, not a link, with the recorded SHA-256. The
        file is hashed again only when its identity, size or times changed since the last
        check."""
        seen = self._seen()
        checked = self._checked
        if seen is not None and checked is not None and checked[0] == seen:
            refusal = checked[1]
        else:
            try:
                self._checked = (_file_id(verify_graph(self.directory, self.entry)), None)
                refusal = None
            except IntegrityError as err:
                refusal = self._refuse(err, seen)
        if refusal is not None:
            raise RequestError(REFUSED, refusal)
        return self.file

    def _seen(self) -> _FileId | None:
        """The identity of the graph's file now (None unless it is a regular file)."""
        try:
            info = os.lstat(self.file)
        except OSError:
            return None
        return _file_id(info) if stat.S_ISREG(info.st_mode) else None

    def precheck(self) -> None:
        """At start without preload: refuse now a file that is missing, a link, or not a
        regular file (cheap); its bytes are checked when it is first used."""
        if self._seen() is None:
            self.verified_file()

    def ensure_usable(self) -> None:
        """Refuse (``RequestError`` 503) a graph that is not open and fails its check, before
        a request is accepted for it; an open graph runs what was checked when it opened."""
        if self._model is None:
            self.verified_file()

    def _refuse(self, err: IntegrityError, seen: _FileId | None) -> str:
        """Log ``err`` (once while it stays the same), remember the refusal for the file seen
        as ``seen`` (not hashed again while it stays so), and return the message for clients,
        which names no file system path."""
        message = (
            f"graph {self.name} is refused: it {err.reason}; rebuild its bundle with "
            "`modeconn serve-build DIR --force` and restart the server"
        )
        self._checked = (seen, message) if seen is not None else None
        with self._log_lock:
            if self._logged != str(err):
                self._logged = str(err)
                log.error("refusing graph %s: %s", self.name, err)
        return message

    @property
    def key(self) -> Hashable:
        """Requests with equal keys run as one batch (see ``Catalog.predict_many``)."""
        return id(self)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def mode(self) -> str:
        return self.entry.mode

    @property
    def k(self) -> int:
        return self.entry.k

    @property
    def ts(self) -> list[float]:
        return self.entry.ts


def release_freed_memory() -> None:
    """Hand memory freed by the C heap back to the system (glibc's ``malloc_trim``).

    onnxruntime parses a whole ONNX file before it keeps the weights: the parse buffers are
    freed but, left to glibc, stay in the process (measured: 60 MB of 200 MB for five 17 MB
    members). Elsewhere (no glibc) nothing happens.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | Literal[False] | None = None  # None: not looked up yet
