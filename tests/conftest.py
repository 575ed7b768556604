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
    from modeconn.train import TrainConfig, train_model
    from models import create_model

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
