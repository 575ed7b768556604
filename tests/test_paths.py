"""Path bases against hand-computed references, on vectors and on state dicts."""

import math

import pytest
import torch

import modeconn
from modeconn.paths import (
    Bezier,
    PointSet,
    PolyChain,
    bezier_coefficients,
    linear,
    polychain_coefficients,
    stack_nodes,
)


def ring(w):
    return ((w**2).sum() - 1) ** 2


def test_connect_linear_on_the_ring_passes_through_the_origin():
    path = modeconn.connect(
        ring, torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), method="linear"
    )
    mid = path.at(0.5)
    assert isinstance(mid, torch.Tensor) and mid.shape == (2,)
    assert torch.equal(mid, torch.zeros(2))
    assert float(ring(mid)) == 1.0


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_bernstein_coefficients_match_the_formula(k):
    for t in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        got = bezier_coefficients(t, k)
        want = [math.comb(k - 1, i) * t**i * (1 - t) ** (k - 1 - i) for i in range(k)]
        assert got.tolist() == pytest.approx(want, abs=1e-12)
        assert float(got.sum()) == pytest.approx(1.0)


def test_quadratic_bezier_is_the_seed_formula():
    a, theta, b = torch.randn(5), torch.randn(5), torch.randn(5)
    path = Bezier(stack_nodes([{"w": a}, {"w": theta}, {"w": b}]), is_vector=True)
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        want = (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t**2 * b
        assert torch.allclose(path.at(t), want, atol=1e-6)


def test_endpoints_are_reproduced_exactly():
    nodes = [{"x": torch.randn(3, 4), "y": torch.randn(2)} for _ in range(4)]
    for cls in (Bezier, PolyChain):
        path = cls(stack_nodes(nodes))
        assert all(torch.equal(path.at(0.0)[k], nodes[0][k]) for k in nodes[0])
        assert all(torch.equal(path.at(1.0)[k], nodes[-1][k]) for k in nodes[0])


def test_polychain_interpolates_between_given_knots():
    knots = [0.0, 0.2, 1.0]
    coeffs = polychain_coefficients(torch.tensor([0.0, 0.1, 0.2, 0.6, 1.0]), torch.tensor(knots))
    want = [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]
    assert torch.allclose(coeffs, torch.tensor(want, dtype=torch.float64))
    path = PolyChain(
        stack_nodes(
            [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        ),
        knots=knots,
        is_vector=True,
    )
    assert float(path.at(0.6)) == pytest.approx(2.0)


def test_bad_knots_and_t_are_refused():
    nodes = stack_nodes([{"w": torch.zeros(1)}] * 3)
    with pytest.raises(ValueError, match="increase strictly"):
        PolyChain(nodes, knots=[0.0, 0.7, 0.5])
    with pytest.raises(ValueError, match="3 nodes"):
        PolyChain(nodes, knots=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        linear(torch.zeros(1), torch.ones(1)).at(1.5)


def test_point_set_is_defined_only_at_its_members():
    points = PointSet(
        stack_nodes([{"w": torch.tensor([float(i)])} for i in range(3)]), is_vector=True
    )
    assert float(points.at(0.5)) == 1.0
    with pytest.raises(ValueError, match="only at its members"):
        points.at(0.25)


def test_stack_nodes_reports_mismatches():
    with pytest.raises(ValueError, match="different keys"):
        stack_nodes([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        stack_nodes([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])


def test_connect_refuses_bad_inputs():
    with pytest.raises(ValueError, match="unknown method"):
        modeconn.connect(ring, torch.zeros(2), torch.ones(2), method="teleport")
    with pytest.raises(ValueError, match="differ in shape"):
        modeconn.connect(ring, torch.zeros(2), torch.ones(3))
    with pytest.raises(TypeError, match="callable"):
        modeconn.connect(42, torch.zeros(2), torch.ones(2))
