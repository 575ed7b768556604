"""A real ``bentoml serve`` of the service on a free loopback port, for the benchmarks, the
soak run, the device check and the tests that call the service over HTTP.

    server = Server(models_dir, bentoml_home, log_file, env={"MODECONN_WORKERS": "2"})
    try:
        server.wait_ready()
        httpx.post(f"{server.url}/predict", json=...)
    finally:
        server.stop()

The server runs from the repository root with this process's environment, plus telemetry off,
``MODECONN_ARTIFACTS`` set to ``models`` (no store models unless ``env`` names some) and
``env`` on top. ``stop`` sends SIGTERM, waits, and kills a server that ignores it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["REPO", "Server", "free_port"]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bentoml serve service.service:ModeConnService`` on a free loopback port."""

    def __init__(
        self,
        models: Path,
        home: Path | None,
        log: Path,
        env: dict[str, str] | None = None,
        *,
        service: str = "service.service:ModeConnService",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        environment = {
            **os.environ,
            "BENTOML_DO_NOT_TRACK": "True",
            "MODECONN_ARTIFACTS": str(models),
        }
        environment.pop("MODECONN_MODELS", None)
        if home is not None:
            environment["BENTOML_HOME"] = str(home)
        environment.update(env or {})
        self.env = environment
        cli = Path(sys.executable).with_name("bentoml")
        with open(self.log, "w") as handle:
            self.proc = subprocess.Popen(
                [str(cli), "serve", service, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO,
                env=environment,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        self.started = time.perf_counter()
        self.ready_s: float | None = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from the start until ``/readyz`` answered 200 (``RuntimeError`` if the
        server exits first or does not answer within ``timeout``)."""
        import httpx

        while self.ready_s is None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    break
            if time.perf_counter() - self.started > timeout:
                raise RuntimeError(
                    f"bentoml serve not ready after {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self.ready_s

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self) -> dict:
        """SIGTERM, then wait; a server that ignores it is killed (its return code is then
        None). Returns ``{"returncode", "seconds"}``."""
        begin = time.perf_counter()
        returncode = self.proc.poll()
        if returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                returncode = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return {"returncode": returncode, "seconds": round(time.perf_counter() - begin, 3)}
