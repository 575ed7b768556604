"""Parametric paths between two points in weight space.

A path is a basis plus nodes, ``w(t) = sum_k c_k(t) * node_k``, with ``node_0 = A`` and
``node_{K-1} = B``. Nodes are name-keyed state dicts, stacked along a leading axis of size K
(``num_nodes``, endpoints included), so that ``w(t)`` is one weighted sum per tensor and any
architecture can be run at ``t`` with ``torch.func.functional_call``: no layer is rewritten.

* :class:`Bezier` -- Bernstein basis of degree K-1 (Garipov et al. 2018, arXiv 1802.10026).
* :class:`PolyChain` -- piecewise linear through the nodes at given knots (Garipov et al.; the
  path that NEB/AutoNEB and geodesic fitting produce). ``linear`` is the chain with K = 2.
* :class:`PointSet` -- a set of members with no path between them (Fast Geometric Ensembling);
  it can be evaluated only at its knots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from modeconn.formats import T_TOLERANCE
from modeconn.types import VECTOR_KEY, StackedStateDict, StateDict

__all__ = [
    "Path",
    "Bezier",
    "PolyChain",
    "PointSet",
    "linear",
    "as_state",
    "as_vector",
    "bezier_coefficients",
    "polychain_coefficients",
    "stack_nodes",
    "unstack_nodes",
    "uniform_knots",
    "PATH_KINDS",
]


def uniform_knots(num_nodes: int) -> Tensor:
    """Knots 0, 1/(K-1), ..., 1 for K nodes."""
    if num_nodes < 2:
        raise ValueError(
            f"a path needs at least 2 nodes (its endpoints), got num_nodes={num_nodes}"
        )
    return torch.linspace(0.0, 1.0, num_nodes, dtype=torch.float64)


def bezier_coefficients(t: Tensor | float, num_nodes: int) -> Tensor:
    """Bernstein coefficients ``binom(K-1, k) t^k (1-t)^(K-1-k)`` of a Bezier curve.

    Returns shape ``(K,)`` for a scalar ``t`` and ``(T, K)`` for a 1-D ``t``. Differentiable in
    ``t`` and exact at the endpoints (``0**0 == 1`` in torch).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    degree = num_nodes - 1
    k = torch.arange(num_nodes, dtype=torch.float64)  # (K,)
    binom = torch.tensor([math.comb(degree, int(i)) for i in k], dtype=torch.float64)  # (K,)
    tt = t.unsqueeze(-1)  # (..., 1)
    return binom * tt**k * (1 - tt) ** (degree - k)  # (..., K)


def polychain_coefficients(t: Tensor | float, knots: Tensor) -> Tensor:
    """Hat-function coefficients of a polygonal chain through nodes at ``knots``.

    Returns shape ``(K,)`` for a scalar ``t`` and ``(T, K)`` for a 1-D ``t``: at most two
    non-zero entries per row, summing to one.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    knots = knots.to(torch.float64)
    scalar = t.dim() == 0
    t = t.reshape(-1).clamp(0.0, 1.0)  # (T,)
    # Segment index i such that knots[i] <= t <= knots[i+1]; t == 1 falls in the last segment.
    seg = torch.searchsorted(knots, t, right=True).clamp(1, len(knots) - 1) - 1  # (T,)
    left, right = knots[seg], knots[seg + 1]  # (T,)
    frac = (t - left) / (right - left)  # (T,)
    coeffs = torch.zeros(len(t), len(knots), dtype=torch.float64)  # (T, K)
    rows = torch.arange(len(t))
    coeffs[rows, seg] = 1 - frac
    coeffs[rows, seg + 1] = frac
    return coeffs[0] if scalar else coeffs


def stack_nodes(nodes: Sequence[StateDict]) -> StackedStateDict:
    """Stack K state dicts with identical keys and shapes into ``{key: (K, *shape)}``."""
    if len(nodes) < 1:
        raise ValueError("stack_nodes needs at least one state dict")
    keys = list(nodes[0])
    for i, node in enumerate(nodes[1:], start=1):
        if list(node) != keys:
            missing = sorted(set(keys) ^ set(node))
            raise ValueError(f"node {i} has different keys from node 0: {missing[:5]}")
        for key in keys:
            if node[key].shape != nodes[0][key].shape:
                raise ValueError(
                    f"node {i} key {key!r} has shape {tuple(node[key].shape)}, "
                    f"node 0 has {tuple(nodes[0][key].shape)}"
                )
    return {key: torch.stack([node[key] for node in nodes]) for key in keys}


def unstack_nodes(stacked: StackedStateDict) -> list[StateDict]:
    """Inverse of :func:`stack_nodes`."""
    num = len(next(iter(stacked.values())))
    return [{key: value[i] for key, value in stacked.items()} for i in range(num)]


class Path:
    """Base class: stacked nodes plus a basis. Subclasses define :meth:`coefficients`."""

    kind: str = "path"

    @property
    def basis(self) -> Literal["bezier", "polychain", "points"]:
        """How the nodes are joined, as a manifest records it."""
        if self.kind not in ("bezier", "polychain", "points"):
            raise TypeError(f"a {type(self).__name__} has no basis a manifest can record")
        return self.kind  # type: ignore[return-value]

    def __init__(self, nodes: StackedStateDict, *, is_vector: bool = False):
        if not nodes:
            raise ValueError("a path needs at least one parameter tensor")
        sizes = {key: value.shape[0] for key, value in nodes.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every stacked tensor needs the same number of nodes, got {sizes}")
        self.nodes = nodes
        self.is_vector = is_vector

    @property
    def num_nodes(self) -> int:
        return next(iter(self.nodes.values())).shape[0]

    def coefficients(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def knots(self) -> Tensor:
        """The t value of each node (where the path passes through it)."""
        return uniform_knots(self.num_nodes)

    def at(self, t: float | Tensor) -> StateDict | Tensor:
        """The point ``w(t)``: a state dict, or a 1-D tensor for paths built on vectors."""
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        coeffs = self.coefficients(t)  # (K,)
        point = {key: _combine(coeffs, value) for key, value in self.nodes.items()}
        return point[VECTOR_KEY] if self.is_vector else point

    def node(self, k: int) -> StateDict | Tensor:
        point = {key: value[k] for key, value in self.nodes.items()}
        return point[VECTOR_KEY] if self.is_vector else point

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.nodes = {
            key: value.to(device=device, dtype=dtype) for key, value in self.nodes.items()
        }
        return self

    def describe(self) -> dict:
        """The basis parameters that an artifact needs to rebuild this path."""
        return {"kind": self.kind, "num_nodes": self.num_nodes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_nodes={self.num_nodes}, tensors={len(self.nodes)})"


def _combine(coeffs: Tensor, stacked: Tensor) -> Tensor:
    """sum_k coeffs[k] * stacked[k], in the dtype of ``stacked``."""
    if not stacked.is_floating_point():
        # Integer buffers (e.g. BatchNorm's num_batches_tracked) do not interpolate.
        return stacked[0]
    c = coeffs.to(dtype=stacked.dtype, device=stacked.device)  # (K,)
    return torch.tensordot(c, stacked, dims=1)  # (*shape)


class Bezier(Path):
    """Bezier curve of degree K-1 through its endpoints (Garipov et al. 2018)."""

    kind = "bezier"

    def coefficients(self, t: Tensor | float) -> Tensor:
        return bezier_coefficients(t, self.num_nodes)


class PolyChain(Path):
    """Polygonal chain through every node at ``knots`` (uniform by default)."""

    kind = "polychain"

    def __init__(
        self, nodes: StackedStateDict, knots: Tensor | Sequence[float] | None = None, **kwargs
    ):
        super().__init__(nodes, **kwargs)
        knots = uniform_knots(self.num_nodes) if knots is None else torch.as_tensor(knots)
        knots = knots.to(torch.float64)
        if len(knots) != self.num_nodes:
            raise ValueError(f"{len(knots)} knots given for {self.num_nodes} nodes")
        if knots[0] != 0 or knots[-1] != 1 or not bool((knots[1:] > knots[:-1]).all()):
            raise ValueError(
                f"knots must increase strictly from 0 to 1, got {[round(float(k), 4) for k in knots]}"
            )
        self._knots = knots

    def knots(self) -> Tensor:
        return self._knots

    def coefficients(self, t: Tensor | float) -> Tensor:
        return polychain_coefficients(t, self._knots)

    def describe(self) -> dict:
        return {**super().describe(), "knots": [float(k) for k in self._knots]}


class PointSet(PolyChain):
    """Members with no path between them (FGE): defined only at its knots."""

    kind = "points"

    def coefficients(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        hits = torch.isclose(self._knots, t.reshape(-1, 1), atol=T_TOLERANCE)  # (T, K)
        if not bool(hits.any(dim=1).all()):
            raise ValueError(
                "a point set (FGE ensemble) is defined only at its members' knots "
                f"{[round(float(k), 4) for k in self._knots]}, got t={t.tolist()}"
            )
        coeffs = hits.to(torch.float64)
        return coeffs[0] if t.dim() == 0 else coeffs


PATH_KINDS: dict[str, type[Path]] = {cls.kind: cls for cls in (Bezier, PolyChain, PointSet)}


def linear(start: StateDict | Tensor, end: StateDict | Tensor) -> PolyChain:
    """The straight path from ``start`` to ``end``: the baseline every method is compared to."""
    if isinstance(start, Tensor) and isinstance(end, Tensor):
        return PolyChain(stack_nodes([{VECTOR_KEY: start}, {VECTOR_KEY: end}]), is_vector=True)
    if isinstance(start, Tensor) or isinstance(end, Tensor):
        raise TypeError("start and end must both be tensors or both be state dicts")
    return PolyChain(stack_nodes([start, end]), is_vector=False)


def as_state(point: StateDict | Tensor) -> StateDict:
    """A point of a path (:meth:`Path.at`, :meth:`Path.node`) that must be a state dict."""
    if isinstance(point, Tensor):
        raise TypeError("expected a state dict, got a 1-D vector: this path runs on vectors")
    return point


def as_vector(point: StateDict | Tensor) -> Tensor:
    """A point of a path (:meth:`Path.at`, :meth:`Path.node`) that must be a 1-D vector."""
    if not isinstance(point, Tensor):
        raise TypeError("expected a 1-D vector, got a state dict: this path runs on state dicts")
    return point
