"""Session fixtures: the digits data and small trained endpoint pairs, saved as real files."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from modeconn.data import load_data

    return load_data("digits")


def _train_pair(tmp_path_factory, digits, name: str, kwargs: dict, epochs: int) -> tuple[str, str]:
    from modeconn.checkpoint import save_checkpoint
    from modeconn.models import create_model
    from modeconn.train import TrainConfig, train_model

    folder = tmp_path_factory.mktemp(f"{name}_pair")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(name, digits.input_shape, digits.num_classes, **kwargs)
        metrics = train_model(model, digits, TrainConfig(epochs=epochs, seed=seed))
        path = folder / f"{name}_{seed}.safetensors"
        save_checkpoint(path, model, data="digits", seed=seed, metrics=metrics)
        files.append(str(path))
    return files[0], files[1]


@pytest.fixture(scope="session")
def mlp_pair(tmp_path_factory, digits) -> tuple[str, str]:
    """Two digits MLPs (64-32-32-10) from seeds 0 and 1, 40 epochs each (~96 % test accuracy)."""
    return _train_pair(tmp_path_factory, digits, "mlp", {"width": 32, "depth": 2}, epochs=40)


@pytest.fixture(scope="session")
def bn_pair(tmp_path_factory, digits) -> tuple[str, str]:
    """Two small digits CNNs with BatchNorm (channels 8, 16) from seeds 0 and 1."""
    return _train_pair(
        tmp_path_factory, digits, "cnn", {"channels": [8, 16], "norm": "bn"}, epochs=15
    )


@pytest.fixture(scope="session")
def mb_points():
    """The two deepest minima and the first saddle of Muller-Brown, computed here."""
    from landscapes import muller_brown, newton_stationary

    m_a = newton_stationary(muller_brown, [-0.56, 1.44])
    m_c = newton_stationary(muller_brown, [0.62, 0.03])
    saddle = newton_stationary(muller_brown, [-0.82, 0.62])
    eig = torch.linalg.eigvalsh(torch.func.hessian(muller_brown)(saddle))
    assert eig[0] < 0 < eig[1]  # index 1: a true saddle
    # The published values (Muller & Brown 1979): -146.70, -108.17 and -40.66.
    assert float(muller_brown(m_a)) == pytest.approx(-146.700, abs=1e-3)
    assert float(muller_brown(m_c)) == pytest.approx(-108.167, abs=1e-3)
    assert float(muller_brown(saddle)) == pytest.approx(-40.665, abs=1e-3)
    return m_a, m_c, saddle


@pytest.fixture(scope="session")
def models_root(mlp_pair, bn_pair, digits, tmp_path_factory):
    """A models directory for the service: paths/mlp (ensembles K = 2, 3; merged t = 0, 0.5;
    a cascade of 3 members, which adds the merged t = 1; an int8 copy of each), paths/cnn
    (BatchNorm; K = 2, t = 0.5; t = 0.3 skipped; no cascade) and "unbuilt" (no bundle)."""
    from modeconn.checkpoint import load_checkpoint
    from modeconn.pipeline import fit_artifact
    from modeconn.serving import build_serving

    root = tmp_path_factory.mktemp("served")
    for name, pair, ks, ts, cascade, int8 in (
        ("mlp", mlp_pair, (2, 3), (0.0, 0.5), 3, True),
        ("cnn", bn_pair, (2,), (0.5, 0.3), 0, False),  # 0.3 has no stored BN statistics: skipped
    ):
        a, b = (load_checkpoint(p) for p in pair)
        out = root / "paths" / name
        fit_artifact(a, b, digits, "linear", out=out, eval_points=3, served_ts=[0.0, 0.5, 1.0])
        build_serving(out, ks=ks, ts=ts, cascade=cascade, int8=int8, int8_tolerance=5.0)
    a, b = (load_checkpoint(p) for p in mlp_pair)
    fit_artifact(a, b, digits, "linear", out=root / "unbuilt", eval_points=0)
    return root


#: The in-process service's settings (the HTTP tests' expectations follow them).
SERVICE_ENV = {"MODECONN_MAX_BATCH": "64", "MODECONN_MAX_BODY_MB": "1"}


@pytest.fixture(scope="session")
def service_client(models_root):
    """One in-process client of the service (``TestClient`` over ``to_asgi()``) for the whole
    session: BentoML registers its metrics once per process, and its adaptive batcher belongs
    to the event loop of the first client. Settings: ``SERVICE_ENV``; a module that calls it
    sets them again while it does (``MODECONN_MAX_BATCH`` is read at each request)."""
    import warnings

    with warnings.catch_warnings():  # starlette asks for httpx2 instead of httpx
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from service.service import ModeConnService

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODECONN_ARTIFACTS", str(models_root))
        for name, value in SERVICE_ENV.items():
            mp.setenv(name, value)
        for name in ("MODECONN_MODELS", "MODECONN_API_KEY"):
            mp.delenv(name, raising=False)
        client = TestClient(ModeConnService.to_asgi(), raise_server_exceptions=False)
        client.__enter__()
        client.get("/readyz")  # builds the middleware: the gate reads its settings now
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def service_env():
    """``SERVICE_ENV`` set while a module uses ``service_client``."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SERVICE_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def asgi(service_client, service_env):
    """The service in process (``SERVICE_ENV``: bodies up to 1 MB, batches up to 64), every
    4xx body checked against its documented schema."""
    from tests.error_bodies import ErrorBodies

    hooks = service_client.event_hooks
    ErrorBodies(service_client.get("/docs.json").json()).install(service_client)
    yield service_client
    service_client.event_hooks = hooks
