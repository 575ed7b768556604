"""Ensembles along a path and merged models: member choice, uncertainty against hand-computed
values, K=1 equals the merged model, BatchNorm handling at t=0, and safetensors round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modeconn.artifact import PathArtifact, compute_served_buffers
from modeconn.checkpoint import load_checkpoint
from modeconn.ensemble import (
    Ensemble,
    arc_length_ts,
    choose_ts,
    ensemble_statistics,
    evaluate_ensemble,
)
from modeconn.merge import merge_at, merged_model, point_state, save_merged
from modeconn.paths import Bezier, PointSet, linear, stack_nodes
from modeconn.pipeline import fit_artifact
from modeconn.types import VECTOR_KEY


@pytest.fixture(scope="module")
def mlp_art(mlp_pair, digits, tmp_path_factory):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    out = tmp_path_factory.mktemp("ens") / "mlp_linear"
    artifact, _ = fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
    return artifact


@pytest.fixture(scope="module")
def bn_art(bn_pair, digits, tmp_path_factory):
    a, b = (load_checkpoint(p) for p in bn_pair)
    out = tmp_path_factory.mktemp("ens") / "cnn_linear"
    artifact, _ = fit_artifact(a, b, digits, "linear", out=out, eval_points=0)
    return artifact


def _bezier_artifact(artifact: PathArtifact, digits, shift: float = 0.3) -> PathArtifact:
    """A hand-built quadratic Bezier: the endpoints and a midpoint pushed off the line."""
    a, b = artifact.path.node(0), artifact.path.node(1)
    gen = torch.Generator().manual_seed(0)
    mid = {k: 0.5 * (a[k] + b[k]) + shift * torch.randn(a[k].shape, generator=gen) for k in a}
    path = Bezier(stack_nodes([a, mid, b]))
    manifest = artifact.manifest.model_copy(
        update={"method": "bezier", "basis": "bezier", "num_nodes": 3, "knots": [0, 0.5, 1]}
    )
    model = artifact.build_model()
    buffers = compute_served_buffers(model, path, digits.x_train, manifest.served_ts)
    return PathArtifact(manifest=manifest, path=path, buffers=buffers)


# ---------------------------------------------------------------------------------------------
# Choosing members


def test_members_evenly_in_t_include_the_endpoints(mlp_art):
    path = mlp_art.path
    assert choose_ts(path, 1) == [0.5]
    assert choose_ts(path, 2) == [0.0, 1.0]
    assert choose_ts(path, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert choose_ts(path, ts=[0.1, 0.9]) == [0.1, 0.9]
    assert choose_ts(path, 2, ts=[0.1, 0.9]) == [0.1, 0.9]


@pytest.mark.parametrize(
    ("k", "ts", "spacing", "error", "match"),
    [
        (0, None, "t", ValueError, "k must be a positive integer"),
        (2.5, None, "t", TypeError, "positive integer"),
        (None, None, "t", ValueError, "number of members"),
        (3, [0.0, 1.0], "t", ValueError, "does not match"),
        (None, [0.2, 1.5], "t", ValueError, r"\[0, 1\]"),
        (None, [0.2, 0.2], "t", ValueError, "distinct"),
        (None, [], "t", ValueError, "empty"),
        (3, None, "geodesic", ValueError, "spacing"),
    ],
)
def test_bad_member_choices_are_refused(mlp_art, k, ts, spacing, error, match):
    with pytest.raises(error, match=match):
        choose_ts(mlp_art.path, k, ts=ts, spacing=spacing)


def test_arc_length_spacing_on_a_line_is_even_in_t(mlp_art):
    assert arc_length_ts(mlp_art.path, 5) == pytest.approx([0, 0.25, 0.5, 0.75, 1], abs=1e-9)


def test_arc_length_spacing_splits_a_curve_into_equal_lengths():
    # A planar quadratic Bezier whose speed varies strongly along t.
    nodes = torch.tensor([[0.0, 0.0], [0.2, 3.0], [4.0, 0.0]])  # (3, 2)
    path = Bezier({VECTOR_KEY: nodes}, is_vector=True)
    ts = arc_length_ts(path, 4)
    # Independent reference: the length between consecutive members on a very fine grid.
    lengths = []
    for lo, hi in zip(ts[:-1], ts[1:]):
        grid = torch.linspace(lo, hi, 4001, dtype=torch.float64)
        points = path.coefficients(grid).to(torch.float64) @ nodes.double()  # (4001, 2)
        lengths.append(float((points[1:] - points[:-1]).norm(dim=1).sum()))
    assert max(lengths) / min(lengths) == pytest.approx(1.0, abs=2e-3)
    assert ts[0] == 0.0 and ts[-1] == 1.0
    assert abs(ts[1] - 1 / 3) > 0.02  # genuinely different from even spacing in t


def test_point_sets_use_their_members():
    nodes = {VECTOR_KEY: torch.arange(5, dtype=torch.float32).reshape(5, 1)}
    points = PointSet(nodes)
    assert choose_ts(points, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert choose_ts(points, 3) == [0.0, 0.5, 1.0]
    assert choose_ts(points, 1) == [0.5]
    with pytest.raises(ValueError, match="has 5 members"):
        choose_ts(points, 6)
    with pytest.raises(ValueError, match="members only at"):
        choose_ts(points, ts=[0.1])
    with pytest.raises(ValueError, match="no path between members"):
        choose_ts(points, 3, spacing="arclength")


# ---------------------------------------------------------------------------------------------
# Combining members


def test_uncertainty_matches_hand_computed_values():
    p = torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]], dtype=torch.float64)  # (K=2, N=1, C=2)
    probs, log_mean, unc = ensemble_statistics(p.log())
    mean = [0.6, 0.4]
    entropy = -sum(q * math.log(q) for q in mean)
    member_entropy = [
        -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)),
        -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)),
    ]
    kl = [
        0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4),
        0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4),
    ]
    assert probs[0].tolist() == pytest.approx(mean, abs=1e-12)
    assert log_mean.exp()[0].tolist() == pytest.approx(mean, abs=1e-12)
    assert float(unc[0, 0]) == pytest.approx(entropy, abs=1e-12)
    assert float(unc[0, 1]) == pytest.approx(sum(kl) / 2, abs=1e-12)  # expected KL from the mean
    assert float(unc[0, 1]) == pytest.approx(entropy - sum(member_entropy) / 2, abs=1e-12)
    assert float(unc[0, 2]) == 1.0  # the two members predict different labels

    # Three members predicting labels 0, 0, 1: 4 of the 6 ordered pairs differ.
    q = torch.tensor([[[0.8, 0.2]], [[0.6, 0.4]], [[0.1, 0.9]]], dtype=torch.float64)
    assert float(ensemble_statistics(q.log())[2][0, 2]) == pytest.approx(4 / 6)
    # The member axis may come second, as in the exported graph.
    for a, b in zip(ensemble_statistics(q.log()), ensemble_statistics(q.log().transpose(0, 1), 1)):
        assert torch.equal(a, b)
    # One member: no epistemic uncertainty, no disagreement.
    _, _, single = ensemble_statistics(q[:1].log())
    assert single[0, 1:].tolist() == [0.0, 0.0]


def test_ensemble_is_the_mean_of_member_softmax(bn_art, digits):
    x = digits.x_test[:50]
    ensemble = Ensemble.from_artifact(bn_art, 3)
    pred = ensemble.predict(x, batch_size=16)
    reference = torch.stack(
        [F.softmax(merged_model(bn_art, t)(x), -1) for t in (0.0, 0.5, 1.0)]
    ).mean(0)  # (N, C)
    assert ensemble.ts == (0.0, 0.5, 1.0)
    assert ensemble.bn_sources == ("stored", "stored", "stored")
    assert torch.allclose(pred.probs, reference.detach(), atol=1e-6)
    assert pred.uncertainty.shape == (50, 3) and pred.member_log_probs.shape == (3, 50, 10)
    assert bool((pred.uncertainty >= 0).all())


def test_vmap_backend_equals_the_loop(bn_art, digits):
    x = digits.x_test[:40]
    loop = Ensemble.from_artifact(bn_art, 4).predict(x)
    vmapped = Ensemble.from_artifact(bn_art, 4, backend="vmap").predict(x)
    assert torch.allclose(loop.log_probs, vmapped.log_probs, atol=1e-5)
    assert torch.allclose(loop.uncertainty, vmapped.uncertainty, atol=1e-5)


@pytest.mark.parametrize("which", ["mlp", "bn"])
def test_one_member_ensemble_equals_the_merged_model(which, mlp_art, bn_art, digits):
    artifact = mlp_art if which == "mlp" else bn_art
    x = digits.x_test
    for t, inputs in ((0.5, None), (0.3, digits.x_train)):
        pred = Ensemble.from_artifact(artifact, ts=[t], inputs=inputs).predict(x)
        with torch.no_grad():
            merged = F.log_softmax(merged_model(artifact, t, inputs=inputs)(x), -1)
        assert torch.allclose(pred.log_probs, merged, atol=1e-6)
        assert float(pred.mutual_information.abs().max()) <= 1e-6  # zero up to rounding
        assert bool((pred.disagreement == 0).all())


def test_ensemble_of_endpoints_beats_its_members_in_nll(mlp_art, digits):
    result = evaluate_ensemble(mlp_art, digits, 2)
    assert result["ts"] == [0.0, 1.0]
    # Jensen: the NLL of the mean distribution is at most the members' mean NLL.
    assert result["nll"] <= sum(result["member_nll"]) / 2 + 1e-9
    assert result["accuracy"] >= min(result["member_accuracy"]) - 0.01
    assert 0.0 <= result["disagreement"] <= 1.0 and result["mutual_information"] >= 0.0
    assert set(result) >= {"brier", "ece", "entropy", "bn"}


def test_unserved_t_of_a_bn_model_needs_data(bn_art, digits):
    with pytest.raises(ValueError, match="served t values.*--data digits"):
        Ensemble.from_artifact(bn_art, ts=[0.0, 0.37])
    ensemble = Ensemble.from_artifact(bn_art, ts=[0.0, 0.37], inputs=digits.x_train)
    assert ensemble.bn_sources == ("stored", "recomputed")


# ---------------------------------------------------------------------------------------------
# Merging


def test_merged_state_loads_strictly_into_the_registry_model(bn_art, mlp_art, digits):
    for artifact in (bn_art, mlp_art):
        state = merge_at(artifact)  # the midpoint
        model = artifact.build_model()
        assert list(state) == list(model.state_dict())
        model.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        merge_at(bn_art, 1.5)
    with pytest.raises(ValueError, match="needs training inputs"):
        merge_at(bn_art, 0.5, bn="recompute")


def _accuracy(model, digits) -> float:
    with torch.no_grad():
        return float((model(digits.x_test).argmax(-1) == digits.y_test).float().mean())


def test_merged_bn_model_at_t0_reproduces_endpoint_a(bn_art, bn_pair, digits):
    a = load_checkpoint(bn_pair[0])
    model_a = a.build_model().eval()
    with torch.no_grad():
        logits_a = model_a(digits.x_test)
    # With A's own running statistics the merged point at t=0 *is* A.
    model = bn_art.build_model()
    buffers = {k: v for k, v in a.state.items() if "running" in k or "num_batches" in k}
    state = point_state(model, bn_art.path, 0.0, buffers=buffers)
    assert all(torch.equal(state[k], a.state[k]) for k in a.state)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(model.eval()(digits.x_test), logits_a, atol=1e-5)
    # With statistics recomputed on the training data (stored, or recomputed now): A's accuracy.
    acc_a = _accuracy(model_a, digits)
    stored = merged_model(bn_art, 0.0)
    recomputed = merged_model(bn_art, 0.0, inputs=digits.x_train, bn="recompute")
    assert abs(_accuracy(stored, digits) - acc_a) <= 2 / len(digits.y_test)
    assert abs(_accuracy(recomputed, digits) - acc_a) <= 2 / len(digits.y_test)
    for key, value in stored.state_dict().items():
        assert torch.allclose(value.float(), recomputed.state_dict()[key].float(), atol=1e-5)


def test_merged_safetensors_is_an_endpoint(bn_art, digits, tmp_path):
    out = tmp_path / "mid.safetensors"
    save_merged(out, bn_art, 0.5)
    ckpt = load_checkpoint(out)
    assert ckpt.meta["merged"]["t"] == 0.5 and ckpt.meta["merged"]["bn"] == "stored"
    assert ckpt.meta["data"] == "digits"
    model = ckpt.build_model().eval()  # strict load inside
    with torch.no_grad():
        assert torch.equal(model(digits.x_test), merged_model(bn_art, 0.5)(digits.x_test))


def test_bezier_ensemble_by_arc_length_recomputes_bn(bn_art, digits):
    bezier = _bezier_artifact(bn_art, digits)
    ts = choose_ts(bezier.path, 3, spacing="arclength")
    assert ts[0] == 0.0 and ts[2] == 1.0 and ts[1] != 0.5
    ensemble = Ensemble.from_artifact(
        bezier, 3, spacing="arclength", inputs=digits.x_train, device="cpu"
    )
    assert ensemble.bn_sources == ("stored", "recomputed", "stored")
    pred = ensemble.predict(digits.x_test)
    assert torch.allclose(pred.probs.sum(-1), torch.ones(len(digits.x_test)), atol=1e-5)


def test_linear_path_helper_is_usable_with_point_state(mlp_pair, digits):
    a, b = (load_checkpoint(p) for p in mlp_pair)
    model = a.build_model()
    path = linear(a.state, b.state)
    state = point_state(model, path, 0.25)
    expected = {k: 0.75 * a.state[k] + 0.25 * b.state[k] for k in a.state}
    assert all(torch.allclose(state[k], expected[k]) for k in expected)
