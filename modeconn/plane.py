"""The loss surface on the plane through the three nodes of a curve (Garipov et al. 2018, Fig. 1).

For a 3-node path (A, theta, B), the plane is spanned by an orthonormal basis obtained by
Gram-Schmidt in flattened parameter space, as in the paper's code: ``u = (B - A) / |B - A|``
first, so that the straight line lies on the horizontal axis, then ``v`` = the part of
``theta - A`` orthogonal to ``u``, normalised. A point ``(x, y)`` of the plane is the network
``A + x u + y v`` (coordinates are distances in weight space). The loss is evaluated on a grid
covering the three nodes plus a margin, with BatchNorm statistics recomputed at every grid point,
and the curve and the straight line are projected onto the plane (a Bezier or polygonal curve
with three nodes lies in it exactly).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.bn import DEFAULT_BN_EXAMPLES, bn_subset, has_batchnorm, recompute_bn
from modeconn.data import Dataset
from modeconn.evaluate import predict
from modeconn.io import atomic_file
from modeconn.paths import Path, PointSet, as_state
from modeconn.progress import progress_bar
from modeconn.types import StateDict

__all__ = ["LossPlane", "PlaneBasis", "plane_basis", "loss_plane", "plot_plane"]


@dataclass(frozen=True)
class PlaneBasis:
    """Origin A and orthonormal directions u, v (flattened, float64) of the plane of 3 nodes."""

    keys: list[str]
    shapes: list[tuple[int, ...]]
    origin: Tensor  # (N,)
    u: Tensor  # (N,)
    v: Tensor  # (N,)

    def flatten(self, state: StateDict) -> Tensor:
        return torch.cat([state[k].detach().reshape(-1).double().cpu() for k in self.keys])

    def project(self, state: StateDict) -> tuple[float, float, float]:
        """``(x, y, distance from the plane)`` of a parameter dict."""
        d = self.flatten(state) - self.origin  # (N,)
        x, y = float(d @ self.u), float(d @ self.v)
        residual = float((d - x * self.u - y * self.v).norm())
        return x, y, residual

    def point(self, x: float, y: float, dtype: torch.dtype = torch.float32) -> StateDict:
        """The parameters at plane coordinates ``(x, y)``."""
        flat = (self.origin + x * self.u + y * self.v).to(dtype)  # (N,)
        parts = flat.split([math.prod(s) for s in self.shapes])
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes)}


def plane_basis(path: Path) -> PlaneBasis:
    """Gram-Schmidt basis of the plane through the nodes of a 3-node ``path``."""
    if isinstance(path, PointSet):
        raise ValueError("the loss plane needs a curve; this artifact is a point set (FGE)")
    if path.num_nodes != 3:
        raise ValueError(
            f"the loss plane goes through the 3 nodes of a 3-node curve (bezier or polychain "
            f"with nodes=3); this path has {path.num_nodes} nodes"
        )
    keys = list(path.nodes)
    shapes = [tuple(path.nodes[k].shape[1:]) for k in keys]
    flat = torch.cat([path.nodes[k].detach().reshape(3, -1).double().cpu() for k in keys], 1)
    a, theta, b = flat  # (N,) each
    u = b - a  # (N,)
    dx = float(u.norm())
    if dx == 0:
        raise ValueError("the endpoints are identical: no plane through them")
    u = u / dx
    v = theta - a
    v = v - (v @ u) * u  # Gram-Schmidt: remove the component along u
    dy = float(v.norm())
    # Below the rounding noise of the nodes' own dtype, theta is on the line for all purposes.
    eps = torch.finfo(next(iter(path.nodes.values())).dtype).eps
    if dy <= 10 * eps * float(a.norm() + theta.norm() + b.norm()):
        raise ValueError("the middle node lies on the straight line: the three nodes span no plane")
    return PlaneBasis(keys=keys, shapes=shapes, origin=a, u=u, v=v / dy)


@dataclass(frozen=True)
class LossPlane:
    """Loss and error on a grid of the plane, plus the projected nodes, curve and line."""

    split: str
    xs: list[float]  # (G,) horizontal coordinates (along B - A)
    ys: list[float]  # (G,) vertical coordinates
    loss: list[list[float]]  # (G, G): loss[j][i] at (xs[i], ys[j])
    error: list[list[float]]  # (G, G)
    nodes: list[list[float]]  # (3, 2): A, theta, B
    curve: list[list[float]]  # (T, 2): the path at evenly spaced t
    curve_ts: list[float]
    line: list[list[float]]  # (2, 2): A and B, the straight path
    basis: str
    max_residual: float  # the curve's largest distance from the plane (0 for 3-node curves)

    def to_json(self) -> dict:
        out = asdict(self)
        losses = [v for row in self.loss for v in row]
        out["min_loss"] = min(losses)
        out["max_loss"] = max(losses)
        return out


@torch.no_grad()
def loss_plane(
    model: nn.Module,
    path: Path,
    data: Dataset,
    *,
    grid: int = 21,
    margin: float = 0.2,
    split: str = "train",
    curve_points: int = 61,
    device: torch.device | str | None = None,
    progress: bool = False,
    bn_examples: int | None = DEFAULT_BN_EXAMPLES,
) -> LossPlane:
    """Loss (mean cross-entropy on ``split``) on a ``grid`` x ``grid`` lattice of the plane.

    The lattice covers the bounding box of the three nodes widened by ``margin`` of its size
    on every side; BN statistics are recomputed at every point from ``bn_examples`` seeded
    training inputs (``None`` or 0: all of them; :func:`modeconn.bn.bn_subset`).
    """
    if grid < 2:
        raise ValueError(f"grid must be >= 2 points per side, got {grid}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if curve_points < 2:
        raise ValueError(f"curve_points must be >= 2, got {curve_points}")
    x_eval, y_eval = data.split(split)
    basis = plane_basis(path)
    dtype = next(iter(path.nodes.values())).dtype
    nodes = [basis.project(as_state(path.node(k)))[:2] for k in range(3)]
    xs = _axis([p[0] for p in nodes], grid, margin)
    ys = _axis([p[1] for p in nodes], grid, margin)

    device = torch.device(device or "cpu")
    model.to(device)
    bn = has_batchnorm(model)
    x_train = bn_subset(data.x_train, bn_examples).to(device)  # (min(N, bn_examples), ...)
    x_eval = x_eval.to(device)
    loss = [[0.0] * grid for _ in range(grid)]
    error = [[0.0] * grid for _ in range(grid)]
    with progress_bar(grid * grid, "loss plane", enabled=progress) as bar:
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                params = {k: v.to(device) for k, v in basis.point(x, y, dtype).items()}
                if bn:
                    params = {**params, **recompute_bn(model, params, x_train, device=device)}
                log_probs = predict(model, params, x_eval, device=device)  # (M, C)
                loss[j][i] = float(F.nll_loss(log_probs, y_eval))
                error[j][i] = float((log_probs.argmax(-1) != y_eval).float().mean())
                bar.advance(1, loss=loss[j][i])
    model.cpu()

    ts = [i / (curve_points - 1) for i in range(curve_points)]
    projected = [basis.project(as_state(path.at(t))) for t in ts]
    line_b = basis.project(as_state(path.node(2)))
    return LossPlane(
        split=split,
        xs=xs,
        ys=ys,
        loss=loss,
        error=error,
        nodes=[list(p) for p in nodes],
        curve=[[p[0], p[1]] for p in projected],
        curve_ts=ts,
        line=[[0.0, 0.0], [line_b[0], line_b[1]]],
        basis=path.kind,
        max_residual=max(p[2] for p in projected),
    )


def _axis(values: list[float], grid: int, margin: float) -> list[float]:
    lo, hi = min(values), max(values)
    pad = margin * (hi - lo)
    return torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64).tolist()


def plot_plane(plane: LossPlane, out: str | os.PathLike, *, title: str = "") -> None:
    """Filled contours of the loss (log-scale levels) with the curve, the line and the nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    z = np.asarray(plane.loss, dtype=np.float64)  # (G, G)
    z = np.clip(z, max(float(z[z > 0].min()) if (z > 0).any() else 1e-12, 1e-12), None)
    lo, hi = float(z.min()), float(z.max())
    hi = hi if hi > lo else lo * 1.01 + 1e-12
    levels = np.geomspace(lo, hi, 30)
    fig, ax = plt.subplots(figsize=(8.0, 5.0), constrained_layout=True)
    filled = ax.contourf(plane.xs, plane.ys, z, levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
    ax.contour(plane.xs, plane.ys, z, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.5)
    bar = fig.colorbar(filled, ax=ax, format="%.3g")
    bar.set_label(f"{plane.split} loss (log scale)")
    curve = np.asarray(plane.curve)
    line = np.asarray(plane.line)
    ax.plot(curve[:, 0], curve[:, 1], color="tab:red", lw=2, label=f"{plane.basis} curve")
    ax.plot(line[:, 0], line[:, 1], color="white", lw=1.5, ls="--", label="straight line")
    for (x, y), name in zip(plane.nodes, ("A", "θ", "B")):
        ax.plot(x, y, "o", color="black", ms=7, mec="white")
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(6, -12),
            color="black",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8, "lw": 0},
        )
    ax.set(xlabel="distance along B - A", ylabel="distance along θ (orthogonalised)")
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
