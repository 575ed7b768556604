"""Geodesic paths (Tan et al. 2023): the discrete JSD energy and its gradient against a hand
computation, JSD's properties, fixed endpoints, labels never read, exact resume, engines that
agree, BatchNorm models, and the lengths that land in the manifest."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from modeconn.checkpoint import load_checkpoint
from modeconn.cli import main
from modeconn.data import Dataset
from modeconn.evaluate import evaluate_path
from modeconn.fit.configs import GeodesicConfig
from modeconn.fit.connect import connect
from modeconn.fit.geodesic import (
    chain_energy,
    chain_length,
    fit_geodesic,
    initial_nodes,
    node_log_probs,
)
from modeconn.fit.methods import make_config
from modeconn.fit.objective import model_objective
from modeconn.fit.state import FitContext
from modeconn.metrics import jsd_from_logits
from modeconn.models import create_model

# ---------------------------------------------------------------------------------------------
# A hand computation: a linear softmax model, 3 nodes, numpy in float64


def _toy():
    """A linear model (mlp with depth 0) on 4 features, 3 classes, 6 inputs; float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    data = Dataset(
        name="toy",
        x_train=x,
        y_train=torch.zeros(6, dtype=torch.long),
        x_test=x,
        y_test=torch.zeros(6, dtype=torch.long),
        num_classes=3,
    )
    model = create_model("mlp", (4,), 3, depth=0).double()
    nodes = [
        {
            "head.weight": torch.randn(3, 4, generator=gen, dtype=torch.float64),
            "head.bias": torch.randn(3, generator=gen, dtype=torch.float64),
        }
        for _ in range(3)
    ]
    return model, data, nodes


def _np_energy(x: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]) -> float:
    """sum_i mean_x JSD(p_i || p_{i+1}) with the textbook formula, in numpy."""
    probs = []
    for w, b in zip(weights, biases):
        z = x @ w.T + b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    total = 0.0
    for p, q in zip(probs[:-1], probs[1:]):
        m = 0.5 * (p + q)
        kl_pm = (p * np.log(p / m)).sum(axis=1)
        kl_qm = (q * np.log(q / m)).sum(axis=1)
        total += float((0.5 * kl_pm + 0.5 * kl_qm).mean())
    return total


@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_energy_and_gradient_match_a_hand_computation(engine):
    model, data, nodes = _toy()
    objective = model_objective(model, data, batch_size=6)
    x = data.x_train.numpy()
    ws = [n["head.weight"].numpy() for n in nodes]
    bs = [n["head.bias"].numpy() for n in nodes]
    expected = _np_energy(x, ws, bs)

    stacked = {k: torch.stack([n[k] for n in nodes]).requires_grad_() for k in nodes[0]}
    with objective.session():
        log_probs = node_log_probs(objective, stacked, data.x_train, engine=engine)  # (3, 6, 3)
        energy = chain_energy(log_probs)
    assert float(energy.detach()) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert expected > 1e-3  # the models differ: a real test, not 0 == 0

    # Gradient with respect to the middle node against central finite differences.
    energy.backward()
    h = 1e-6
    for key, arr in (("head.weight", ws[1]), ("head.bias", bs[1])):
        grad = stacked[key].grad[1].numpy()
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            wp = [ws[0], plus if key == "head.weight" else ws[1], ws[2]]
            bp = [bs[0], plus if key == "head.bias" else bs[1], bs[2]]
            wm = [ws[0], minus if key == "head.weight" else ws[1], ws[2]]
            bm = [bs[0], minus if key == "head.bias" else bs[1], bs[2]]
            fd[idx] = (_np_energy(x, wp, bp) - _np_energy(x, wm, bm)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
        assert np.abs(fd).max() > 1e-4


def test_jsd_is_zero_for_identical_models_symmetric_and_finite_when_saturated():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 10, generator=gen)
    b = torch.randn(50, 10, generator=gen)
    assert float(jsd_from_logits(a, a).abs().max()) < 1e-6
    torch.testing.assert_close(jsd_from_logits(a, b), jsd_from_logits(b, a), rtol=1e-6, atol=1e-7)

    # A chain of three identical models has zero energy and zero length.
    same = torch.log_softmax(a, -1).expand(3, 50, 10)
    assert float(chain_energy(same)) < 1e-6
    assert chain_length(same) < 3e-3  # sqrt of rounding noise

    # Saturated outputs: one-hot distributions that disagree give log 2, with finite gradients.
    hot = torch.tensor([[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4]], requires_grad=True)
    other = torch.tensor([[-1e4, 1e4, -1e4], [-1e4, 1e4, -1e4]])
    lp = torch.stack([torch.log_softmax(hot, -1), torch.log_softmax(other, -1)])  # (2, 2, 3)
    energy = chain_energy(lp)
    assert torch.isfinite(energy)
    assert float(energy.detach()) == pytest.approx(
        0.5 * np.log(2.0), rel=1e-6
    )  # mean of (log 2, 0)
    energy.backward()
    assert bool(torch.isfinite(hot.grad).all())


def test_initial_nodes_are_evenly_on_the_line():
    a = {"w": torch.zeros(2, 3)}
    b = {"w": torch.full((2, 3), 8.0)}
    nodes = initial_nodes(a, b, 5)  # interior at t = 0.25, 0.5, 0.75
    torch.testing.assert_close(nodes["w"][:, 0, 0], torch.tensor([2.0, 4.0, 6.0]))
    noisy = initial_nodes(a, b, 5, noise=1e-3, generator=torch.Generator().manual_seed(0))
    deviation = (noisy["w"] - nodes["w"]).abs().max()
    assert 0 < float(deviation) < 0.05  # tiny, relative to |B - A| = 8


# ---------------------------------------------------------------------------------------------
# Fitting on digits MLPs


def _pair(mlp_pair):
    a, b = load_checkpoint(mlp_pair[0]), load_checkpoint(mlp_pair[1])
    return a.build_model(), a.state, b.state


def test_fit_shortens_the_path_and_never_moves_the_endpoints(mlp_pair, digits):
    model, sa, sb = _pair(mlp_pair)
    stats: dict = {}
    path = connect(model, sa, sb, "geodesic", data=digits, nodes=7, steps=150, stats=stats, seed=3)
    assert path.kind == "polychain" and path.num_nodes == 7
    torch.testing.assert_close(path.knots(), torch.linspace(0, 1, 7, dtype=torch.float64))
    for key, value in path.nodes.items():
        assert torch.equal(value[0], sa[key])  # bitwise: the endpoints never move
        assert torch.equal(value[-1], sb[key])
    assert stats["steps"] == 150 and stats["gradient_evaluations"] == 150 * 5
    assert stats["energy_after"] < 0.8 * stats["energy_before"]
    assert stats["length_after"] < stats["length_before"]
    history = stats["energy_history"]
    assert len(history["step"]) == len(history["energy"]) <= 100
    assert history["step"][-1] == 150
    json.dumps(stats)  # lands in the manifest


class _InputsOnly:
    """The training inputs of a data set; touching anything else (the labels) fails the test."""

    def __init__(self, data: Dataset):
        self.x_train = data.x_train
        self.augment = data.augment

    def __getattr__(self, name):
        raise AssertionError(f"the geodesic fitter read data.{name}")


def test_labels_are_never_read(mlp_pair, digits):
    model, sa, sb = _pair(mlp_pair)
    config = make_config("geodesic", nodes=5, steps=30, batch_size=128, seed=1)
    reference = connect(model, sa, sb, "geodesic", data=digits, **config.model_dump())

    objective = model_objective(model, digits, batch_size=128)
    blind = dataclasses.replace(objective, data=_InputsOnly(digits))
    with blind.session():
        path = fit_geodesic(blind, sa, sb, config, FitContext())
    # Scrambled labels too: the same path, bit for bit.
    perm = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))
    scrambled = dataclasses.replace(digits, y_train=(digits.y_train[perm] + 3) % 10)
    other = connect(model, sa, sb, "geodesic", data=scrambled, **config.model_dump())
    for key in reference.nodes:
        assert torch.equal(path.nodes[key], reference.nodes[key])
        assert torch.equal(other.nodes[key], reference.nodes[key])


def test_a_larger_budget_continues_a_finished_fit(mlp_pair, digits, tmp_path):
    """The step budget is not part of the fingerprint: 40 steps, then 50, equal 50 at once."""
    model, sa, sb = _pair(mlp_pair)
    options = dict(nodes=6, steps=40, batch_size=64, seed=2, optimizer="sgd", lr=0.2, momentum=0.5)
    state = tmp_path / "fit-state.safetensors"
    full = connect(model, sa, sb, "geodesic", data=digits, checkpoint=state, **options)
    longer_options = {**options, "steps": 50}
    longer = connect(
        model, sa, sb, "geodesic", data=digits, checkpoint=state, resume=True, **longer_options
    )
    straight = connect(model, sa, sb, "geodesic", data=digits, **longer_options)
    for key in full.nodes:
        assert torch.equal(longer.nodes[key], straight.nodes[key])
    assert not torch.equal(longer.nodes["head.weight"], full.nodes["head.weight"])
    with pytest.raises(ValueError, match="at step 50, beyond this budget.s 30 steps"):
        connect(model, sa, sb, "geodesic", data=digits, checkpoint=state, resume=True,
                **{**options, "steps": 30})  # fmt: skip


def test_vmap_and_loop_engines_agree(mlp_pair, digits):
    model, sa, sb = _pair(mlp_pair)
    options = dict(nodes=5, steps=20, batch_size=128)
    paths = [
        connect(model, sa, sb, "geodesic", data=digits, engine=engine, **options)
        for engine in ("vmap", "loop")
    ]
    for key in paths[0].nodes:
        torch.testing.assert_close(paths[0].nodes[key], paths[1].nodes[key], rtol=1e-4, atol=1e-5)


def test_length_agrees_with_the_path_evaluation(mlp_pair, digits):
    """Our sum sqrt(JSD) over the nodes equals eval-path's prediction length at the knots."""
    model, sa, sb = _pair(mlp_pair)
    path = connect(model, sa, sb, "geodesic", data=digits, nodes=6, steps=20)
    objective = model_objective(model, digits)
    with objective.session(), torch.no_grad():
        mine = chain_length(node_log_probs(objective, path.nodes, digits.x_train))
    evaluation = evaluate_path(model, path, digits, ts=[float(t) for t in path.knots()])
    assert mine == pytest.approx(evaluation.prediction_length, rel=1e-4)


def test_energy_functions_are_refused():
    with pytest.raises(TypeError, match="predictive distribution"):
        connect(lambda w: (w**2).sum(), torch.zeros(2), torch.ones(2), "geodesic")


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="nodes"):
        make_config("geodesic", nodes=1)
    with pytest.raises(ValueError, match="engine"):
        make_config("geodesic", engine="gpu-magic")
    assert GeodesicConfig().lr == 0.1 and GeodesicConfig().batch_size == 256


def test_batchnorm_nodes_use_their_own_batch_statistics(bn_pair, digits):
    a, b = load_checkpoint(bn_pair[0]), load_checkpoint(bn_pair[1])
    model = a.build_model()
    objective = model_objective(model, digits, batch_size=64)
    sa = {k: a.state[k] for k, _ in model.named_parameters()}
    sb = {k: b.state[k] for k, _ in model.named_parameters()}
    interior = initial_nodes(sa, sb, 4)
    x = digits.x_train[:64]
    with objective.session():
        lp_v = node_log_probs(objective, interior, x, engine="vmap")  # (2, 64, 10)
        lp_l = node_log_probs(objective, interior, x, engine="loop")
        # Each node alone, in batch-statistics mode, gives the same outputs.
        alone = torch.log_softmax(objective.forward({k: v[1] for k, v in interior.items()}, x), -1)
    torch.testing.assert_close(lp_v, lp_l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp_l[1], alone)
    stats: dict = {}
    path = connect(model, a.state, b.state, "geodesic", data=digits, nodes=4, steps=5, stats=stats)
    assert stats["engine"] == "loop"  # convolutions on CPU: the measured faster engine
    assert path.num_nodes == 4
    # The session restored the model's own running statistics.
    assert all(m.running_mean is not None for m in model.modules() if hasattr(m, "running_mean"))


def test_cli_records_lengths_in_the_manifest(mlp_pair, tmp_path, capsys):
    out = tmp_path / "geo"
    argv = [*mlp_pair, "--method", "geodesic", "--nodes", "5", "--steps", "40"]
    assert main(["--quiet", "connect", *argv, "--align", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["fit"]["stats"]
    assert manifest["method"] == "geodesic" and manifest["num_nodes"] == 5
    assert manifest["fit"]["config"]["batch_size"] == 256
    assert stats["length_after"] < stats["length_before"]
    assert manifest["metrics"]["prediction_length"] > 0
    assert "geodesic path with 5 nodes" in capsys.readouterr().out
