"""Serving bundles are served only as built, and the server's lifetime is bounded.

* every graph's sha256 is in the serving index; a graph whose bytes changed (still valid ONNX) is
  refused with one log line and a 503, at load (preload) or at first use and export (lazy), while
  the other graphs and paths keep serving;
* only regular files inside the artifact's serving directory are opened or sent (no symlinks, no
  file names that leave it);
* a server with nothing to serve exits with one line instead of restarting its worker forever;
* a worker exits when `bentoml serve` is killed, so the port is free for the next start;
* `serve-build` removes the temporary folders of killed runs (never those of a live run), and
  `--force` keeps the bundle's ensemble sizes and t values.

The real-server tests serve ``ModeConnService`` with the :func:`service.lifecycle.server_worker`
decorator applied by a three-line wrapper module (the decorator is idempotent, so the wrapper
stays correct once ``service/service.py`` applies it itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from modeconn.checkpoint import load_checkpoint
from modeconn.formats import ServedGraph, read_index
from modeconn.pipeline import fit_artifact
from modeconn.serving import build_serving
from tests.bentoml_server import REPO

X = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)  # (N, 1, 8, 8)


@pytest.fixture(scope="module")
def bundles(mlp_pair, digits, tmp_path_factory) -> Path:
    """Two served MLP paths (``paths/a``, ``paths/b``), each an ensemble k=2 and a merge at 0.5
    (no cascade)."""
    root = tmp_path_factory.mktemp("bundles")
    a, b = (load_checkpoint(p) for p in mlp_pair)
    for name in ("a", "b"):
        out = root / "paths" / name
        fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
        build_serving(out, ks=(2,), ts=(0.5,), cascade=0)
    return root


NO_CASCADE = {"k": 0, "rule": "confidence", "threshold": 0.95}


@pytest.fixture
def root(bundles, tmp_path) -> Path:
    """A private copy of the bundles, free to tamper with."""
    copy = tmp_path / "models"
    shutil.copytree(bundles, copy, symlinks=True)
    return copy


def _corrupt(file: Path) -> None:
    """Change the weights of an ONNX graph; the file stays a valid graph that still runs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(file))
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.size > 1:
            init.CopyFrom(numpy_helper.from_array(-weights + 0.5, init.name))
            break
    onnx.save(model, str(file))


def _request(path: str, **fields):
    from service.schemas import PredictRequest

    return PredictRequest(path=path, inputs=X.tolist(), **fields)


def _load(root: Path, preload: bool):
    from service.catalog import Catalog

    return Catalog.load(root, device="cpu", preload=preload)


def _refused(call, status: int = 503) -> str:
    from service.catalog import RequestError

    with pytest.raises(RequestError) as caught:
        call()
    assert caught.value.status == status, caught.value.message
    return caught.value.message


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# ---------------------------------------------------------------------------------------------
# 1. What was built is what is served


def test_the_index_records_the_sha256_of_every_graph(bundles):
    index = read_index(bundles / "paths" / "a")
    assert len(index.graphs) == 2
    for graph in index.graphs:
        data = (bundles / "paths" / "a" / "serving" / graph.file).read_bytes()
        assert graph.sha256 == hashlib.sha256(data).hexdigest()


def test_an_index_of_the_previous_format_names_the_rebuild(root):
    art = root / "paths" / "a"
    index = json.loads((art / "serving" / "index.json").read_text())
    index["format"] = "modeconn.serving/2"
    for graph in index["graphs"]:
        graph.pop("sha256", None)
    (art / "serving" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"modeconn serve-build {art} --force"):
        read_index(art)


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "lazy"])
def test_a_corrupted_graph_is_refused_and_the_rest_keeps_serving(root, preload, caplog):
    from modeconn.runtime import OnnxModel

    file = root / "paths" / "a" / "serving" / "ensemble_k2.onnx"
    good = OnnxModel(file, device="cpu").run(X)["probabilities"]
    _corrupt(file)
    bad = OnnxModel(file, device="cpu").run(X)["probabilities"]
    assert not np.allclose(good, bad, atol=1e-3)  # still valid ONNX, wrong answers
    with caplog.at_level("INFO"):
        catalog = _load(root, preload)
        for _ in range(2):  # refused every time, logged once
            message = _refused(lambda: catalog.predict(_request("paths/a", k=2)))
            assert "sha256" in message and "modeconn serve-build" in message
            assert str(root) not in message  # no server paths in an HTTP answer
            _refused(lambda: catalog.export("paths/a", "ensemble", 2, None))
    refusals = [m for m in _errors(caplog) if "ensemble_k2.onnx" in m]
    assert len(refusals) == 1 and "sha256" in refusals[0], _errors(caplog)
    assert "\n" not in refusals[0]
    # The same path's other graph, and the other path, are served as built.
    merged = catalog.predict(_request("paths/a", mode="merged", t=0.5))
    assert len(merged.labels) == len(X)
    other = catalog.predict(_request("paths/b", k=2))
    np.testing.assert_allclose(other.probabilities, good, rtol=1e-5, atol=1e-6)
    graph, _ = catalog.export("paths/b", "ensemble", 2, None)
    assert graph.file.read_bytes() == (root / "paths/b/serving/ensemble_k2.onnx").read_bytes()


def test_a_graph_changed_after_start_is_not_exported(root):
    catalog = _load(root, preload=True)
    catalog.export("paths/a", "merged", None, 0.5)
    _corrupt(root / "paths" / "a" / "serving" / "merged_t0.5000.onnx")
    _refused(lambda: catalog.export("paths/a", "merged", None, 0.5))
    # The graph in memory is the one that was verified at start: it keeps answering.
    assert len(catalog.predict(_request("paths/a", mode="merged")).labels) == len(X)


_HTTP_CHECK = """
import json, sys, warnings
warnings.simplefilter("ignore")
from starlette.testclient import TestClient
from service.service import ModeConnService

body = {"path": "paths/a", "inputs": json.loads(sys.argv[1]), "k": 2}
with TestClient(ModeConnService.to_asgi(), raise_server_exceptions=False) as client:
    answers = [
        client.post("/predict", json=body),
        client.post("/export", json={"path": "paths/a", "k": 2}),
        client.get("/export", params={"path": "paths/a", "k": "2"}),
        client.post("/predict", json={**body, "path": "paths/b"}),
    ]
    batch = client.post("/predict_batch", json=[body])  # checked while the batch is parsed
print(json.dumps([[a.status_code, a.json()] for a in answers]))
print(json.dumps([batch.status_code, batch.json()]))
"""


def test_the_http_answer_to_a_corrupted_graph_is_a_503_error_body(root):
    # In a subprocess: a second ModeConnService.to_asgi() in one process (test_service has
    # one) registers BentoML's metrics twice.
    _corrupt(root / "paths" / "a" / "serving" / "ensemble_k2.onnx")
    env = {**os.environ, "MODECONN_ARTIFACTS": str(root), "MODECONN_PRELOAD": "0"}
    env.pop("MODECONN_MODELS", None)
    ran = subprocess.run(
        [sys.executable, "-c", _HTTP_CHECK, json.dumps(X.tolist())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    *refused, served = json.loads(ran.stdout.strip().splitlines()[-2])
    for status, body in refused:
        assert status == 503 and "sha256" in body["error"], body
    assert served[0] == 200, served
    status, body = json.loads(ran.stdout.strip().splitlines()[-1])
    assert status == 400 and "sha256" in body["error"], body  # a batch cannot answer 503


def test_serve_build_rebuilds_a_corrupted_bundle(root):
    art = root / "paths" / "a"
    file = art / "serving" / "ensemble_k2.onnx"
    _corrupt(file)
    index = build_serving(art)  # not --force: a bundle that fails its check is not up to date
    assert index.ensembles[2].sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert sorted(index.ensembles) == [2] and sorted(index.merged) == [0.5]


def test_a_corrupted_bundle_is_not_saved_to_the_model_store(root, monkeypatch, tmp_path):
    from modeconn.serving import save_to_store

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    _corrupt(root / "paths" / "a" / "serving" / "merged_t0.5000.onnx")
    with pytest.raises(ValueError, match="sha256"):
        save_to_store(root / "paths" / "a")


# ---------------------------------------------------------------------------------------------
# 2. Only the bundle's own regular files


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "sub/ensemble_k2.onnx",
        "..\\ensemble_k2.onnx",
        "..",
        ".hidden.onnx",
        "ensemble_k2.onnx\x00.txt",
        "index.json",
        "",
    ],
)
def test_a_graph_file_must_be_a_plain_name(name):
    with pytest.raises(ValidationError, match="plain"):
        ServedGraph(mode="merged", k=1, ts=[0.5], file=name, sha256="0" * 64)


def test_plain_graph_names_are_accepted():
    for name in ("ensemble_k4.onnx", "merged_t0.5000.onnx"):
        assert ServedGraph(mode="merged", k=1, ts=[0.5], file=name, sha256="a" * 64).file == name


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "lazy"])
def test_an_index_naming_a_file_outside_the_bundle_is_refused(root, preload, caplog):
    art = root / "paths" / "a"
    secret = root / "secret.onnx"
    secret.write_bytes(b"not for download")
    index = json.loads((art / "serving" / "index.json").read_text())
    index["graphs"][0]["file"] = os.path.relpath(secret, art / "serving")
    if "sha256" in index["graphs"][0]:  # whoever rewrites the index rewrites the hash too
        index["graphs"][0]["sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    (art / "serving" / "index.json").write_text(json.dumps(index))
    with caplog.at_level("INFO"):
        catalog = _load(root, preload)
    message = _refused(lambda: catalog.export("paths/a", "ensemble", 2, None))
    assert "paths/a" in message and str(root) not in message
    _refused(lambda: catalog.predict(_request("paths/a", mode="merged")))
    assert any("plain" in m for m in _errors(caplog)), _errors(caplog)
    assert sorted(catalog.paths) == ["paths/b"]  # /paths lists what is served
    assert len(catalog.predict(_request("paths/b")).labels) == len(X)


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "lazy"])
def test_a_symlinked_graph_is_never_opened_or_sent(root, preload, caplog):
    serving = root / "paths" / "a" / "serving"
    # The link points at the very bytes that were built: same sha256, still refused.
    moved = root / "elsewhere.onnx"
    os.replace(serving / "ensemble_k2.onnx", moved)
    (serving / "ensemble_k2.onnx").symlink_to(moved)
    with caplog.at_level("INFO"):
        catalog = _load(root, preload)
        message = _refused(lambda: catalog.export("paths/a", "ensemble", 2, None))
        assert "symbolic link" in message
        _refused(lambda: catalog.predict(_request("paths/a", k=2)))
    assert [m for m in _errors(caplog) if "symbolic link" in m]
    assert len(catalog.predict(_request("paths/a", mode="merged")).labels) == len(X)


# ---------------------------------------------------------------------------------------------
# 3 and 4. The server's lifetime (real `bentoml serve`)

_WRAPPER = '''
"""ModeConnService with the decorator service/service.py is to gain (service/lifecycle.py)."""
from service.lifecycle import server_worker
from service.service import ModeConnService

ModeConnService.inner.__init__ = server_worker(ModeConnService.inner.__init__)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def _serve(tmp_path: Path, env: dict[str, str]):
    """``bentoml serve`` of the wrapped service: yields ``(proc, port, log_file)``; afterwards
    the server and every process it started are gone."""
    import psutil

    module = tmp_path / "wrapped_service.py"
    module.write_text(textwrap.dedent(_WRAPPER))
    port, log_file = _free_port(), tmp_path / "server.log"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("bentoml")), "serve"]
            + ["wrapped_service:ModeConnService", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={
                **os.environ,
                "BENTOML_DO_NOT_TRACK": "True",
                "BENTOML_HOME": str(tmp_path / "bentoml"),
                "PYTHONPATH": pythonpath,
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started: list = []  # the workers seen, to end them should they outlive the server

    def track() -> None:
        with contextlib.suppress(psutil.Error):
            started.extend(psutil.Process(proc.pid).children(recursive=True))

    try:
        yield proc, port, log_file, track
    finally:
        track()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for worker in started:
            with contextlib.suppress(psutil.Error):
                worker.kill()


def _wait_ready(proc, port: int, log_file: Path, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log_file.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"bentoml serve not ready after {seconds} s:\n{log_file.read_text()}")


@pytest.mark.parametrize(
    ("case", "env"),
    [
        ("missing", {}),
        ("empty", {}),
        ("missing", {"BENTOML_CONTAINERIZED": "true"}),  # BentoML's no-respawn mode
    ],
    ids=["missing", "empty", "missing-in-container"],
)
def test_a_server_with_nothing_to_serve_exits_with_one_line(tmp_path, case, env):
    models = tmp_path / ("nowhere" if case == "missing" else "empty")
    if case == "empty":
        models.mkdir()
    with _serve(tmp_path, {"MODECONN_ARTIFACTS": str(models), **env}) as (proc, _, log_file, _t):
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"bentoml serve still running after 60 s:\n{log_file.read_text()}")
    text = log_file.read_text()
    lines = [line for line in text.splitlines() if "cannot start" in line]
    assert len(lines) == 1, text
    assert str(models) in lines[0] and "modeconn" in lines[0]
    assert "Traceback" not in text.split("cannot start")[0]  # nothing before the line
    assert text.count("Initializing service error") == 0, text
    if env:  # without respawn, BentoML itself exits non-zero once its worker is gone
        assert proc.returncode != 0


def test_workers_exit_when_the_server_is_killed(bundles, tmp_path):
    import psutil

    env = {"MODECONN_ARTIFACTS": str(bundles)}
    with _serve(tmp_path, env) as (proc, port, log_file, track):
        _wait_ready(proc, port, log_file)
        track()
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
        proc.kill()  # kill -9: the server cannot stop its workers
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [w for w in workers if w.is_running() and w.status() != "zombie"]
            if not alive and _port_is_free(port):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"workers {alive} still hold port {port}:\n{log_file.read_text()}")


# ---------------------------------------------------------------------------------------------
# 5. serve-build: the leftovers of killed runs, and --force


def _atomic_dir_run(target: Path, then: str) -> subprocess.Popen:
    """A process inside ``atomic_dir(target)`` that then kills itself or waits (``then``)."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from modeconn.io import atomic_dir
        with atomic_dir({str(target)!r}) as tmp:
            (tmp / "half.onnx").write_bytes(b"half a graph")
            print(tmp.name, flush=True)
            if {then!r} == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(300)
    """)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_serve_build_removes_temporary_folders_of_killed_runs_only(root):
    art = root / "paths" / "a"
    live = _atomic_dir_run(art / "serving", "wait")
    try:
        live_tmp = art / (live.stdout.readline().strip() if live.stdout else "")
        dead = _atomic_dir_run(art / "serving", "die")
        dead_tmp = art / (dead.stdout.readline().strip() if dead.stdout else "")
        dead.wait(timeout=30)
        assert dead_tmp.is_dir() and live_tmp.is_dir() and dead_tmp != live_tmp
        build_serving(art, force=True)
        assert not dead_tmp.exists()  # a killed run's leftovers
        assert live_tmp.is_dir()  # a run in progress keeps its folder
    finally:
        live.kill()
        live.wait(timeout=10)


def test_force_keeps_the_ensemble_sizes_and_t_values_of_the_bundle(root, capsys):
    from modeconn.cli import main

    art = root / "paths" / "a"
    assert main(["--quiet", "serve-build", str(art), "--force"]) == 0
    index = read_index(art)
    assert sorted(index.ensembles) == [2] and sorted(index.merged) == [0.5]
    assert index.requested == {"ks": [2], "ts": [0.5], "cascade": NO_CASCADE, "int8": False}
    assert "ensembles K = 2; merged t = 0.5; cascade: none" in capsys.readouterr().out
    # Only --k given: the t values stay those of the bundle.
    assert main(["--quiet", "serve-build", str(art), "--force", "--k", "3"]) == 0
    index = read_index(art)
    assert sorted(index.ensembles) == [3] and sorted(index.merged) == [0.5]


def test_a_bundle_of_the_previous_format_is_rebuilt_with_its_values(root):
    art = root / "paths" / "a"
    index = json.loads((art / "serving" / "index.json").read_text())
    index["format"] = "modeconn.serving/2"
    for graph in index["graphs"]:
        graph.pop("sha256", None)
    (art / "serving" / "index.json").write_text(json.dumps(index))
    rebuilt = build_serving(art)
    assert rebuilt.requested == {"ks": [2], "ts": [0.5], "cascade": NO_CASCADE, "int8": False}
    assert sorted(rebuilt.ensembles) == [2] and sorted(rebuilt.merged) == [0.5]


def test_atomic_dir_restores_a_directory_left_aside_and_keeps_what_it_cannot_judge(tmp_path):
    from modeconn import io

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead = int(gone.stdout)  # a pid that has exited
    target = tmp_path / "serving"
    aside = tmp_path / f".serving.{dead}@{io._HOST}.0a1b2c3d.old"  # killed between two renames
    aside.mkdir()
    (aside / "index.json").write_text("the previous bundle")
    elsewhere = tmp_path / f".serving.{dead}@another-host.abcd1234.tmp"  # its pid means nothing
    old_unowned, new_unowned = (
        tmp_path / ".serving.abcd1234.tmp",
        tmp_path / ".serving.efgh5678.tmp",
    )
    for folder in (elsewhere, old_unowned, new_unowned):
        folder.mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_unowned, (two_days_ago, two_days_ago))
    with pytest.raises(RuntimeError), io.atomic_dir(target):
        raise RuntimeError("the new bundle fails")
    assert (target / "index.json").read_text() == "the previous bundle"
    assert not aside.exists() and not old_unowned.exists()
    assert elsewhere.is_dir() and new_unowned.is_dir()
