"""Garipov et al.'s curves (Bezier, polygonal chain): the seed's ring, the Bernstein basis, exact
endpoints (BatchNorm models included), resumable fits, digits MLPs, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeconn.artifact import load_artifact
from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.evaluate import evaluate_energy_path, predict
from modeconn.fit.configs import CurveConfig
from modeconn.fit.connect import connect
from modeconn.fit.curves import CurveTrainer, curve_lr_factor
from modeconn.fit.methods import make_config
from modeconn.fit.objective import energy_objective
from modeconn.paths import Bezier, PolyChain, bezier_coefficients, linear
from modeconn.pipeline import fit_artifact
from modeconn.types import VECTOR_KEY

A_RING = torch.tensor([1.0, 0.0])
B_RING = torch.tensor([-1.0, 0.0])


def ring(w: torch.Tensor) -> torch.Tensor:
    """The seed's ring ``L(w1, w2) = (w1^2 + w2^2 - 1)^2``: minima on the unit circle."""
    return (w.pow(2).sum() - 1) ** 2


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- the basis -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_bernstein_coefficients_match_the_formula(k):
    start, end = {VECTOR_KEY: A_RING}, {VECTOR_KEY: B_RING}
    trainer = (
        CurveTrainer(energy_objective(ring), start, end, CurveConfig(nodes=k)) if k >= 3 else None
    )
    for t in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        expected = [math.comb(k - 1, i) * t**i * (1 - t) ** (k - 1 - i) for i in range(k)]
        got = bezier_coefficients(t, k).tolist()
        assert got == pytest.approx(expected, abs=1e-12)
        assert sum(got) == pytest.approx(1.0)
        if trainer is not None:  # the trainer's per-step basis is the same
            assert trainer.coefficients(t).tolist() == pytest.approx(expected, abs=1e-6)


def test_the_quadratic_bezier_is_the_seeds_formula():
    a, theta, b = torch.randn(3, 5, dtype=torch.float64)
    path = Bezier({VECTOR_KEY: torch.stack([a, theta, b])}, is_vector=True)
    for t in (0.2, 0.5, 0.8):
        expected = (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t**2 * b
        torch.testing.assert_close(path.at(t), expected)


def test_polychain_trainer_basis_matches_the_path():
    trainer = CurveTrainer(
        energy_objective(ring),
        {VECTOR_KEY: A_RING},
        {VECTOR_KEY: B_RING},
        CurveConfig(nodes=4),
        basis="polychain",
    )
    nodes = {VECTOR_KEY: torch.randn(4, 2)}
    for t in (0.0, 0.2, 1 / 3, 0.5, 0.99, 1.0):
        assert trainer.coefficients(t).tolist() == pytest.approx(
            PolyChain(nodes).coefficients(t).tolist(), abs=1e-6
        )


def test_learning_rate_schedule_is_the_papers():
    assert curve_lr_factor(0.0) == curve_lr_factor(0.5) == 1.0
    assert curve_lr_factor(0.7) == pytest.approx(1 - 0.2 / 0.4 * 0.99)
    assert curve_lr_factor(0.9) == pytest.approx(0.01)
    assert curve_lr_factor(0.95) == curve_lr_factor(1.0) == 0.01


# -- the ring ------------------------------------------------------------------------------


def test_straight_path_through_the_ring_peaks_at_one():
    ev = evaluate_energy_path(ring, linear(A_RING, B_RING), points=61)
    assert max(ev["loss"]) == pytest.approx(1.0)  # w(0.5) = 0, L = (0 - 1)^2
    assert ev["barrier"]["mean"] == pytest.approx(1.0)


def test_bezier_on_the_ring_with_defaults_reaches_the_optimum():
    stats: dict = {}
    path = connect(ring, A_RING, B_RING, method="bezier", stats=stats)
    assert isinstance(path, Bezier) and path.is_vector and path.num_nodes == 3
    ev = evaluate_energy_path(ring, path, points=61)
    assert ev["mean_loss"] <= 0.025  # optimum ~0.019
    theta = path.node(1)
    assert abs(float(theta[0])) < 0.1 and abs(float(theta[1])) == pytest.approx(2.12, abs=0.1)
    assert torch.equal(path.at(0.0), A_RING) and torch.equal(path.at(1.0), B_RING)
    assert stats["gradient_evaluations"] == stats["steps"] == 50 * 100


def test_polychain_on_the_ring_with_defaults():
    path = connect(ring, A_RING, B_RING, method="polychain", seed=1)
    assert isinstance(path, PolyChain)
    assert evaluate_energy_path(ring, path, points=61)["mean_loss"] <= 0.10  # optimum ~0.083
    assert torch.equal(path.at(0.0), A_RING) and torch.equal(path.at(1.0), B_RING)


def test_without_perturbation_the_straight_line_never_bends():
    """The reason for the seeded perturbation: the line through the saddle is stationary."""
    path = connect(ring, A_RING, B_RING, method="bezier", init_noise=0.0, epochs=3)
    assert float(path.node(1)[1]) == 0.0
    assert max(evaluate_energy_path(ring, path)["loss"]) > 0.9


def test_seed_picks_the_side_and_is_reproducible():
    p1 = connect(ring, A_RING, B_RING, method="bezier", epochs=10, seed=3)
    p2 = connect(ring, A_RING, B_RING, method="bezier", epochs=10, seed=3)
    assert torch.equal(p1.nodes[VECTOR_KEY], p2.nodes[VECTOR_KEY])


# -- models --------------------------------------------------------------------------------


def test_bn_model_endpoints_are_exact_in_the_artifact(bn_pair, digits, tmp_path):
    a, b = (load_checkpoint(p) for p in bn_pair)
    artifact, metrics = fit_artifact(
        a, b, digits, "bezier", out=tmp_path / "bz", params={"epochs": 2}, eval_points=3
    )
    loaded = load_artifact(tmp_path / "bz")
    assert loaded.manifest.basis == "bezier" and loaded.manifest.num_nodes == 3
    assert loaded.manifest.fit["stats"]["gradient_evaluations"] == 2 * (1437 // 128)
    model = loaded.build_model()
    for t, ckpt in ((0.0, a), (1.0, b)):
        state = loaded.state_at(t)
        for key, value in ckpt.state.items():
            if "running" not in key and "num_batches" not in key:
                assert torch.equal(state[key], value), key  # parameters: bit for bit
        assert {k for k in state if "running_mean" in k} == {
            k for k in ckpt.state if "running_mean" in k
        }
        acc = float(
            (predict(model, state, digits.x_test).argmax(-1) == digits.y_test).float().mean()
        )
        assert acc == pytest.approx(ckpt.meta["metrics"]["test_acc"], abs=0.02)
    with pytest.raises(ValueError, match="no stored BatchNorm statistics"):
        loaded.state_at(0.123)


def test_bezier_removes_most_of_the_barrier_between_digits_mlps(mlp_pair, digits):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    _, straight = fit_artifact(a, b, digits, "linear", eval_points=21)
    _, curve = fit_artifact(a, b, digits, "bezier", params={"epochs": 100}, eval_points=21)
    assert straight["loss_barrier"]["mean"] > 0.1
    assert curve["loss_barrier"]["mean"] <= 0.2 * straight["loss_barrier"]["mean"]
    worse = 1 - min(a.meta["metrics"]["test_acc"], b.meta["metrics"]["test_acc"])
    assert curve["worst_test_error"] <= worse + 0.015


def test_batch_size_reaches_the_objective():
    config = make_config("bezier", batch_size=64, epochs=1)
    assert config.batch_size == 64 and config.nodes == 3 and config.lr == 0.015


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="nodes"):
        make_config("bezier", nodes=2)
    with pytest.raises(ValueError, match="lr"):
        make_config("polychain", lr=-1.0)
    with pytest.raises(ValueError, match="unknown_option"):
        make_config("bezier", unknown_option=1)


# -- CLI -----------------------------------------------------------------------------------


def test_cli_connect_bezier_and_polychain(mlp_pair, tmp_path, capsys):
    out = tmp_path / "bz"
    code, text, _ = run_cli(
        capsys, "connect", *mlp_pair, "--method", "bezier", "--epochs", "3",
        "--out", out, "--eval-points", "5",
    )  # fmt: skip
    assert code == 0 and "bezier path with 3 nodes" in text and "loss barrier" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["basis"] == "bezier" and manifest["fit"]["config"]["epochs"] == 3
    assert manifest["fit"]["stats"]["steps"] == 3 * (1437 // 128)
    assert not list(tmp_path.glob(".*fit-state*"))  # the fit checkpoint is removed when done

    out = tmp_path / "pc"
    code, text, _ = run_cli(
        capsys, "connect", *mlp_pair, "--method", "polychain", "--nodes", "4", "--epochs", "2",
        "--batch-size", "256", "--out", out, "--eval-points", "0",
    )  # fmt: skip
    assert code == 0
    artifact = load_artifact(out)
    assert artifact.manifest.basis == "polychain" and artifact.path.num_nodes == 4
    assert artifact.manifest.fit["stats"]["steps"] == 2 * (1437 // 256)


def test_cli_connect_bad_node_count_is_a_one_line_error(mlp_pair, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "connect", *mlp_pair, "--method", "bezier", "--nodes", "1", "--out", tmp_path / "x"
    )
    assert code == 2
    assert err.count("\n") == 1 and "nodes" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
