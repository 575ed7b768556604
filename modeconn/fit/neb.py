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

from modeconn.fit.configs import ChainConfig, CycleConfig, NEBConfig
from modeconn.fit.objective import Objective
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
        if self.mode == "vmap" and not loop:
            fn = torch.func.vmap(self._loss, in_dims=(0, None))
            return torch.cat([fn(p, batch) for p in points.split(chunk)])
        return torch.stack([self._loss(row, batch) for row in points.unbind(0)])


# ---------------------------------------------------------------------------------------------
# The optimiser of one cycle, on the (N, D) view of the interior pivots


class _Optimiser:
    """A fresh torch optimiser per cycle over the interior rows of the chain, updated in place."""

    def __init__(self, cycle: CycleConfig, inner: Tensor):
        self.inner = inner  # (N, D) view into the chain: the optimiser writes there directly
        self.opt = _make_optimizer(cycle, inner)

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        self.inner.grad = grad
        self.opt.step()
        self.inner.grad = None


def _make_optimizer(cycle: CycleConfig, inner: Tensor) -> torch.optim.Optimizer:
    """A cycle's optimiser: Adam (fused where the tensor is large enough) or SGD."""
    if cycle.optimizer == "sgd":
        return torch.optim.SGD([inner], lr=cycle.lr, momentum=cycle.momentum)
    kwargs = {"lr": cycle.lr, "betas": (cycle.momentum, 0.999)}
    if inner.numel() >= _FUSED_MIN:  # one kernel per step; tiny tensors: plain ops
        # no fused kernel for some devices and dtypes: fall back below
        with contextlib.suppress(RuntimeError, TypeError):
            return torch.optim.Adam([inner], fused=True, **kwargs)
    return torch.optim.Adam([inner], foreach=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# The fitter


#: AutoNEB's insertion where the loss rises: ``(dense, pivots, count, config) -> fractions``,
#: one list of fractions in (0, 1) per gap (see :mod:`modeconn.fit.autoneb`).
HighestFill = Callable[[Tensor, int, int, ChainConfig], list[list[float]]]


@dataclass
class ChainState:
    chain: Tensor  # (P, D) pivots, endpoints included
    weights: Tensor  # (P-1,) float64 relative arc-length share of each gap
    cycle: int = 0  # index into the expanded schedule of the cycle in progress
    step: int = 0  # steps done in that cycle
    inserted: bool = False  # whether the cycle's insertion is done
    dense: Tensor | None = None  # (M,) dense losses of the chain as it ended the last cycle
    stats: dict = field(default_factory=dict)


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

    ``highest`` is the insertion used by cycles with ``insert="highest"`` (AutoNEB's).
    """
    layout = FlatLayout(start)
    a, b = layout.flatten(start), layout.flatten(end)  # (D,)
    if bool(torch.equal(a, b)):
        raise ValueError("start and end are the same point: there is no path to fit")
    schedule = config.schedule(objective.steps_per_epoch)
    evaluator = Evaluator(objective, layout, config.engine)
    stream = BatchStream(objective, torch.Generator().manual_seed(config.seed))
    eval_batch = _eval_batch(objective, config)
    state = ChainState(chain=torch.stack([a, b]), weights=torch.ones(1, dtype=torch.float64))
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
    optimiser: _Optimiser | None = None
    if (saved := fit_state.resume()) is not None:
        state, optimiser = _restore(saved.tensors, saved.progress, saved.stats, a, schedule, stream)
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
            optimiser = _Optimiser(cycle, state.chain[1:-1])
        run = _CycleRun(state, cycle, len(schedule), optimiser, evaluator, stream, eval_batch)
        run.steps(ctx, fit_state, name)
        # End of cycle: dense evaluation for the record and for the next insertion.
        state.dense = dense_losses(state.chain, evaluator, eval_batch, config.subsample)
        state.stats["loss_evaluations"] += len(state.dense)
        state.stats["cycles"].append(_cycle_record(state, cycle))
        log.info(
            "%s cycle %d/%d: %d pivots, barrier %.4g",
            name,
            state.cycle + 1,
            len(schedule),
            len(state.chain),
            state.stats["cycles"][-1]["barrier"],
        )
        state.cycle += 1
        state.step = 0
        state.inserted = False
        optimiser = None
        _save(fit_state, state, None, stream)
    state.stats["num_nodes"] = len(state.chain)
    state.stats["seconds"] = round(time.perf_counter() - started, 3)  # this call's share
    if state.stats["cycles"]:
        last = state.stats["cycles"][-1]
        state.stats["barrier"] = last["barrier"]
        state.stats["saddle"] = last["saddle"]
    ctx.stats.update(state.stats)
    pos = arc_positions(state.chain)  # (P,)
    knots = (pos / pos[-1]).cpu()
    if not bool((knots[1:] > knots[:-1]).all()):  # coincident pivots: fall back on uniform
        knots = None
    return PolyChain(layout.unflatten_stacked(state.chain), knots=knots)


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
        chain = state.chain  # (P, D); the optimiser holds the view chain[1:-1]
        # The endpoints never move: their energies (for the tangents at the first and last
        # interior pivots) are computed once per cycle -- exactly for an energy, on the fixed
        # evaluation subset of the training set for a model.
        ends = self.evaluator.values(chain[[0, -1]], self.eval_batch, loop=True)  # (2,)
        state.stats["loss_evaluations"] += 2
        n_inner = len(chain) - 2
        if n_inner == 0:  # nothing was inserted between the endpoints: nothing to move
            log.info("%s cycle %d: no interior pivots, no steps", name, state.cycle + 1)
            state.step = total
            return
        description = f"{name} cycle {state.cycle + 1}/{self.num_cycles} ({len(chain)} pivots)"
        with progress_bar(total, description, enabled=ctx.progress) as bar:
            bar.skip(state.step)
            while state.step < total:
                batch = self.stream.next()
                losses = _neb_step(
                    chain, state.weights, self.evaluator, self.optimiser, batch, ends
                )
                state.step += 1
                state.stats["steps"] += 1
                state.stats["gradient_evaluations"] += n_inner
                if ctx.progress:
                    bar.advance(1, max_loss=float(losses.max()))
                if state.step % 50 == 0 or state.step == total:
                    _check_finite(chain, state, cycle, name)
                if fit_state.due(state.step) and state.step < total:
                    _save(fit_state, state, self.optimiser, self.stream)
        state.stats["engine"] = self.evaluator.mode


def _neb_step(
    chain: Tensor,
    weights: Tensor,
    evaluator: Evaluator,
    optimiser: _Optimiser,
    batch: Batch | None,
    ends: Tensor,
) -> Tensor:
    """One NEB step on ``chain`` ``(P, D)`` in place; returns the interior losses ``(P-2,)``.

    ``ends``: the endpoints' energies ``(2,)``, for the tangents next to them.
    """
    grads, losses = evaluator.grads(chain[1:-1], batch)  # (N, D), (N,)
    energies = torch.cat([ends[:1], losses, ends[1:]])  # (P,)
    tangents = _tangents(chain[1:] - chain[:-1], energies)  # (N, D)
    optimiser.step(project_out(grads, tangents))  # moves chain[1:-1]
    respace(chain, weights, out=chain)  # k = infinity: back to the target spacing
    return losses


def _check_finite(chain: Tensor, state: ChainState, cycle: CycleConfig, name: str) -> None:
    if not bool(torch.isfinite(chain).all()):
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
    """Insert pivots into the chain as the cycle asks (and bend the very first interior ones)."""
    initial = len(state.chain) == 2
    budget = getattr(config, "max_nodes", 10**9) - len(state.chain)
    gaps = len(state.chain) - 1
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
            state.dense = dense_losses(state.chain, evaluator, eval_batch, config.subsample)
            state.stats["loss_evaluations"] += len(state.dense)
        fill = highest(state.dense, len(state.chain), min(cycle.insert_count, budget), config)
    state.chain, state.weights = _fill_chain(state.chain, state.weights, fill)
    if any(fill):
        state.dense = None
    if initial and config.init_noise > 0 and len(state.chain) > 2:
        generator = torch.Generator().manual_seed(config.seed + 2)
        state.chain = _perturb(state.chain, config.init_noise, generator)
    state.chain = respace(state.chain, state.weights).contiguous()


def _fill_chain(chain: Tensor, weights: Tensor, fill: list[list[float]]) -> tuple[Tensor, Tensor]:
    """Insert pivots at fractions ``fill[g]`` of each gap ``g``; split the gaps' weights alike."""
    rows, new_weights = [chain[:1]], []
    for g, alphas in enumerate(fill):
        left, right = chain[g], chain[g + 1]
        edges = [0.0, *sorted(float(a) for a in alphas), 1.0]
        for lo, hi in zip(edges[:-1], edges[1:]):
            new_weights.append(float(weights[g]) * (hi - lo))
        for alpha in edges[1:-1]:
            rows.append(torch.lerp(left, right, alpha)[None])
        rows.append(chain[g + 1 : g + 2])
    return torch.cat(rows), torch.tensor(new_weights, dtype=torch.float64, device=chain.device)


def _perturb(chain: Tensor, size: float, generator: torch.Generator) -> Tensor:
    """Bend the straight chain by ``size * |B - A| * sin(pi s) * u`` along a seeded unit ``u``."""
    u = torch.randn(chain.shape[1], generator=generator, dtype=torch.float64)  # (D,)
    u = (u / u.norm()).to(device=chain.device, dtype=chain.dtype)
    pos = arc_positions(chain)
    s = (pos / pos[-1]).to(chain.dtype)  # (P,)
    scale = size * float(torch.linalg.vector_norm(chain[-1] - chain[0]))
    out = chain.clone()
    out[1:-1] += scale * torch.sin(math.pi * s[1:-1])[:, None] * u  # endpoints stay exact
    return out


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
    alphas = torch.linspace(0, 1, subsample + 2, dtype=chain.dtype, device=chain.device)[:-1]
    left, right = chain[:-1], chain[1:]  # (P-1, D)
    points = left[:, None] + alphas[None, :, None] * (right - left)[:, None]  # (P-1, S+1, D)
    points = torch.cat([points.reshape(-1, chain.shape[1]), chain[-1:]])  # (M, D)
    saved, evaluator.weight_decay = evaluator.weight_decay, 0.0  # the plain loss
    try:
        return evaluator.values(points, batch).double().cpu()
    finally:
        evaluator.weight_decay = saved


def _cycle_record(state: ChainState, cycle: CycleConfig) -> dict:
    dense = state.dense
    assert dense is not None
    ends = 0.5 * float(dense[0] + dense[-1])
    return {
        "cycle": state.cycle + 1,
        "num_nodes": len(state.chain),
        "steps": cycle.steps,
        "lr": cycle.lr,
        "optimizer": cycle.optimizer,
        "saddle": round(float(dense.max()), 6),
        "barrier": round(float(dense.max()) - ends, 6),
        "gradient_evaluations": state.stats["gradient_evaluations"],
    }


# ---------------------------------------------------------------------------------------------
# The resumable state


def _save(
    fit_state: FitState, state: ChainState, optimiser: _Optimiser | None, stream: BatchStream
) -> None:
    if not fit_state.enabled:
        return
    stream_tensors, progress = stream.state()
    tensors = {"chain": state.chain, "weights": state.weights, **stream_tensors}
    if state.dense is not None:
        tensors["dense"] = state.dense
    if optimiser is not None:
        tensors.update(optimizer_tensors(optimiser.opt))
    progress.update(
        cycle=state.cycle, step=state.step, inserted=state.inserted, mid_cycle=optimiser is not None
    )
    fit_state.save(progress, tensors, state.stats)


def _restore(
    tensors: StateDict,
    progress: dict,
    stats: dict,
    a: Tensor,
    schedule: list[CycleConfig],
    stream: BatchStream,
) -> tuple[ChainState, _Optimiser | None]:
    state = ChainState(
        chain=tensors["chain"].to(device=a.device, dtype=a.dtype),
        weights=tensors["weights"].to(a.device),
        cycle=int(progress["cycle"]),
        step=int(progress["step"]),
        inserted=bool(progress["inserted"]),
        dense=tensors.get("dense"),
        stats=stats,
    )
    stream.restore(tensors, progress)
    optimiser = None
    if progress["mid_cycle"]:
        optimiser = _Optimiser(schedule[state.cycle], state.chain[1:-1])
        load_optimizer_tensors(optimiser.opt, {k: v.to(a.device) for k, v in tensors.items()})
    return state, optimiser
