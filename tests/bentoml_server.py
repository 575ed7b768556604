"""A real ``bentoml serve`` of the service on 127.0.0.1, for the tests that call it over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "bentoml_server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(env: dict[str, str], log_file: Path, *, ready_s: float = 90) -> Iterator[dict]:
    """Start ``bentoml serve service.service:ModeConnService`` with ``env`` (on top of this
    process's), wait until ``/readyz`` answers, yield ``{"url", "proc", "log"}``, then stop it."""
    import httpx

    port = _free_port()
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [str(bentoml_cli), "serve", "service.service:ModeConnService"]
            + ["--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_file.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after {ready_s} s:\n{log_file.read_text()}")
            time.sleep(0.2)
        yield {"url": url, "proc": proc, "log": log_file}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
