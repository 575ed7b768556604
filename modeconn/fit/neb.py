"""Nudged elastic band (NEB) and AutoNEB paths (Draxler et al. 2018, arXiv 1803.00885).

A chain of *pivots* joins the two endpoints; each NEB step moves the interior pivots along the
component of the loss gradient that is perpendicular to the chain, so the chain slides downhill
sideways until it lies in a valley of the landscape (the minimum-energy path).

One step, for every interior pivot ``w_i`` at once:

1. the loss ``L_i`` and its gradient ``g_i`` on one mini-batch -- the *same* batch for every pivot
   of the step, so that neighbouring energies compare without batch-to-batch noise; the
   endpoints, which never move, enter the tangents with their loss on the fixed evaluation
   subset (computed once per cycle); ``0.5 * weight_decay * |w_i|^2`` is part of the energy;
2. the improved tangent of Henkelman & Jonsson (2000, J. Chem. Phys. 113, 9978):
   ``tau_i = w_{i+1} - w_i`` if ``L_{i+1} > L_i > L_{i-1}``, ``w_i - w_{i-1}`` if
   ``L_{i+1} < L_i < L_{i-1}``, and at a local extremum the blend
   ``tau+ dV_max + tau- dV_min`` (or the reverse, towards the higher neighbour), normalised;
3. the gradient's component along the tangent is removed: ``g_i - (g_i . tau_i) tau_i``;
4. an optimiser step (a fresh one per cycle) on that projected gradient;
5. the spring: we use ``k = infinity``, the reference code's practice -- after every step the
   pivots are put back at their target fractions of the chain's arc length, by linear
   interpolation along the chain. There is no spring constant, so nothing mixes units: the only
   force is the (projected) loss gradient, and the spacing is a pure geometric constraint.

The default optimiser is Adam (``momentum`` is its beta1): its step is invariant to the scale of
the loss, so landscapes whose gradients are 1e-2 or 1e3 take the same path without choosing a
learning rate. SGD with momentum (the reference schedule for ResNet-20) is available per cycle.

This module is the engine of both NEB and AutoNEB: it runs a schedule of *cycles*, each of
which first inserts pivots and then takes NEB steps with a fresh optimiser. ``equal`` insertion
puts ``insert_count`` pivots evenly into every gap; **NEB** is a single such cycle with
``nodes`` pivots. AutoNEB's insertion where the loss rises (``highest``) is in
:mod:`modeconn.fit.autoneb`, which passes it in. A pivot inserted at fraction ``a`` of a gap
splits that gap's share of the arc length ``a : 1-a``, so inserted pivots stay where they were
needed. The dense losses (insertion, and the barrier recorded per cycle) are the plain loss on
a fixed, seeded subset of training examples (``eval_size``), or the energy itself.

Initialisation: the interior pivots start on the straight line plus a small seeded bump
``init_noise * |B - A| * sin(pi s) * u`` (``u`` a random unit vector, ``s`` the pivot's
position): in a symmetric landscape the straight line through a saddle is itself stationary.

Sharded across ranks (``torchrun``, see :mod:`modeconn.fit.sharding`): each rank owns a
contiguous block of the interior pivots (and their optimiser state) and keeps its *band* --
the block plus one neighbour on each side; every rank draws the same batches. A step needs from
outside the block only what touches the block's two ends, plus the chain's total length:

1. from each neighbour, its current position and its loss on the step's batch, for the
   tangents at the block's first and last pivot (the endpoints' energies every rank has);
2. from each neighbour, its position after the optimiser step, for the length of the segment
   between the two blocks;
3. from all ranks, every segment's length and every pivot's loss (``2P - 3`` scalars, one
   all-reduce): the arc length is a sum along the whole chain. From it every rank computes,
   identically, every pivot's target segment and fraction; the ends of a pivot's target
   segment lie in its band after an ordinary step (the target is next to the pivot), and
   when they do not, only those rows are fetched from their owners (an exchange only then).

So each step sends ``2D + 1`` numbers each way across each boundary between blocks, plus the
all-reduce of ``2P - 3`` scalars, however long the chain. Each pivot's loss and gradient come
from the same ops on the same batch as in one process (vmap over a block gives each pivot the
bits vmap over the whole interior does: measured, CPU), each gathered quantity is made of
exactly the numbers one process computes (values are copied, or added to zeros), and the
optimiser sees every number where one process's does (see :class:`_Optimiser` for the fused
Adam kernel), so the path is bitwise the single-process one with the same threads per process.
The dense evaluation between pivots is shared out by points, in whole chunks of the vmap
engine, and gathered (``M`` scalars); an insertion re-blocks the chain, each rank building its
new band from the old rows it needs. No rank ever holds the whole chain on its device: saved
states are gathered to rank 0's CPU (which alone writes), and the returned path to every
rank's CPU, so a state resumes under any number of ranks.

The result is the :class:`~modeconn.paths.PolyChain` through the pivots with knots at their
normalised arc-length positions, so ``t`` is proportional to distance in weight space.
``ctx.stats`` receives the number of gradient evaluations (one per interior pivot per step),
loss evaluations, and per cycle the pivot count and the barrier of the dense evaluation.
The fit is resumable: the state (pivots, optimiser, data stream position) is saved to
``ctx.checkpoint`` after every cycle and every ``ctx.checkpoint_every`` steps (default 500).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from modeconn import distributed
from modeconn.fit.configs import ChainConfig, CycleConfig, NEBConfig
from modeconn.fit.objective import Objective
from modeconn.fit.sharding import (
    Shard,
    Wants,
    agree,
    any_rank,
    assemble,
    assemble_together,
    fetch_rows,
    gather_rows,
    halo_wants,
)
from modeconn.fit.state import (
    BatchStream,
    FitContext,
    FitState,
    FlatLayout,
    fingerprint,
    load_optimizer_tensors,
    optimizer_tensors,
    resolve_engine,
)
from modeconn.paths import PolyChain
from modeconn.progress import progress_bar
from modeconn.types import Batch, StateDict

__all__ = [
    "fit_neb",
    "fit_chain",
    "ChainState",
    "Band",
    "Evaluator",
    "HighestFill",
    "improved_tangents",
    "project_out",
    "respace",
    "arc_positions",
    "dense_losses",
]

log = logging.getLogger("modeconn")

# Below this many numbers, the fused Adam kernel's parallel region costs more than the update.
_FUSED_MIN = 1 << 16
#: Steps between saves of the fit state when the context does not say.
CHECKPOINT_EVERY = 500


# ---------------------------------------------------------------------------------------------
# Geometry of a chain of pivots: rows of a (P, D) matrix


def arc_positions(chain: Tensor) -> Tensor:
    """Cumulative arc length at each pivot, ``(P,)`` float64, starting at 0."""
    seg = torch.linalg.vector_norm(chain[1:] - chain[:-1], dim=1).double()  # (P-1,)
    return torch.cat([seg.new_zeros(1), seg.cumsum(0)])  # (P,)


def respace(chain: Tensor, weights: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Move the interior pivots to arc-length fractions ``cumsum(weights) / sum(weights)``.

    The ``k = infinity`` limit of the NEB spring: each pivot is placed by linear interpolation
    along the current chain (a polyline), endpoints unchanged. ``chain`` is ``(P, D)``,
    ``weights`` ``(P-1,)`` positive (relative gap lengths). With ``out=chain`` the chain is
    updated in place.
    """
    diffs = chain[1:] - chain[:-1]  # (P-1, D)
    seg_len = torch.linalg.vector_norm(diffs, dim=1).double()  # (P-1,)
    pos = torch.cat([seg_len.new_zeros(1), seg_len.cumsum(0)])  # (P,)
    w = weights.to(device=chain.device, dtype=torch.float64)
    target = (w.cumsum(0)[:-1] / w.sum()) * pos[-1]  # (P-2,)
    seg = (torch.searchsorted(pos, target, right=True) - 1).clamp(0, len(pos) - 2)  # (P-2,)
    frac = ((target - pos[seg]) / seg_len[seg].clamp_min(1e-300)).clamp(0, 1)  # (P-2,)
    left = chain.index_select(0, seg)  # (P-2, D) copies: out may alias chain
    step = diffs.index_select(0, seg)  # (P-2, D)
    if out is None:
        out = chain.clone()
    torch.addcmul(left, step, frac.to(chain.dtype)[:, None], out=out[1:-1])  # (P-2, D)
    return out


def _tangent_coefficients(energies: Tensor) -> tuple[Tensor, Tensor]:
    """Weights ``(c+, c-)`` of ``tau = c+ (w_{i+1} - w_i) + c- (w_i - w_{i-1})``, each ``(P-2,)``."""
    e_prev, e, e_next = energies[:-2], energies[1:-1], energies[2:]  # (P-2,)
    up = (e_next > e) & (e > e_prev)
    down = (e_next < e) & (e < e_prev)
    d_next, d_prev = (e_next - e).abs(), (e_prev - e).abs()
    d_max, d_min = torch.maximum(d_next, d_prev), torch.minimum(d_next, d_prev)
    next_higher = e_next > e_prev
    c_fwd = torch.where(next_higher, d_max, d_min)
    c_bwd = torch.where(next_higher, d_min, d_max)
    flat = (c_fwd + c_bwd) == 0  # equal energies on both sides: the plain average
    c_fwd = torch.where(flat, torch.ones_like(c_fwd), c_fwd)
    c_bwd = torch.where(flat, torch.ones_like(c_bwd), c_bwd)
    c_fwd = torch.where(up, 1.0, torch.where(down, 0.0, c_fwd))
    c_bwd = torch.where(up, 0.0, torch.where(down, 1.0, c_bwd))
    return c_fwd, c_bwd


def _tangents(diffs: Tensor, energies: Tensor) -> Tensor:
    """Unnormalised improved tangents ``(P-2, D)`` from the chain's differences ``(P-1, D)``."""
    c_fwd, c_bwd = _tangent_coefficients(energies)
    fwd, bwd = diffs[1:], diffs[:-1]  # (P-2, D): tau+, tau-
    tau = bwd * c_bwd.to(diffs.dtype)[:, None]  # (P-2, D)
    tau.addcmul_(fwd, c_fwd.to(diffs.dtype)[:, None])
    return tau


def improved_tangents(chain: Tensor, energies: Tensor) -> Tensor:
    """Unit tangents ``(P-2, D)`` at the interior pivots (Henkelman & Jonsson 2000, eqs. 8-11).

    Towards the higher-energy neighbour: ``tau_i = w_{i+1} - w_i`` when
    ``E_{i+1} > E_i > E_{i-1}``, ``w_i - w_{i-1}`` when ``E_{i+1} < E_i < E_{i-1}``; at a local
    extremum of the energy along the chain the two one-sided tangents are blended, weighted by
    the energy differences (the larger weight towards the higher neighbour), so the tangent
    turns smoothly as a pivot passes over a maximum or minimum.
    """
    tau = _tangents(chain[1:] - chain[:-1], energies)
    return tau / torch.linalg.vector_norm(tau, dim=1, keepdim=True).clamp_min(1e-30)


def project_out(grads: Tensor, tangents: Tensor) -> Tensor:
    """``g - (g . tau) tau / |tau|^2`` row by row: the gradient perpendicular to the chain.

    ``tangents`` need not be normalised. Returns a new tensor.
    """
    along = torch.linalg.vecdot(grads, tangents)  # (N,)
    sq = torch.linalg.vecdot(tangents, tangents).clamp_min(1e-300)  # (N,)
    return torch.addcmul(grads, tangents, (along / sq)[:, None], value=-1)  # (N, D)


# ---------------------------------------------------------------------------------------------
# Batched evaluation of many pivots


class Evaluator:
    """Losses and gradients of the objective at many pivots, batched with vmap or looped."""

    def __init__(self, objective: Objective, layout: FlatLayout, engine: str):
        self.objective = objective
        self.layout = layout
        self.mode = resolve_engine(engine, objective)
        self.weight_decay = 0.0

    def _loss(self, flat: Tensor, batch: Batch | None) -> Tensor:
        loss = self.objective.loss(self.layout.unflatten(flat), batch)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * flat.pow(2).sum()
        return loss

    def grads(self, points: Tensor, batch: Batch | None) -> tuple[Tensor, Tensor]:
        """Gradients ``(N, D)`` and losses ``(N,)`` at ``points`` ``(N, D)``."""
        if len(points) == 0:  # a rank that owns no pivot
            return points.detach().clone(), points.new_empty(0)
        if self.mode == "vmap":
            try:
                fn = torch.func.vmap(torch.func.grad_and_value(self._loss), in_dims=(0, None))
                grads, values = fn(points, batch)
                return grads.detach(), values.detach()
            except Exception as err:  # a user's energy that vmap cannot trace
                if not self.objective.is_vector:
                    raise
                log.info("vmap failed on this energy (%s); evaluating pivots in a loop", err)
                self.mode = "loop"
        x = points.detach().requires_grad_(True)
        with torch.enable_grad():
            values = torch.stack([self._loss(row, batch) for row in x.unbind(0)])  # (N,)
            (grads,) = torch.autograd.grad(values.sum(), x)
        return grads.detach(), values.detach()

    @torch.no_grad()
    def values(
        self, points: Tensor, batch: Batch | None, chunk: int = 64, loop: bool = False
    ) -> Tensor:
        """Losses ``(N,)`` at ``points`` ``(N, D)`` (no gradient); ``loop`` for a few points."""
        if len(points) == 0:
            return points.new_empty(0)
        if self.mode == "vmap" and not loop:
            fn = torch.func.vmap(self._loss, in_dims=(0, None))
            return torch.cat([fn(p, batch) for p in points.split(chunk)])
        return torch.stack([self._loss(row, batch) for row in points.unbind(0)])


# ---------------------------------------------------------------------------------------------
# The optimiser of one cycle, on the (N, D) view of the interior pivots


class _Optimiser:
    """A fresh torch optimiser per cycle over this rank's pivots, which it updates in place.

    ``target``: the whole chain's interior ``(N, D)`` (one process), or this rank's
    :class:`Band`. The optimiser's tensor is normally the view of the pivots themselves. One
    case needs more: the fused Adam kernel (an interior of :data:`_FUSED_MIN` numbers or more)
    runs the last ``numel % V`` numbers of its tensor (``V`` floats a vector, 8 or 16) through
    a scalar loop that rounds differently from its vector loop, so a rank's block, ending where
    one process's tensor does not, would drift from the single-process chain (9 pivots of
    8,970 numbers on 2 ranks: 9e-9 apart after 40 steps, 7e-3 after 300). Sharded, the band is
    then moved into a flat buffer where the optimiser's tensor starts :data:`_ALIGN`-aligned
    with the whole interior and ends where it ends (the last rank) or on an aligned boundary
    (the others): every number meets the loop it meets in one process. The neighbours and the
    padding inside that tensor get zero gradients, which leave Adam's moments at zero and the
    numbers unchanged (``x - lr * 0 / (0 + eps) == x``).
    """

    def __init__(self, cycle: CycleConfig, target: Band | Tensor):
        if isinstance(target, Band):
            band, inner = target, target.own  # (n, D)
            whole = band.shard.interior * inner.shape[1]  # numbers of the whole interior
        else:
            band, inner, whole = None, target, target.numel()
        fused = cycle.optimizer == "adam" and whole >= _FUSED_MIN
        self.shape = tuple(inner.shape)  # (n, D): this rank's pivots
        self.start: int | None = None  # where they begin in an aligned tensor
        self.param: Tensor = inner
        if band is not None and fused and band.shard.sharded and band.shard.count:
            self.param, self.start = _align(band)
        self.opt = _make_optimizer(cycle, self.param, fused)
        self._grad: Tensor | None = None  # the aligned tensor's gradient, zero but the pivots'

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        """One step on the pivots' gradient ``(n, D)``."""
        if self.start is not None:
            if self._grad is None:
                self._grad = torch.zeros_like(self.param)
            self._grad[self.start : self.start + grad.numel()] = grad.reshape(-1)
            grad = self._grad
        self.param.grad = grad
        self.opt.step()
        self.param.grad = None

    def state(self) -> StateDict:
        """The optimiser's state with the moments shaped like this rank's pivots ``(n, D)``."""
        out = optimizer_tensors(self.opt)
        if self.start is None:
            return out
        size = math.prod(self.shape)
        return {k: v[self.start : self.start + size].view(self.shape) if v.dim() else v
                for k, v in out.items()}  # fmt: skip

    def load(self, tensors: StateDict) -> None:
        """Restore :meth:`state` (moments ``(n, D)``; other tensors are ignored)."""
        if self.start is not None:
            size, tensors = math.prod(self.shape), dict(tensors)
            for key, value in tensors.items():
                if key.startswith("optim/") and value.dim():
                    flat = torch.zeros_like(self.param)
                    flat[self.start : self.start + size] = value.reshape(-1)
                    tensors[key] = flat
        load_optimizer_tensors(self.opt, tensors)


#: Elements that the fused Adam kernel's work units (64 bytes) and vector loops divide, for
#: every floating dtype: where an aligned optimiser tensor begins relative to the interior.
_ALIGN = 64


def _align(band: Band) -> tuple[Tensor, int]:
    """Move ``band.rows`` into a flat buffer laid out for the fused kernel (see
    :class:`_Optimiser`); returns the optimiser's tensor (a view of the buffer) and where this
    rank's pivots begin in it."""
    shard, rows = band.shard, band.rows
    n, d = shard.count, rows.shape[1]
    offset = (shard.lo - 1) * d  # this rank's first number in the whole interior
    start = d + (offset - d) % _ALIGN  # room for the left neighbour, aligned like the interior
    if shard.hi == shard.size - 1:  # the last block ends where the interior ends
        length = start + n * d
    else:  # the others on an aligned boundary: no scalar loop over their numbers
        length = -(-(start + (n + 1) * d) // _ALIGN) * _ALIGN
    buffer = rows.new_zeros(max(length, start + (n + 1) * d))
    band.rows = buffer[start - d : start + (n + 1) * d].view(n + 2, d)
    band.rows.copy_(rows)
    return buffer[:length], start


def _make_optimizer(cycle: CycleConfig, param: Tensor, fused: bool) -> torch.optim.Optimizer:
    """A cycle's optimiser: Adam (``fused`` where the whole interior is large enough, decided
    for the whole chain so that every rank runs the kernel one process would) or SGD."""
    if cycle.optimizer == "sgd":
        return torch.optim.SGD([param], lr=cycle.lr, momentum=cycle.momentum)
    kwargs = {"lr": cycle.lr, "betas": (cycle.momentum, 0.999)}
    if fused:  # one kernel per step; tiny tensors: plain ops
        # no fused kernel for some devices and dtypes: fall back below
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.optim.Adam([param], fused=True, **kwargs)
    return torch.optim.Adam([param], foreach=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# This rank's share of the chain


@dataclass
class Band:
    """The pivots a rank owns, with one neighbour on each side: rows ``lo-1 .. hi`` of the chain.

    In one process the band is the whole chain ``(P, D)`` and every method is plain indexing.
    Sharded, the two neighbours (the *halo*) are copies of rows other ranks own: after they
    move, the halo is ``stale`` until the next exchange, and every method that reads it (or
    any row outside the band) fetches first. Methods that exchange must be called by every
    rank at once.
    """

    rows: Tensor  # (n + 2, D): the chain's rows shard.lo - 1 .. shard.hi
    shard: Shard
    anchors: Tensor  # (2, D): the endpoints A and B, fixed, held by every rank
    stale: bool = False  # whether the halo predates the neighbours' last move

    @classmethod
    def whole(cls, chain: Tensor) -> Band:
        """The whole chain ``(P, D)`` in one process."""
        return cls(chain, Shard(len(chain)), chain[[0, -1]])

    @classmethod
    def take(cls, chain: Tensor, anchors: Tensor) -> Band:
        """This rank's band of the whole ``chain`` ``(P, D)`` (e.g. a loaded fit state)."""
        shard = Shard.of(len(chain))
        rows = chain[shard.lo - 1 : shard.hi + 1]
        return cls(rows if not shard.sharded else rows.clone(), shard, anchors)

    @property
    def own(self) -> Tensor:
        """``(n, D)`` view of the pivots this rank owns and updates."""
        return self.rows[1:-1]

    def refresh_halo(
        self, values: Tensor | None = None, ends: Tensor | None = None
    ) -> Tensor | None:
        """Fetch the neighbours' current rows into the halo (nothing to fetch in one process).

        With ``values`` ``(n,)`` at this rank's pivots (their losses) and ``ends`` ``(2,)`` at
        the endpoints, the neighbours' values come in the same exchange, and the band's values
        ``(n + 2,)`` are returned.
        """
        shard = self.shard
        side: dict[int, Tensor] = {}
        if ends is not None:
            side = {0: ends[:1], shard.size - 1: ends[1:]}
        if shard.sharded:
            wants = halo_wants(shard)
            owns = [self.own] if values is None else [self.own, values]
            got = fetch_rows(shard, owns, wants)  # (<= 2, D) and (<= 2,)
            for k, row in enumerate(wants[shard.rank]):
                self.rows[row - shard.lo + 1] = got[0][k]
                if values is not None:
                    side[row] = got[1][k : k + 1]
        self.stale = False
        if values is None:
            return None
        return torch.cat([side[shard.lo - 1], values, side[shard.hi]])  # (n + 2,)

    def current(self) -> Band:
        """The band with its halo up to date (fetched if stale)."""
        if self.stale:
            self.refresh_halo()
        return self

    def measure(self, values: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``|w_{j+1} - w_j|`` for every segment of the whole chain, ``(P-1,)`` float64, and
        (if given) ``values`` ``(n,)`` of every rank's pivots, ``(P-2,)``, in one exchange.

        Each rank measures the segments to the left of its pivots (the last owner also the one
        into B) from its current band; the lengths are then gathered.
        """
        seg, gathered, _ = self._measure(values)
        return seg, gathered

    def _measure(self, values: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """:meth:`measure`, and the differences ``(k, D)`` of the segments this rank measured."""
        shard = self.current().shard
        count = shard.count + int(shard.edge_segment())
        diffs = self.rows[1 : 1 + count] - self.rows[:count]  # (count, D)
        seg = torch.linalg.vector_norm(diffs, dim=1).double()  # (count,)
        parts = [(seg, shard.lo - 1, shard.size - 1)]
        if values is not None:
            parts.append((values, shard.lo - 1, shard.interior))
        got = assemble_together(shard, parts)
        return got[0], (got[1] if values is not None else None), diffs

    def segment_lengths(self) -> Tensor:
        """The lengths of the whole chain's ``P-1`` segments (see :meth:`measure`)."""
        return self.measure()[0]

    def rows_for(self, wants: Wants) -> Tensor:
        """Rows ``wants[rank]`` of the whole chain ``(k, D)``, from the band, the endpoints or
        their owners. Every rank passes the same ``wants`` (one list per rank)."""
        shard = self.current().shard
        fetch = []
        for rank, rows in enumerate(wants):
            view = shard.on(rank)
            held = range(view.lo - 1, view.hi + 1)
            fetch.append(sorted({r for r in rows if r not in held and 0 < r < shard.size - 1}))
        [fetched] = fetch_rows(shard, [self.own], fetch)
        table = {shard.size - 1: self.anchors[1], 0: self.anchors[0]}
        table.update({row: fetched[k] for k, row in enumerate(fetch[shard.rank])})
        table.update({shard.lo - 1 + k: row for k, row in enumerate(self.rows)})
        mine = wants[shard.rank]
        if not mine:
            return self.rows.new_empty((0, self.rows.shape[1]))
        return torch.stack([table[row] for row in mine])

    def respace(self, weights: Tensor, values: Tensor | None = None) -> Tensor | None:
        """:func:`respace` in place, sharded: the ``k = infinity`` spring on this rank's pivots.

        The targets are fractions of the whole chain's arc length: every rank computes every
        pivot's target segment and fraction from the gathered segment lengths, then moves its
        own pivots, fetching only the segment ends that lie outside its band. ``values``
        ``(n,)`` at this rank's pivots travel with the lengths: returns them whole, ``(P-2,)``.
        """
        seg_len, gathered, diffs = self._measure(values)  # (P-1,), (P-2,), (k, D)
        pos = torch.cat([seg_len.new_zeros(1), seg_len.cumsum(0)])  # (P,)
        w = weights.to(device=seg_len.device, dtype=torch.float64)
        target = (w.cumsum(0)[:-1] / w.sum()) * pos[-1]  # (P-2,)
        seg = (torch.searchsorted(pos, target, right=True) - 1).clamp(0, len(pos) - 2)  # (P-2,)
        frac = ((target - pos[seg]) / seg_len[seg].clamp_min(1e-300)).clamp(0, 1)  # (P-2,)
        shard = self.shard
        mine = slice(shard.lo - 1, shard.hi - 1)  # this rank's pivots among the P-2
        if shard.sharded:
            segs = seg.tolist()
            wants = []
            for lo, hi in shard.bounds:
                ends = segs[lo - 1 : hi - 1]
                wants.append(ends + [s + 1 for s in ends])
            rows = self.rows_for(wants)  # (2n, D): left ends, then right ends
            left = rows[: shard.count]  # (n, D) copies
            step = rows[shard.count :] - left  # (n, D): w_{s+1} - w_s, as diffs holds it
        else:  # the whole chain, and all its differences, are here
            left = self.rows.index_select(0, seg)  # (P-2, D) copies: out aliases the chain
            step = diffs.index_select(0, seg)  # (P-2, D)
        torch.addcmul(left, step, frac[mine].to(self.rows.dtype)[:, None], out=self.own)
        self.stale = True  # every rank moved its pivots
        return gathered

    def gather(self, *, dst: int | None = None) -> Tensor | None:
        """The whole chain ``(P, D)`` on every rank (``dst=None``) or on rank ``dst`` only
        (None elsewhere); sharded, assembled on the CPU. One process: the band itself."""
        if not self.shard.sharded:
            return self.rows
        cpu = torch.device("cpu")
        inner = gather_rows(self.shard, self.own, dst=dst, device=cpu)
        if inner is None:
            return None
        return torch.cat([self.anchors[:1].to(cpu), inner, self.anchors[1:].to(cpu)])

    def gather_like(self, own: Tensor, *, dst: int | None = 0) -> Tensor | None:
        """A tensor shaped like the pivots, ``(n, D)`` here, whole ``(P-2, D)`` on ``dst``."""
        if not self.shard.sharded:
            return own
        return gather_rows(self.shard, own, dst=dst, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The fitter


#: AutoNEB's insertion where the loss rises: ``(dense, pivots, count, config) -> fractions``,
#: one list of fractions in (0, 1) per gap (see :mod:`modeconn.fit.autoneb`).
HighestFill = Callable[[Tensor, int, int, ChainConfig], list[list[float]]]


@dataclass
class ChainState:
    """Where a fit of a chain stands: this rank's band of it and the schedule's progress."""

    band: Band  # this rank's pivots with their neighbours (the whole chain in one process)
    weights: Tensor  # (P-1,) float64 relative arc-length share of each gap
    cycle: int = 0  # index into the expanded schedule of the cycle in progress
    step: int = 0  # steps done in that cycle
    inserted: bool = False  # whether the cycle's insertion is done
    dense: Tensor | None = None  # (M,) dense losses of the chain as it ended the last cycle
    stats: dict = field(default_factory=dict)

    @property
    def num_pivots(self) -> int:
        return self.band.shard.size


def fit_neb(
    objective: Objective, start: StateDict, end: StateDict, config: NEBConfig, ctx: FitContext
) -> PolyChain:
    """NEB with a fixed number of pivots (Draxler et al. 2018; Henkelman & Jonsson 2000)."""
    return fit_chain(objective, start, end, config, ctx, "neb")


def fit_chain(
    objective: Objective,
    start: StateDict,
    end: StateDict,
    config: ChainConfig,
    ctx: FitContext,
    name: str,
    highest: HighestFill | None = None,
) -> PolyChain:
    """Run ``config``'s schedule of NEB cycles from the straight line; see the module docstring.

    ``highest`` is the insertion used by cycles with ``insert="highest"`` (AutoNEB's). Under a
    process group every rank must call it alike; each returns the whole path.
    """
    layout = FlatLayout(start)
    a, b = layout.flatten(start), layout.flatten(end)  # (D,)
    if bool(torch.equal(a, b)):
        raise ValueError("start and end are the same point: there is no path to fit")
    schedule = config.schedule(objective.steps_per_epoch)
    evaluator = Evaluator(objective, layout, config.engine)
    stream = BatchStream(objective, torch.Generator().manual_seed(config.seed))
    eval_batch = _eval_batch(objective, config)
    ends = torch.stack([a, b])  # (2, D)
    state = ChainState(Band(ends.clone(), Shard.of(2), ends), torch.ones(1, dtype=torch.float64))
    state.stats = {
        "method": name,
        "engine": evaluator.mode,
        "batch": "one mini-batch per step shared by the interior pivots; endpoints: "
        "their loss on the fixed evaluation subset",
        "gradient_evaluations": 0,
        "loss_evaluations": 0,
        "steps": 0,
        "cycles": [],
    }
    fit_state = FitState(ctx, name, fingerprint(config, layout, a, b), every=CHECKPOINT_EVERY)
    _agree_on_fit(fit_state, ctx)
    optimiser: _Optimiser | None = None
    saved = fit_state.resume()
    agree("the saved fit state they resume from", saved.progress if saved else None)
    if saved is not None:
        state, optimiser = _restore(
            saved.tensors, saved.progress, saved.stats, ends, schedule, stream
        )
        evaluator.mode = state.stats.get("engine", evaluator.mode)
    started = time.perf_counter()
    while state.cycle < len(schedule):
        cycle = schedule[state.cycle]
        evaluator.weight_decay = cycle.weight_decay
        if not state.inserted:
            _insert(state, cycle, config, evaluator, eval_batch, highest)
            state.inserted = True
            optimiser = None
        if optimiser is None:
            optimiser = _Optimiser(cycle, state.band)
        run = _CycleRun(state, cycle, len(schedule), optimiser, evaluator, stream, eval_batch)
        run.steps(ctx, fit_state, name)
        # End of cycle: dense evaluation for the record and for the next insertion.
        state.dense = _band_dense(state.band, evaluator, eval_batch, config.subsample)
        state.stats["loss_evaluations"] += len(state.dense)
        state.stats["cycles"].append(_cycle_record(state, cycle))
        log.info(
            "%s cycle %d/%d: %d pivots, barrier %.4g",
            name,
            state.cycle + 1,
            len(schedule),
            state.num_pivots,
            state.stats["cycles"][-1]["barrier"],
        )
        state.cycle += 1
        state.step = 0
        state.inserted = False
        optimiser = None
        _save(fit_state, state, None, stream)
    state.stats["num_nodes"] = state.num_pivots
    state.stats["seconds"] = round(time.perf_counter() - started, 3)  # this call's share
    if state.stats["cycles"]:
        last = state.stats["cycles"][-1]
        state.stats["barrier"] = last["barrier"]
        state.stats["saddle"] = last["saddle"]
    ctx.stats.update(state.stats)
    return _path(state.band, layout)


def _agree_on_fit(fit_state: FitState, ctx: FitContext) -> None:
    """Sharded, every rank must run the same fit and save and resume alike: check it once."""
    agree(
        "the fit (options, endpoints, checkpoint and resume)",
        [fit_state.fingerprint, fit_state.enabled, ctx.resume, fit_state.every],
    )


def _path(band: Band, layout: FlatLayout) -> PolyChain:
    """The PolyChain through the whole chain, with knots at normalised arc length."""
    seg = band.segment_lengths()  # (P-1,)
    pos = torch.cat([seg.new_zeros(1), seg.cumsum(0)])  # (P,)
    knots = (pos / pos[-1]).cpu()
    if not bool((knots[1:] > knots[:-1]).all()):  # coincident pivots: fall back on uniform
        knots = None
    chain = band.gather()
    assert chain is not None, "gathered on every rank"
    return PolyChain(layout.unflatten_stacked(chain), knots=knots)


@dataclass
class _CycleRun:
    """The NEB steps of one cycle; the chain is updated in place."""

    state: ChainState
    cycle: CycleConfig
    num_cycles: int
    optimiser: _Optimiser
    evaluator: Evaluator
    stream: BatchStream
    eval_batch: Batch | None

    def steps(self, ctx: FitContext, fit_state: FitState, name: str) -> None:
        state, cycle = self.state, self.cycle
        total = cycle.steps
        assert total is not None, "the schedule sets every cycle's steps"
        band = state.band  # the optimiser holds the view band.own
        # The endpoints never move: their energies (for the tangents at the first and last
        # interior pivots) are computed once per cycle -- exactly for an energy, on the fixed
        # evaluation subset of the training set for a model.
        ends = self.evaluator.values(band.anchors, self.eval_batch, loop=True)  # (2,)
        state.stats["loss_evaluations"] += 2
        n_inner = band.shard.interior
        if n_inner == 0:  # nothing was inserted between the endpoints: nothing to move
            log.info("%s cycle %d: no interior pivots, no steps", name, state.cycle + 1)
            state.step = total
            return
        description = f"{name} cycle {state.cycle + 1}/{self.num_cycles} ({n_inner + 2} pivots)"
        shown = ctx.progress and distributed.is_main()
        with progress_bar(total, description, enabled=shown) as bar:
            bar.skip(state.step)
            while state.step < total:
                batch = self.stream.next()
                losses = _neb_step(band, state.weights, self.evaluator, self.optimiser, batch, ends)
                state.step += 1
                state.stats["steps"] += 1
                state.stats["gradient_evaluations"] += n_inner  # all ranks' pivots
                if shown:
                    bar.advance(1, max_loss=float(losses.max()))
                if state.step % 50 == 0 or state.step == total:
                    _check_finite(band, state, cycle, name)
                if fit_state.due(state.step) and state.step < total:
                    _save(fit_state, state, self.optimiser, self.stream)
        # An energy that vmap cannot trace sends the evaluator to the loop (on the ranks that
        # own pivots); the dense evaluation is shared out by the engine's chunks, so all agree.
        if any_rank(self.evaluator.mode == "loop"):
            self.evaluator.mode = "loop"
        state.stats["engine"] = self.evaluator.mode


def _neb_step(
    band: Band | Tensor,
    weights: Tensor,
    evaluator: Evaluator,
    optimiser: _Optimiser,
    batch: Batch | None,
    ends: Tensor,
) -> Tensor:
    """One NEB step on this rank's pivots, in place; returns all the interior losses ``(P-2,)``.

    ``band``: this rank's :class:`Band`, or the whole chain ``(P, D)`` in one process.
    ``ends``: the endpoints' energies ``(2,)``, for the tangents next to them. Sharded, three
    exchanges: the neighbours' rows and losses, their rows after the optimiser step, and the
    segment lengths with every pivot's loss.
    """
    band = Band.whole(band) if isinstance(band, Tensor) else band
    grads, losses = evaluator.grads(band.own, batch)  # (n, D), (n,)
    energies = band.refresh_halo(losses, ends)  # (n+2,): the band's
    assert energies is not None
    tangents = _tangents(band.rows[1:] - band.rows[:-1], energies)  # (n, D)
    optimiser.step(project_out(grads, tangents))  # moves band.own
    band.stale = True  # and the neighbours moved theirs
    gathered = band.respace(weights, losses)  # k = infinity: back to the target spacing
    assert gathered is not None
    return gathered


def _check_finite(band: Band, state: ChainState, cycle: CycleConfig, name: str) -> None:
    if any_rank(not bool(torch.isfinite(band.own).all())):
        raise RuntimeError(
            f"{name}: the chain became non-finite in cycle {state.cycle + 1} at step "
            f"{state.step} (optimizer {cycle.optimizer}, lr {cycle.lr}); lower the lr"
        )


def _insert(
    state: ChainState,
    cycle: CycleConfig,
    config: ChainConfig,
    evaluator: Evaluator,
    eval_batch: Batch | None,
    highest: HighestFill | None,
) -> None:
    """Insert pivots into the chain as the cycle asks (and bend the very first interior ones).

    Every rank computes the same insertion from the gathered dense losses; the chain is then
    shared out afresh (see :func:`_fill_chain`).
    """
    pivots = state.num_pivots
    initial = pivots == 2
    budget = getattr(config, "max_nodes", 10**9) - pivots
    gaps = pivots - 1
    fill: list[list[float]] = [[] for _ in range(gaps)]
    if cycle.insert == "equal" and cycle.insert_count * gaps <= budget:
        alphas = torch.linspace(0, 1, cycle.insert_count + 2, dtype=torch.float64)[1:-1]
        fill = [alphas.tolist() for _ in range(gaps)]
    elif cycle.insert == "equal":
        log.info("skipping an equal insertion: it would exceed max_nodes")
    elif cycle.insert == "highest" and budget > 0:
        if highest is None:
            raise ValueError("insert='highest' is AutoNEB's insertion: use method 'autoneb'")
        if state.dense is None:
            state.dense = _band_dense(state.band, evaluator, eval_batch, config.subsample)
            state.stats["loss_evaluations"] += len(state.dense)
        fill = highest(state.dense, pivots, min(cycle.insert_count, budget), config)
    state.band, state.weights = _fill_chain(state.band, state.weights, fill)
    if any(fill):
        state.dense = None
    if initial and config.init_noise > 0 and state.num_pivots > 2:
        generator = torch.Generator().manual_seed(config.seed + 2)
        _perturb(state.band, config.init_noise, generator)
    state.band.respace(state.weights)


def _fill_chain(band: Band, weights: Tensor, fill: list[list[float]]) -> tuple[Band, Tensor]:
    """Insert pivots at fractions ``fill[g]`` of each gap ``g``; split the gaps' weights alike.

    Each new pivot is an old one or ``lerp(old[g], old[g+1], alpha)``: every rank knows which,
    so it builds its new band -- its new block and neighbours -- from the old rows it needs,
    fetched from their old owners, and nothing else moves.
    """
    sources: list[tuple[int, float | None]] = [(0, None)]  # per new row: (old row, fraction)
    new_weights = []
    for g, alphas in enumerate(fill):
        edges = [0.0, *sorted(float(a) for a in alphas), 1.0]
        for lo, hi in zip(edges[:-1], edges[1:]):
            new_weights.append(float(weights[g]) * (hi - lo))
        sources += [(g, alpha) for alpha in edges[1:-1]]
        sources.append((g + 1, None))
    shard = Shard(len(sources), band.shard.rank, band.shard.world)

    def needed(rank: int) -> list[int]:
        view = shard.on(rank)
        rows: set[int] = set()
        for g, alpha in sources[view.lo - 1 : view.hi + 1]:
            rows.update((g,) if alpha is None else (g, g + 1))
        return sorted(rows)

    wanted = needed(shard.rank)
    old = dict(zip(wanted, band.rows_for([needed(r) for r in range(shard.world)])))
    rows = [
        old[g] if alpha is None else torch.lerp(old[g], old[g + 1], alpha)
        for g, alpha in sources[shard.lo - 1 : shard.hi + 1]
    ]
    new_band = Band(torch.stack(rows), shard, band.anchors)  # (n' + 2, D)
    return new_band, torch.tensor(new_weights, dtype=torch.float64, device=band.rows.device)


def _perturb(band: Band, size: float, generator: torch.Generator) -> None:
    """Bend the straight chain by ``size * |B - A| * sin(pi s) * u`` along a seeded unit ``u``,
    in place (every rank draws the same ``u`` and bends its band, halo included)."""
    rows = band.rows
    u = torch.randn(rows.shape[1], generator=generator, dtype=torch.float64)  # (D,)
    u = (u / u.norm()).to(device=rows.device, dtype=rows.dtype)
    seg = band.segment_lengths()  # (P-1,)
    pos = torch.cat([seg.new_zeros(1), seg.cumsum(0)])  # (P,)
    s = (pos / pos[-1]).to(rows.dtype)  # (P,)
    scale = size * float(torch.linalg.vector_norm(band.anchors[1] - band.anchors[0]))
    bump = scale * torch.sin(math.pi * s[1:-1])[:, None]  # (P-2, 1), the same on every rank
    shard = band.shard
    first, last = max(shard.lo - 1, 1), min(shard.hi, shard.size - 2)  # interior band rows
    if last >= first:
        at = slice(first - shard.lo + 1, last - shard.lo + 2)  # their places in the band
        rows[at] += bump[first - 1 : last] * u  # endpoints stay exact


def _eval_batch(objective: Objective, config: ChainConfig) -> Batch | None:
    """A fixed subset of the training set for dense losses (None for an energy)."""
    if objective.data is None:
        return None
    x, y = objective.data.x_train, objective.data.y_train
    size = config.dense_examples()
    n = len(y) if size == 0 else min(size, len(y))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed + 1))
    idx = order[:n].sort().values
    return x[idx].to(objective.device), y[idx].to(objective.device)


def dense_losses(
    chain: Tensor, evaluator: Evaluator, batch: Batch | None, subsample: int
) -> Tensor:
    """Losses at every pivot and ``subsample`` points in each gap: ``((P-1)(S+1)+1,)``."""
    return _band_dense(Band.whole(chain), evaluator, batch, subsample)


def _band_dense(band: Band, evaluator: Evaluator, batch: Batch | None, subsample: int) -> Tensor:
    """:func:`dense_losses` of the whole chain; sharded, each rank evaluates a contiguous run of
    the points, in whole chunks of the engine (vmap then sees the chunks one process would),
    from the chain rows around them."""
    shard, per_gap = band.shard, subsample + 1
    total = (shard.size - 1) * per_gap + 1  # M points; point m lies in gap m // (S+1)
    chunk = 64 if evaluator.mode == "vmap" else 1
    runs = [
        (lo * chunk, min(hi * chunk, total))
        for lo, hi in distributed.blocks(-(-total // chunk), shard.world)
    ]  # each rank's points

    def rows_of(first: int, stop: int) -> list[int]:
        """The chain rows that points ``first:stop`` interpolate between."""
        if stop <= first:
            return []
        return list(range(first // per_gap, min((stop - 1) // per_gap + 1, shard.size - 1) + 1))

    first, stop = runs[shard.rank]
    # sharded: the chain rows from gap first // (S+1) on; one process: the whole chain
    rows = band.rows_for([rows_of(*run) for run in runs]) if shard.sharded else band.rows
    offset = first % per_gap  # this rank's first point among those built from rows (k, D)
    alphas = torch.linspace(0, 1, subsample + 2, dtype=rows.dtype, device=rows.device)[:-1]
    left, right = rows[:-1], rows[1:]  # (k-1, D)
    points = left[:, None] + alphas[None, :, None] * (right - left)[:, None]  # (k-1, S+1, D)
    points = torch.cat([points.reshape(-1, rows.shape[1]), rows[-1:]])  # ((k-1)(S+1)+1, D)
    points = points[offset : offset + stop - first]  # (stop - first, D)
    saved, evaluator.weight_decay = evaluator.weight_decay, 0.0  # the plain loss
    try:
        values = evaluator.values(points, batch)  # (stop - first,)
    finally:
        evaluator.weight_decay = saved
    return assemble(shard, values, first, total).double().cpu()


def _cycle_record(state: ChainState, cycle: CycleConfig) -> dict:
    dense = state.dense
    assert dense is not None
    ends = 0.5 * float(dense[0] + dense[-1])
    return {
        "cycle": state.cycle + 1,
        "num_nodes": state.num_pivots,
        "steps": cycle.steps,
        "lr": cycle.lr,
        "optimizer": cycle.optimizer,
        "saddle": round(float(dense.max()), 6),
        "barrier": round(float(dense.max()) - ends, 6),
        "gradient_evaluations": state.stats["gradient_evaluations"],
    }


# ---------------------------------------------------------------------------------------------
# The resumable state: always the whole chain (gathered to rank 0, which alone writes)


def _save(
    fit_state: FitState, state: ChainState, optimiser: _Optimiser | None, stream: BatchStream
) -> None:
    if not fit_state.enabled:
        return
    chain = state.band.gather(dst=0)  # (P, D) on rank 0, None elsewhere
    stream_tensors, progress = stream.state()
    tensors = {"chain": chain, "weights": state.weights, **stream_tensors}
    if state.dense is not None:
        tensors["dense"] = state.dense
    if optimiser is not None:
        for key, value in optimiser.state().items():
            # moments are shaped like the pivots: gather the blocks; the step count is shared
            tensors[key] = state.band.gather_like(value) if value.dim() else value
    progress.update(
        cycle=state.cycle,
        step=state.step,
        inserted=state.inserted,
        mid_cycle=optimiser is not None,
    )
    if distributed.is_main():
        fit_state.save(progress, tensors, state.stats)


def _restore(
    tensors: StateDict,
    progress: dict,
    stats: dict,
    ends: Tensor,
    schedule: list[CycleConfig],
    stream: BatchStream,
) -> tuple[ChainState, _Optimiser | None]:
    """The saved whole chain, of which this rank takes its band (any number of ranks)."""
    chain = tensors["chain"].to(device=ends.device, dtype=ends.dtype)  # (P, D)
    band = Band.take(chain, ends)
    state = ChainState(
        band=band,
        weights=tensors["weights"].to(ends.device),
        cycle=int(progress["cycle"]),
        step=int(progress["step"]),
        inserted=bool(progress["inserted"]),
        dense=tensors.get("dense"),
        stats=stats,
    )
    stream.restore(tensors, progress)
    optimiser = None
    if progress["mid_cycle"]:
        optimiser = _Optimiser(schedule[state.cycle], band)
        whole = (band.shard.interior, chain.shape[1])
        mine = {
            k: (band.shard.take(v) if tuple(v.shape) == whole else v).to(ends.device)
            for k, v in tensors.items()
        }
        optimiser.load(mine)
    return state, optimiser
