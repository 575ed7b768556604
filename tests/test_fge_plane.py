"""Fast Geometric Ensembling and the loss plane of a 3-node curve (Garipov et al. 2018)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeconn.artifact import load_artifact
from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.evaluate import evaluate_path, predict
from modeconn.fit.connect import connect
from modeconn.fit.fge import fge_lr
from modeconn.paths import Bezier, PointSet, linear, stack_nodes
from modeconn.pipeline import ensemble_metrics, fit_artifact
from modeconn.plane import loss_plane, plane_basis

NUM_STEPS = 1437 // 128  # digits: steps per epoch at batch 128


def run_cli(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- FGE -----------------------------------------------------------------------------------


def test_triangular_schedule():
    assert fge_lr(0.0, 0.05, 1e-4) == pytest.approx(0.05)
    assert fge_lr(0.25, 0.05, 1e-4) == pytest.approx((0.05 + 1e-4) / 2)
    assert fge_lr(0.5, 0.05, 1e-4) == pytest.approx(1e-4)
    assert fge_lr(0.75, 0.05, 1e-4) == pytest.approx((0.05 + 1e-4) / 2)
    assert fge_lr(0.999, 0.05, 1e-4) == pytest.approx(0.05, rel=0.01)


def test_fge_members_differ_and_the_ensemble_is_not_worse(mlp_pair, digits):
    a = load_checkpoint(mlp_pair[0])
    model = a.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats: dict = {}
    members = connect(
        model, a.state, None, "fge", data=digits, cycles=3, cycle_epochs=4, stats=stats
    )
    assert isinstance(members, PointSet) and members.num_nodes == 3
    assert [float(k) for k in members.knots()] == [0.0, 0.5, 1.0]
    assert stats["gradient_evaluations"] == 3 * 4 * NUM_STEPS
    assert stats["collect_step_in_cycle"] == 2 * NUM_STEPS  # mid-cycle: the lr minimum
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    states = [members.at(float(t)) for t in members.knots()]
    for i in range(3):
        for j in range(i):
            dist = sum(float((states[i][k] - states[j][k]).norm()) for k in states[i])
            assert dist > 1e-3
    ens = ensemble_metrics(model, states, digits)
    start = ensemble_metrics(model, [a.state], digits)
    assert ens["test_nll"] <= ens["test_member_nll_mean"]  # averaging probabilities helps
    assert ens["test_nll"] <= start["test_nll"] * 1.05
    assert ens["test_acc"] >= start["test_acc"] - 0.01


def test_fge_artifact_of_a_bn_model_loads_as_points(bn_pair, digits, tmp_path):
    a = load_checkpoint(bn_pair[0])
    artifact, metrics = fit_artifact(
        a, None, digits, "fge", out=tmp_path / "fge", params={"cycles": 2, "cycle_epochs": 2}
    )
    loaded = load_artifact(tmp_path / "fge")
    m = loaded.manifest
    assert m.kind == "points" and m.method == "fge" and m.basis == "points"
    assert m.num_nodes == 2 and m.knots == [0.0, 1.0] and m.served_ts == [0.0, 1.0]
    assert m.endpoints["a"]["file"] == bn_pair[0] and "b" not in m.endpoints
    assert set(loaded.buffers) == {0.0, 1.0}
    model = loaded.build_model()
    for t in (0.0, 1.0):
        state = loaded.state_at(t)
        assert any("running_var" in k for k in state)
        acc = float(
            (predict(model, state, digits.x_test).argmax(-1) == digits.y_test).float().mean()
        )
        assert acc == pytest.approx(metrics["test_acc"][int(t)], abs=1e-6)
    with pytest.raises(ValueError):
        loaded.state_at(0.5)  # a point set has no path between its members
    assert metrics["ensemble"]["members"] == 2 and 0.5 < metrics["ensemble"]["test_acc"] <= 1
    assert not list(tmp_path.glob(".*fit-state*"))


def test_cli_fge(mlp_pair, tmp_path, capsys):
    out = tmp_path / "fge"
    code, text, _ = run_cli(
        capsys, "fge", mlp_pair[0], "--cycles", "2", "--cycle-epochs", "2", "--out", out
    )
    assert code == 0 and "FGE ensemble of 2 members" in text and "ensemble: test acc" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "points" and manifest["fit"]["config"]["cycles"] == 2


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--cycles", "1"], "cycles"),
        (["--lr2", "-1"], "lr2"),
    ],
)
def test_cli_fge_bad_input_is_a_one_line_error(mlp_pair, tmp_path, capsys, argv, needle):
    code, _, err = run_cli(capsys, "fge", mlp_pair[0], *argv, "--out", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_fge_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fge", tmp_path / "nope.safetensors", "--out", tmp_path / "x")
    assert code == 2 and "not found" in err and err.count("\n") == 1


# -- the plane -----------------------------------------------------------------------------


def _curve(a_state, b_state, model, seed=0):
    """A Bezier curve with a random middle node, of the model's parameters."""
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    a = {n: a_state[n] for n in names}
    b = {n: b_state[n] for n in names}
    theta = {n: 0.5 * (a[n] + b[n]) + 0.05 * torch.randn(a[n].shape, generator=gen) for n in names}
    return Bezier(stack_nodes([a, theta, b]))


def test_plane_projects_the_nodes_to_their_coordinates(mlp_pair, digits):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    model = a.build_model()
    path = _curve(a.state, b.state, model)
    flat = [
        np.concatenate([path.nodes[k][i].double().numpy().ravel() for k in path.nodes])
        for i in range(3)
    ]
    # Independent Gram-Schmidt in numpy.
    u = flat[2] - flat[0]
    dx = np.linalg.norm(u)
    d = flat[1] - flat[0]
    tx = d @ (u / dx)
    ty = np.linalg.norm(d - tx * u / dx)
    plane = loss_plane(model, path, digits, grid=3, margin=0.0)
    assert np.allclose(plane.nodes, [[0, 0], [tx, ty], [dx, 0]], atol=1e-6)
    assert plane.max_residual < 1e-6  # a 3-node Bezier lies in its plane
    assert len(plane.xs) == len(plane.ys) == 3
    assert np.asarray(plane.loss).shape == (3, 3) and np.asarray(plane.error).shape == (3, 3)
    assert plane.curve[0] == pytest.approx([0, 0], abs=1e-6)
    assert plane.curve[-1] == pytest.approx([dx, 0], abs=1e-6)
    # Without margin the grid's corner (0, 0) is A itself (tx lies between 0 and dx here).
    assert plane.xs[0] == pytest.approx(0.0) and plane.ys[0] == pytest.approx(0.0)
    lp = predict(model, a.state, digits.x_train)
    assert plane.loss[0][0] == pytest.approx(float(F.nll_loss(lp, digits.y_train)), rel=1e-4)
    basis = plane_basis(path)
    assert float(basis.u @ basis.v) == pytest.approx(0.0, abs=1e-9)
    assert float(basis.u.norm()) == pytest.approx(1.0) == float(basis.v.norm())


def test_plane_of_a_bn_model_recomputes_statistics(bn_pair, digits):
    a, b = (load_checkpoint(p) for p in bn_pair)
    model = a.build_model()
    path = _curve(a.state, b.state, model)
    plane = loss_plane(model, path, digits, grid=2, margin=0.0, split="test")
    ev = evaluate_path(model, path, digits, ts=[0.0, 1.0])
    assert plane.loss[0][0] == pytest.approx(ev.test_loss[0], rel=1e-4)


def test_plane_needs_a_three_node_curve(mlp_pair):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    with pytest.raises(ValueError, match="3 nodes"):
        plane_basis(linear(a.state, b.state))
    collinear = Bezier(
        stack_nodes([a.state, {k: (a.state[k] + b.state[k]) / 2 for k in a.state}, b.state])
    )
    with pytest.raises(ValueError, match="straight line"):
        plane_basis(collinear)


def test_cli_plane_writes_json_and_plot(mlp_pair, tmp_path, capsys):
    curve_dir = tmp_path / "bz"
    code, _, _ = run_cli(
        capsys, "connect", *mlp_pair, "--method", "bezier", "--epochs", "2",
        "--out", curve_dir, "--eval-points", "0",
    )  # fmt: skip
    assert code == 0
    code, text, _ = run_cli(
        capsys, "plane", curve_dir, "--grid", "4", "--json", tmp_path / "p.json",
        "--plot", tmp_path / "p.png",
    )  # fmt: skip
    assert code == 0 and "wrote" in text
    data = json.loads((tmp_path / "p.json").read_text())
    assert len(data["xs"]) == 4 and len(data["loss"]) == 4 and len(data["loss"][0]) == 4
    assert data["nodes"][0] == [0.0, 0.0] and data["split"] == "train"
    assert len(data["curve"]) == 61 and data["min_loss"] <= data["max_loss"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plane_on_a_straight_path_is_a_one_line_error(mlp_pair, tmp_path, capsys):
    line_dir = tmp_path / "line"
    code, _, _ = run_cli(capsys, "connect", *mlp_pair, "--out", line_dir, "--eval-points", "0")
    assert code == 0
    code, _, err = run_cli(capsys, "plane", line_dir, "--plot", tmp_path / "p.png")
    assert code == 2 and err.count("\n") == 1 and "3 nodes" in err
    assert not (tmp_path / "p.png").exists()
