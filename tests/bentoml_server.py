"""A real ``bentoml serve`` of the service on 127.0.0.1, for the tests that call it over HTTP
(:class:`benchmarks.server.Server`, with a test failure instead of an error)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.server import REPO, Server

__all__ = ["REPO", "bentoml_server"]


@contextlib.contextmanager
def bentoml_server(env: dict[str, str], log_file: Path, *, ready_s: float = 90) -> Iterator[dict]:
    """Start ``bentoml serve service.service:ModeConnService`` with ``env`` (on top of this
    process's), wait until ``/readyz`` answers, yield ``{"url", "proc", "log"}``, then stop it."""
    models = env.get("MODECONN_ARTIFACTS", "artifacts")
    server = Server(Path(models), None, log_file, env)
    try:
        try:
            server.wait_ready(ready_s)
        except RuntimeError as err:
            pytest.fail(str(err))
        yield {"url": server.url, "proc": server.proc, "log": log_file}
    finally:
        server.stop()
