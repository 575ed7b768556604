"""The library's edges on a plain energy function: what no method can follow is refused with one
line naming the problem, and every method works at the energy's own scale with no options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from landscapes import muller_brown, ring

from modeconn.evaluate import evaluate_energy_path
from modeconn.fit.connect import connect
from modeconn.fit.methods import METHODS
from modeconn.paths import linear

A, B = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
FITTED = [m for m in METHODS if m != "linear"]  # linear needs no gradient


def _ends(method: str):
    return (A, None) if METHODS[method].endpoints == 1 else (A, B)


@pytest.mark.parametrize(
    "energy",
    [
        lambda w: ring(w.detach()),  # the gradient is cut
        lambda w: torch.tensor(float(ring(w.detach()))),  # through a Python float
        lambda w: torch.as_tensor(np.sum((w.detach().numpy() ** 2 - 1) ** 2)),  # through numpy
    ],
    ids=["detach", "float", "numpy"],
)
@pytest.mark.parametrize("method", FITTED)
def test_an_energy_without_a_gradient_is_refused(method, energy):
    if method == "geodesic":
        pytest.skip("geodesic needs a model (tested in test_geodesic)")
    with pytest.raises(ValueError, match="no gradient with respect to w"):
        connect(energy, *_ends(method), method)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_energy_that_is_not_finite_at_an_endpoint_is_refused(method):
    if method == "geodesic":
        pytest.skip("geodesic needs a model")

    def holey(w):  # NaN at A, finite elsewhere
        return ring(w) + torch.where(w[0] > 0.99, torch.nan, 0.0)

    with pytest.raises(ValueError, match="energy is nan at the start point; it must be finite"):
        connect(holey, *_ends(method), method)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_vector_valued_energy_is_refused(method):
    if method == "geodesic":
        pytest.skip("geodesic needs a model")
    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(2,\)"):
        connect(lambda w: w**2, *_ends(method), method)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].endpoints == 2])
def test_start_equal_to_end_is_refused(method, mlp_pair, digits):
    from modeconn.checkpoint import load_checkpoint

    if method != "geodesic":  # needs a model
        with pytest.raises(ValueError, match="same point"):
            connect(ring, A, A.clone(), method)

    a = load_checkpoint(mlp_pair[0])
    with pytest.raises(ValueError, match="same point"):
        connect(a.build_model(), a.state, dict(a.state), method, data=digits)


def test_a_one_element_energy_is_taken_as_a_scalar():
    path = connect(lambda w: ring(w).reshape(1), A, B, "neb", steps=50)
    assert path.num_nodes == 9


def test_geodesic_refuses_an_energy_with_a_clear_line():
    with pytest.raises(TypeError, match="needs a model"):
        connect(ring, A, B, "geodesic")


# ---------------------------------------------------------------------------------------------
# Muller-Brown with no options (the README's call)


def _peak(path) -> float:
    return evaluate_energy_path(muller_brown, path, points=2001)["barrier"]["peak"]


@pytest.mark.parametrize("method", ["neb", "autoneb"])
def test_neb_and_autoneb_defaults_reach_the_saddle(method, mb_points):
    m_a, m_c, saddle = mb_points
    path = connect(muller_brown, m_a, m_c, method)
    assert _peak(path) == pytest.approx(float(muller_brown(saddle)), abs=0.05)


@pytest.mark.parametrize("method", ["bezier", "polychain"])
def test_curves_fit_at_the_energys_own_scale(method, mb_points):
    """Gradients of 1e2-1e3: the default step must neither diverge nor stall. A curve minimises
    the energy averaged over t; that mean falls far below the straight line's (about -53), while
    its peak is not the saddle (see the README)."""
    m_a, m_c, _ = mb_points
    straight = evaluate_energy_path(muller_brown, linear(m_a, m_c), points=2001)["mean_loss"]
    path = connect(muller_brown, m_a, m_c, method)
    mean = evaluate_energy_path(muller_brown, path, points=2001)["mean_loss"]
    assert np.isfinite(mean) and mean < straight - 35, (straight, mean)
    longer = connect(muller_brown, m_a, m_c, method, epochs=100)  # twice the steps: no better
    assert evaluate_energy_path(muller_brown, longer, points=2001)["mean_loss"] > mean - 1.0
