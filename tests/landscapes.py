"""Analytic landscapes for the fitters' tests: the ring and the Muller-Brown surface."""

from __future__ import annotations

import torch

F64 = torch.float64


def ring(w: torch.Tensor) -> torch.Tensor:
    """The seed's ring ``L(w1, w2) = (w1^2 + w2^2 - 1)^2``: minima on the unit circle."""
    return (w.pow(2).sum() - 1) ** 2


# Muller & Brown (1979), Theor. Chim. Acta 53, 75: the classic NEB test surface.
_MB = {
    "A": (-200.0, -100.0, -170.0, 15.0),
    "a": (-1.0, -1.0, -6.5, 0.7),
    "b": (0.0, 0.0, 11.0, 0.6),
    "c": (-10.0, -10.0, -6.5, 0.7),
    "x0": (1.0, 0.0, -0.5, -1.0),
    "y0": (0.0, 0.5, 1.5, 1.0),
}
_MB = {k: torch.tensor(v, dtype=F64) for k, v in _MB.items()}


def muller_brown(w, scale: float = 1.0):
    dx, dy = w[0] - _MB["x0"], w[1] - _MB["y0"]  # (4,)
    q = _MB["a"] * dx * dx + _MB["b"] * dx * dy + _MB["c"] * dy * dy  # (4,)
    return scale * (_MB["A"] * torch.exp(q)).sum()


def newton_stationary(energy, w0, iters: int = 50):
    """Newton's method on the gradient (a root of grad E): converges to the nearby stationary
    point whatever its index, so it finds saddles as well as minima."""
    w = torch.as_tensor(w0, dtype=F64)
    for _ in range(iters):
        g = torch.func.grad(energy)(w)
        w = w - torch.linalg.solve(torch.func.hessian(energy)(w), g)
    assert float(torch.func.grad(energy)(w).norm()) < 1e-9
    return w
