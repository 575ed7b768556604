"""How a worker of ``bentoml serve`` lives and dies: it exits when the server process dies, and
an error that a restart cannot fix stops the server instead of restarting the worker forever.

``bentoml serve`` is a supervisor (a circus arbiter): it opens the listening socket, starts the
workers with it, and starts a new worker whenever one exits. Two consequences, removed here:

* killed with ``kill -9``, the server cannot stop its workers: they keep the socket, and the
  next ``make serve`` fails with "address in use". :func:`exit_with_parent` makes a worker exit
  when the process that started it is gone (Linux: the kernel's parent-death signal; anywhere:
  a thread that watches the parent pid, and ends the worker if a graceful stop hangs);
* a worker whose service cannot start (``MODECONN_ARTIFACTS`` pointing nowhere, nothing to
  serve) is started again and again, a traceback each time, while clients wait.
  :func:`stop_server` logs one line and stops the server (without BentoML's respawning, as in
  its containers, the worker just exits: the server then exits non-zero by itself).

:func:`server_worker` applies both to a service's ``__init__``. Outside a server worker (the
service run in process, e.g. through ``to_asgi()`` in tests) it changes nothing: errors
propagate as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, ParamSpec

__all__ = ["in_server_worker", "exit_with_parent", "stop_server", "server_worker"]

log = logging.getLogger("modeconn.service")

P = ParamSpec("P")

#: The module ``bentoml serve`` runs as each worker process.
_WORKER_MAIN = "_bentoml_impl.worker.service"
#: The process that started this one, read when the service module is imported (early).
_PARENT = os.getppid()
#: Exit status of a worker that cannot start (uvicorn uses 3 for a failed startup).
_CANNOT_START = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_MARK = "__modeconn_server_worker__"
_watching = False


def in_server_worker() -> bool:
    """Whether this process is a worker started by ``bentoml serve``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == _WORKER_MAIN


def exit_with_parent(*, grace_s: float = 5.0, poll_s: float = 0.5) -> bool:
    """In a server worker, exit when the server process is gone: first gracefully (SIGTERM:
    uvicorn closes the socket and finishes its requests), after ``grace_s`` seconds at once.
    Returns whether the worker is watched (False outside a server worker). Idempotent."""
    global _watching
    if _watching or not in_server_worker():
        return _watching
    _watching = True
    _set_parent_death_signal(signal.SIGTERM)
    threading.Thread(
        target=_watch_parent,
        args=(_PARENT, grace_s, poll_s),
        name="modeconn-parent-watch",
        daemon=True,
    ).start()
    return True


def stop_server(err: BaseException) -> NoReturn:
    """In a server worker, after ``err`` stopped the service from starting: log one line, stop
    the server (SIGTERM to ``bentoml serve``: it stops every worker and closes the socket, as
    on Ctrl+C) and exit. Without BentoML's respawning the worker only exits, and BentoML exits
    non-zero once it has no worker left."""
    if isinstance(err, OSError | ValueError | TypeError | RuntimeError):  # says what to fix
        log.critical("cannot start the service: %s; stopping the server", err)
    else:  # a bug: its traceback helps
        log.critical("cannot start the service; stopping the server", exc_info=err)
    if _respawned() and _parent_is_server():
        with contextlib.suppress(OSError):
            os.kill(_PARENT, signal.SIGTERM)
    _exit(_CANNOT_START)


def server_worker(init: Callable[P, None]) -> Callable[P, None]:
    """Decorate a BentoML service's ``__init__``: in a server worker, the worker exits with the
    server (:func:`exit_with_parent`) and an exception from ``__init__`` stops the server with
    one log line (:func:`stop_server`). Elsewhere ``__init__`` runs unchanged. Idempotent."""
    if getattr(init, _MARK, False):
        return init

    @functools.wraps(init)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        exit_with_parent()
        try:
            init(*args, **kwargs)
        except Exception as err:
            if not in_server_worker():
                raise
            stop_server(err)

    setattr(wrapper, _MARK, True)
    return wrapper


# ---------------------------------------------------------------------------------------------


def _watch_parent(parent: int, grace_s: float, poll_s: float) -> None:
    # A dead parent's children are adopted by init (or a subreaper): the parent pid changes.
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("the server process (pid %d) is gone; this worker stops and frees the port", parent)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop (a no-op if under way)
    time.sleep(grace_s)
    log.warning("graceful stop still under way after %.0f s: exiting now", grace_s)
    _exit(1)


def _set_parent_death_signal(sig: int) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watching thread still does the job
        pass


def _respawned() -> bool:
    """Whether ``bentoml serve`` starts a new worker when one exits (not in its containers)."""
    try:
        from bentoml.serving import running_inside_container
    except ImportError:
        return not (
            "BENTOML_CONTAINERIZED" in os.environ or "BENTOCLOUD_DEPLOYMENT_URL" in os.environ
        )
    return not running_inside_container()


def _parent_is_server() -> bool:
    """Whether the process that started this one is still there and is ``bentoml serve`` (and
    not, say, a Python program serving through ``bentoml.serve()``: that one is not ours to
    stop)."""
    if os.getppid() != _PARENT:
        return False
    try:
        import psutil

        argv = psutil.Process(_PARENT).cmdline()
    except Exception:  # psutil missing, or the process gone: nothing to stop
        return False
    launched = any(Path(arg).name.startswith("bentoml") for arg in argv[:4])
    return launched and any(arg.startswith("serve") for arg in argv[1:6])


def _exit(code: int) -> NoReturn:
    """Exit at once (from any thread, during startup), the log written out first."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
