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

**AutoNEB** runs NEB in cycles, each with a fresh optimiser. A cycle first inserts pivots:
``equal`` puts ``insert_count`` pivots evenly into every gap (the first cycle), ``highest`` puts
up to ``insert_count`` pivots where the loss evaluated densely between neighbours (``subsample``
points per gap) rises most above the chord between them, if that rise exceeds
``insert_threshold`` times the chain's loss range. A pivot inserted at fraction ``a`` of a gap
splits that gap's share of the arc length ``a : 1-a``, so inserted pivots stay where they were
needed. **NEB** is a single cycle with ``nodes`` pivots and no insertion. The dense losses
(insertion, and the barrier recorded per cycle) are the plain loss on a fixed, seeded subset of
``eval_size`` training examples, or the energy itself.

Initialisation: the interior pivots start on the straight line plus a small seeded bump
``init_noise * |B - A| * sin(pi s) * u`` (``u`` a random unit vector, ``s`` the pivot's
position): in a symmetric landscape the straight line through a saddle is itself stationary.

The result is the :class:`~modeconn.paths.PolyChain` through the pivots with knots at their
normalised arc-length positions, so ``t`` is proportional to distance in weight space.
``ctx.stats`` receives the number of gradient evaluations (one per interior pivot per step),
loss evaluations, and per cycle the pivot count and the barrier of the dense evaluation.
The fit is resumable: the state (pivots, optimiser, data stream position) is saved to
``ctx.checkpoint`` after every cycle and every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from modeconn.fitting import FitContext, MethodConfig
from modeconn.io import load_tensors, save_tensors
from modeconn.objective import Objective
from modeconn.paths import PolyChain
from modeconn.progress import progress_bar
from modeconn.types import Batch, StateDict

__all__ = [
    "CycleConfig",
    "NEBConfig",
    "AutoNEBConfig",
    "DEFAULT_CYCLES",
    "fit_neb",
    "fit_autoneb",
    "improved_tangents",
    "project_out",
    "respace",
    "arc_positions",
    "load_config",
]

log = logging.getLogger("modeconn")

_FORMAT = 1  # version of the checkpoint layout
# Below this many numbers, the fused Adam kernel's parallel region costs more than the update.
_FUSED_MIN = 1 << 16


# ---------------------------------------------------------------------------------------------
# Configuration


class CycleConfig(BaseModel):
    """One AutoNEB cycle: insert pivots, then ``steps`` NEB steps with a fresh optimiser.

    ``repeat`` runs the same entry several times in a row (each a cycle of its own, with its
    own insertion), so a schedule reads like the paper's: "4 cycles of 1000 steps at lr 0.1".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(gt=0, description="NEB steps in the cycle")
    lr: float = Field(gt=0, description="learning rate of the cycle's optimiser")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam (scale-free step, the default) or sgd with momentum"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(0.0, ge=0, description="0.5*wd*|w|^2 added to every pivot's loss")
    insert: Literal["equal", "highest", "none"] = Field(
        "highest", description="where to insert pivots before the cycle's steps"
    )
    insert_count: int = Field(
        2, ge=0, description="equal: pivots per gap; highest: at most this many pivots"
    )
    repeat: int = Field(1, ge=1, description="run this entry this many times in a row")


#: Default AutoNEB schedule: 8 cycles of 300 Adam steps, lr 3e-3 -> 1e-3 -> 3e-4; a few minutes
#: for two digits MLPs (64-256-256-10) on 2 CPU cores, seconds for a 2-D test surface.
DEFAULT_CYCLES: tuple[CycleConfig, ...] = (
    CycleConfig(steps=300, lr=3e-3, insert="equal", insert_count=3),
    CycleConfig(steps=300, lr=3e-3, insert="highest", insert_count=2, repeat=3),
    CycleConfig(steps=300, lr=1e-3, insert="highest", insert_count=2, repeat=2),
    CycleConfig(steps=300, lr=3e-4, insert="highest", insert_count=2, repeat=2),
)


class _ChainOptions(MethodConfig):
    """Options that NEB and AutoNEB share."""

    batch_size: int = Field(128, gt=0, description="mini-batch size (models only)")
    init_noise: float = Field(
        0.01,
        ge=0,
        description="seeded initial bump of the interior pivots (a smooth bend along a random "
        "direction), relative to |B - A|",
    )
    subsample: int = Field(
        9, ge=1, description="points evaluated between neighbouring pivots (insertion, barrier)"
    )
    eval_size: int = Field(
        2048,
        ge=0,
        description="training examples for the dense loss between pivots (0: all)",
    )
    engine: Literal["auto", "vmap", "loop"] = Field(
        "auto",
        description="how the pivots are run: vmap (stacked), loop, or auto (vmap unless the "
        "model has convolutions and runs on CPU)",
    )
    checkpoint_every: int = Field(
        500, gt=0, description="save the resumable state every this many steps (and per cycle)"
    )

    def schedule(self) -> list[CycleConfig]:
        raise NotImplementedError


class NEBConfig(_ChainOptions):
    """Plain NEB: ``nodes`` pivots (endpoints included), one optimiser, no insertion."""

    nodes: int = Field(9, ge=3, description="pivots of the chain, endpoints included")
    steps: int = Field(1500, gt=0, description="NEB steps")
    lr: float = Field(3e-3, gt=0, description="learning rate (Adam by default)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam or sgd (with momentum)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(0.0, ge=0, description="0.5*wd*|w|^2 added to the loss")

    def schedule(self) -> list[CycleConfig]:
        return [
            CycleConfig(
                steps=self.steps,
                lr=self.lr,
                optimizer=self.optimizer,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                insert="equal",
                insert_count=self.nodes - 2,
            )
        ]


class AutoNEBConfig(_ChainOptions):
    """AutoNEB: a schedule of NEB cycles that insert pivots where the chain needs them."""

    cycles: list[CycleConfig] = Field(
        default_factory=lambda: list(DEFAULT_CYCLES),
        description="the cycle schedule (from --config FILE.yaml)",
    )
    insert_threshold: float = Field(
        0.1,
        ge=0,
        description="insert only where the loss rises above the chord by this share of the chain's range",
    )
    max_nodes: int = Field(33, ge=3, description="never grow the chain beyond this many pivots")

    @field_validator("cycles")
    @classmethod
    def _not_empty(cls, cycles: list[CycleConfig]) -> list[CycleConfig]:
        if not cycles:
            raise ValueError("the schedule needs at least one cycle")
        return cycles

    @model_validator(mode="after")
    def _first_cycle_inserts(self) -> AutoNEBConfig:
        first = self.cycles[0]
        if first.insert == "equal" and 2 + first.insert_count > self.max_nodes:
            raise ValueError(
                f"the first cycle inserts {first.insert_count} pivots, more than "
                f"max_nodes={self.max_nodes} allows"
            )
        if first.insert == "none" or first.insert_count == 0:
            raise ValueError(
                "the first cycle must insert pivots between the endpoints "
                f"(got insert={first.insert!r}, insert_count={first.insert_count}); "
                "use insert: equal with insert_count >= 1"
            )
        return self

    def schedule(self) -> list[CycleConfig]:
        return [c for c in self.cycles for _ in range(c.repeat)]


def load_config(
    path: str | os.PathLike, method: Literal["neb", "autoneb"] = "autoneb"
) -> _ChainOptions:
    """Read a YAML file of options (e.g. ``modeconn/configs/autoneb_resnet20.yaml``)."""
    import yaml

    from modeconn.methods import make_config

    with open(path) as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} must hold a mapping of option: value, got {type(loaded).__name__}"
        )
    return make_config(method, **loaded)


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
# Flat parameter vectors and batched evaluation


@dataclass(frozen=True)
class _Layout:
    """How a flat vector splits into the named parameter tensors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, params: StateDict) -> _Layout:
        dtypes = {v.dtype for v in params.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"NEB needs floating parameters of one dtype, got {sorted(map(str, dtypes))}"
            )
        return cls(
            tuple(params),
            tuple(tuple(v.shape) for v in params.values()),
            tuple(v.numel() for v in params.values()),
        )

    def flatten(self, params: StateDict) -> Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])  # (D,)

    def unflatten(self, flat: Tensor) -> StateDict:
        parts = flat.split(self.sizes, dim=-1)
        lead = flat.shape[:-1]
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes)}


class _Evaluator:
    """Losses and gradients of the objective at many pivots, batched with vmap or looped."""

    def __init__(self, objective: Objective, layout: _Layout, engine: str):
        self.objective = objective
        self.layout = layout
        self.mode = _pick_engine(objective, engine)
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


def _pick_engine(objective: Objective, engine: str) -> str:
    """``auto``: vmap, except a loop for models with convolutions on CPU.

    Batched convolutions under vmap become grouped convolutions, which on CPU ran slower than a
    loop over pivots (benchmarks/bench_neb.py); matrix products batch well.
    """
    if engine != "auto":
        return engine
    if objective.model is None:
        return "vmap"
    convs = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in objective.model.modules())
    return "loop" if convs and objective.device.type == "cpu" else "vmap"


# ---------------------------------------------------------------------------------------------
# The optimiser of one cycle, on the (N, D) view of the interior pivots


class _Optimiser:
    """A fresh torch optimiser per cycle over the interior rows of the chain, updated in place."""

    _BUFFERS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}

    def __init__(self, cycle: CycleConfig, inner: Tensor):
        self.cycle = cycle
        self.inner = inner  # (N, D) view into the chain: the optimiser writes there directly
        if cycle.optimizer == "adam":
            kwargs = {"lr": cycle.lr, "betas": (cycle.momentum, 0.999)}
            self.opt = None
            if inner.numel() >= _FUSED_MIN:  # one kernel per step; tiny tensors: plain ops
                # no fused kernel for some devices and dtypes: fall back below
                with contextlib.suppress(RuntimeError, TypeError):
                    self.opt = torch.optim.Adam([inner], fused=True, **kwargs)
            if self.opt is None:
                self.opt = torch.optim.Adam([inner], foreach=False, **kwargs)
        else:
            self.opt = torch.optim.SGD([inner], lr=cycle.lr, momentum=cycle.momentum)

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        self.inner.grad = grad
        self.opt.step()
        self.inner.grad = None

    def state(self) -> dict[str, Tensor]:
        saved = self.opt.state.get(self.inner, {})
        names = self._BUFFERS[self.cycle.optimizer]
        return {f"opt_{k}": saved[k] for k in names if saved.get(k) is not None}

    def load(self, tensors: dict[str, Tensor], step_count: int) -> None:
        """Restore the buffers saved by :meth:`state` after ``step_count`` steps."""
        state = {k[4:]: v.to(self.inner.device) for k, v in tensors.items() if k.startswith("opt_")}
        if step_count == 0 or not state:
            return
        if self.cycle.optimizer == "adam":
            state["step"] = torch.tensor(float(step_count))
        group = self.opt.state_dict()["param_groups"]
        self.opt.load_state_dict({"state": {0: state}, "param_groups": group})


# ---------------------------------------------------------------------------------------------
# The data stream, replayable from a checkpoint


class _Stream:
    """Batches epoch after epoch; its position is (generator state at epoch start, batches used)."""

    def __init__(self, objective: Objective, generator: torch.Generator):
        self.objective = objective
        self.generator = generator
        self.epoch_state = generator.get_state()
        self.used = 0
        self._it: Iterator | None = None

    def next(self) -> Batch | None:
        while True:
            if self._it is None:
                self.epoch_state = self.generator.get_state()
                self.used = 0
                self._it = iter(self.objective.epoch(self.generator))
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.used += 1
            return batch

    def position(self) -> tuple[Tensor, int]:
        return self.epoch_state, self.used if self._it is not None else -1

    def restore(self, epoch_state: Tensor, used: int) -> None:
        self.generator.set_state(epoch_state)
        self._it = None
        if used < 0:
            return
        self.epoch_state = epoch_state
        self._it = iter(self.objective.epoch(self.generator))
        for _ in range(used):
            next(self._it)  # replays the shuffling and augmentation draws exactly
        self.used = used


# ---------------------------------------------------------------------------------------------
# The fitter


@dataclass
class _State:
    chain: Tensor  # (P, D) pivots, endpoints included
    weights: Tensor  # (P-1,) float64 relative arc-length share of each gap
    cycle: int = 0  # index into the expanded schedule of the cycle in progress
    step: int = 0  # steps done in that cycle
    inserted: bool = False  # whether the cycle's insertion is done
    dense: Tensor | None = None  # (M,) dense losses of the chain as it ended the last cycle
    stats: dict = field(default_factory=dict)


def fit_neb(
    objective: Objective, start: StateDict, end: StateDict, config: NEBConfig, ctx: FitContext
):
    """NEB with a fixed number of pivots (Draxler et al. 2018; Henkelman & Jonsson 2000)."""
    return _fit(objective, start, end, config, ctx, "neb")


def fit_autoneb(
    objective: Objective, start: StateDict, end: StateDict, config: AutoNEBConfig, ctx: FitContext
):
    """AutoNEB: NEB cycles that insert pivots where the loss rises (Draxler et al. 2018)."""
    return _fit(objective, start, end, config, ctx, "autoneb")


def _fit(
    objective: Objective,
    start: StateDict,
    end: StateDict,
    config: _ChainOptions,
    ctx: FitContext,
    name: str,
) -> PolyChain:
    layout = _Layout.of(start)
    a, b = layout.flatten(start).detach(), layout.flatten(end).detach()  # (D,)
    if bool(torch.equal(a, b)):
        raise ValueError("start and end are the same point: there is no path to fit")
    schedule = config.schedule()
    evaluator = _Evaluator(objective, layout, config.engine)
    generator = torch.Generator().manual_seed(config.seed)
    stream = _Stream(objective, generator)
    eval_batch = _eval_batch(objective, config)
    state = _State(chain=torch.stack([a, b]), weights=torch.ones(1, dtype=torch.float64))
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
    optimiser: _Optimiser | None = None
    fingerprint = _fingerprint(config, name)
    if ctx.resume and ctx.checkpoint is not None and ctx.checkpoint.exists():
        state, opt_tensors = _load(ctx.checkpoint, fingerprint, a, b, stream)
        if opt_tensors is not None:
            optimiser = _Optimiser(schedule[state.cycle], state.chain[1:-1])
            optimiser.load(opt_tensors, state.step)
        evaluator.mode = state.stats.get("engine", evaluator.mode)
        log.info("%s: resumed at cycle %d step %d", name, state.cycle + 1, state.step)
    started = time.perf_counter()
    while state.cycle < len(schedule):
        cycle = schedule[state.cycle]
        evaluator.weight_decay = cycle.weight_decay
        if not state.inserted:
            _insert(state, cycle, config, evaluator, eval_batch)
            state.inserted = True
            optimiser = None
        if optimiser is None:
            optimiser = _Optimiser(cycle, state.chain[1:-1])
        _run_cycle(
            state, cycle, len(schedule), optimiser, evaluator, stream, eval_batch, config, ctx, name
        )
        # End of cycle: dense evaluation for the record and for the next insertion.
        state.dense = _dense_losses(state.chain, evaluator, eval_batch, config.subsample)
        state.stats["loss_evaluations"] += len(state.dense)
        state.stats["cycles"].append(_cycle_record(state, cycle, config.subsample))
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
        _save(ctx, state, None, stream, fingerprint)
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
    nodes = {k: v.detach().clone() for k, v in layout.unflatten(state.chain).items()}
    return PolyChain(nodes, knots=knots)


def _run_cycle(
    state, cycle, num_cycles, optimiser, evaluator, stream, eval_batch, config, ctx, name
) -> None:
    """NEB steps until the cycle's budget is spent; the chain is updated in place."""
    chain = state.chain  # (P, D); the optimiser holds the view chain[1:-1]
    # The endpoints never move: their energies (for the tangents at the first and last interior
    # pivots) are computed once per cycle -- exactly for an energy, on the fixed evaluation
    # subset of the training set for a model.
    ends = evaluator.values(chain[[0, -1]], eval_batch, loop=True)  # (2,)
    state.stats["loss_evaluations"] += 2
    n_inner = len(chain) - 2
    if n_inner == 0:  # nothing was inserted between the endpoints: nothing to move
        log.info("%s cycle %d: no interior pivots, no steps", name, state.cycle + 1)
        state.step = cycle.steps
        return
    description = f"{name} cycle {state.cycle + 1}/{num_cycles} ({len(chain)} pivots)"
    with progress_bar(cycle.steps, description, enabled=ctx.progress) as bar:
        bar.advance(state.step)
        while state.step < cycle.steps:
            batch = stream.next()
            losses = _neb_step(chain, state.weights, evaluator, optimiser, batch, ends)
            state.step += 1
            state.stats["steps"] += 1
            state.stats["gradient_evaluations"] += n_inner
            if ctx.progress:
                bar.advance(1, max_loss=float(losses.max()))
            if state.step % 50 == 0 or state.step == cycle.steps:
                _check_finite(chain, state, cycle, name)
            if state.step % config.checkpoint_every == 0 and state.step < cycle.steps:
                _save(ctx, state, optimiser, stream, _fingerprint(config, name))
    state.stats["engine"] = evaluator.mode


def _neb_step(
    chain: Tensor,
    weights: Tensor,
    evaluator: _Evaluator,
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


def _check_finite(chain: Tensor, state: _State, cycle: CycleConfig, name: str) -> None:
    if not bool(torch.isfinite(chain).all()):
        raise RuntimeError(
            f"{name}: the chain became non-finite in cycle {state.cycle + 1} at step "
            f"{state.step} (optimizer {cycle.optimizer}, lr {cycle.lr}); lower the lr"
        )


def _insert(state, cycle, config, evaluator, eval_batch) -> None:
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
        if state.dense is None:
            state.dense = _dense_losses(state.chain, evaluator, eval_batch, config.subsample)
            state.stats["loss_evaluations"] += len(state.dense)
        count = min(cycle.insert_count, budget)
        fill = _highest_fill(state.dense, len(state.chain), count, config)
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


def _highest_fill(dense: Tensor, num_pivots: int, count: int, config) -> list[list[float]]:
    """Up to ``count`` gaps where the dense loss rises most above the chord (Draxler et al.)."""
    per_gap = config.subsample + 1
    pivots = dense[::per_gap]  # (P,)
    fill: list[list[float]] = [[] for _ in range(num_pivots - 1)]
    if count == 0:
        return fill
    span = float(pivots.max() - pivots.min()) + 1e-12
    alphas = torch.linspace(0, 1, config.subsample + 2, dtype=torch.float64)[1:-1]  # (S,)
    inner = dense[:-1].reshape(num_pivots - 1, per_gap)[:, 1:].double()  # (P-1, S)
    left, right = pivots[:-1].double(), pivots[1:].double()  # (P-1,)
    chord = left[:, None] * (1 - alphas) + right[:, None] * alphas  # (P-1, S)
    scores = (inner - chord) / span  # (P-1, S)
    best, where = scores.max(dim=1)  # (P-1,)
    threshold = getattr(config, "insert_threshold", 0.1)
    for g in best.argsort(descending=True)[:count].tolist():
        if float(best[g]) > threshold:
            fill[g].append(float(alphas[where[g]]))
    return fill


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


def _eval_batch(objective: Objective, config: _ChainOptions) -> Batch | None:
    """A fixed subset of the training set for dense losses (None for an energy)."""
    if objective.data is None:
        return None
    x, y = objective.data.x_train, objective.data.y_train
    n = len(y) if config.eval_size == 0 else min(config.eval_size, len(y))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed + 1))
    idx = order[:n].sort().values
    return x[idx].to(objective.device), y[idx].to(objective.device)


def _dense_losses(chain: Tensor, evaluator: _Evaluator, batch, subsample: int) -> Tensor:
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


def _cycle_record(state: _State, cycle: CycleConfig, subsample: int) -> dict:
    dense = state.dense
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
# Checkpoints (safetensors + JSON meta; exact resume)


def _fingerprint(config: _ChainOptions, name: str) -> str:
    return json.dumps(
        {"method": name, **config.model_dump(exclude={"checkpoint_every"})}, sort_keys=True
    )


def _save(ctx: FitContext, state: _State, optimiser, stream: _Stream, fingerprint: str) -> None:
    if ctx.checkpoint is None:
        return
    epoch_state, used = stream.position()
    tensors = {
        "chain": state.chain,
        "weights": state.weights,
        "generator": stream.generator.get_state(),
        "epoch_generator": epoch_state,
    }
    if state.dense is not None:
        tensors["dense"] = state.dense
    if optimiser is not None:
        tensors.update(optimiser.state())
    meta = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "cycle": state.cycle,
        "step": state.step,
        "inserted": state.inserted,
        "used": used,
        "mid_cycle": optimiser is not None,
        "stats": state.stats,
    }
    save_tensors(ctx.checkpoint, tensors, meta)


def _load(path, fingerprint: str, a: Tensor, b: Tensor, stream: _Stream):
    tensors, meta = load_tensors(path, what="NEB checkpoint")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a NEB checkpoint of format {_FORMAT} (meta {sorted(meta)})")
    if meta["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was written with different options; run without --resume to start over "
            f"(saved: {meta['fingerprint']}, now: {fingerprint})"
        )
    chain = tensors["chain"].to(device=a.device, dtype=a.dtype)
    if not (torch.equal(chain[0], a) and torch.equal(chain[-1], b)):
        raise ValueError(f"{path} was written for different endpoints; run without --resume")
    state = _State(
        chain=chain,
        weights=tensors["weights"].to(a.device),
        cycle=meta["cycle"],
        step=meta["step"],
        inserted=meta["inserted"],
        dense=tensors.get("dense"),
        stats=meta["stats"],
    )
    stream.generator.set_state(tensors["generator"])
    if meta["used"] >= 0:
        stream.restore(tensors["epoch_generator"], meta["used"])
    opt = None
    if meta["mid_cycle"]:
        opt = {k: v.to(a.device) for k, v in tensors.items() if k.startswith("opt_")}
    return state, opt
