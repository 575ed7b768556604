"""Geodesic paths: shortest paths in the space of predictive distributions.

Tan et al. 2023, "Geodesic Mode Connectivity" (ICLR Tiny Papers). N models are initialised
evenly on the straight line between A and (aligned) B; the endpoints stay fixed and the interior
models minimise the discrete *energy*

    E({theta_i}) = sum_{i=1}^{N-1} JSD(p_i || p_{i+1})          (the paper's Eq. 2)

where ``p_i`` is model i's predictive distribution over the classes, averaged over training
*inputs* (the empirical p(x)); labels are never read. Minimising the energy rather than the length
``sum sqrt(JSD)`` gives the constant-speed geodesic; the length is what we report (the paper's
Figure 2, left). JSD is computed in log space from ``log_softmax``, so saturated outputs stay
finite. Plain SGD, lr 0.1, batch 256 (the paper's settings); the budget is counted in steps
(~3,900 in the paper) because on a small data set 20 epochs are only a hundred-odd steps.

Plain SGD is slow when the straight path is already nearly flat: the energy is then tiny, and it
is stiff (its curvature grows like (N-1)^2 along the chain), so a stable learning rate moves the
chain little. Measured on aligned digits MLPs: width 16, 1,500 steps bring the straight path's
peak train loss 0.317 down to 0.122; width 256 (straight peak 0.048, endpoints 0.015) only to
0.040, and to 0.029 with momentum 0.9 after 3,000 steps. ``optimizer="adam"`` with
``schedule="cosine"`` (lr 1e-3) minimises the same energy far faster: 0.018 after 2,000 steps.

The N-2 interior models are evaluated together: their parameters are stacked along a leading
axis and run with ``torch.func.vmap(functional_call)``, or in a loop over nodes where that is
faster (convolutions on CPU, see :func:`resolve_engine`). BatchNorm models run in batch-statistics
mode (every node normalises by its own statistics on the same batch); their running statistics
are recomputed per served t when the artifact is built.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import vmap

from modeconn.fitting import FitContext, MethodConfig
from modeconn.io import load_tensors, save_tensors
from modeconn.metrics import jsd_from_log_probs
from modeconn.objective import Objective, model_parameters
from modeconn.paths import PolyChain, stack_nodes, uniform_knots
from modeconn.progress import progress_bar
from modeconn.types import StackedStateDict, StateDict

__all__ = [
    "GeodesicConfig",
    "fit_geodesic",
    "initial_nodes",
    "node_log_probs",
    "chain_energy",
    "chain_length",
    "chain_log_probs",
    "resolve_engine",
    "DEFAULT_STEPS",
]

log = logging.getLogger("modeconn")

#: Default step budget. The paper ran ~3,900 steps (20 epochs of CIFAR-10 at batch 256). 1,500
#: steps over 25 digits MLPs take ~1.5 min at width 256 (~60 ms a step on 2 idle CPU cores) and
#: well under a minute at width 16.
DEFAULT_STEPS = 1500

Engine = Literal["auto", "vmap", "loop"]

_CHECKPOINT_FORMAT = "modeconn.geodesic-state/1"
_HISTORY_POINTS = 100  # energy history kept in the stats (window means)


class GeodesicConfig(MethodConfig):
    """Options of the geodesic method (Tan et al. 2023); defaults are the paper's."""

    nodes: int = Field(
        25, ge=2, description="models on the chain, endpoints included (the paper's N = 25)"
    )
    steps: int = Field(
        DEFAULT_STEPS,
        ge=0,
        description="optimiser steps (geodesic: ~3,900 in the paper; budget by steps on small data)",
    )
    lr: float = Field(0.1, gt=0, description="learning rate (geodesic: the paper's 0.1, SGD)")
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd (the paper's, plain by default) or adam"
    )
    momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="SGD momentum, or Adam's beta1 (geodesic default: 0 for sgd, 0.9 for adam)",
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over the steps: constant (the paper's) or cosine to 0",
    )
    batch_size: int = Field(256, ge=1, description="mini-batch size")
    init_noise: float = Field(
        1e-3,
        ge=0,
        description="seeded perturbation of the interior nodes at start, relative to |B - A| per tensor",
    )
    engine: Engine = Field(
        "auto",
        description="how the nodes are run: vmap (stacked), loop, or auto (vmap unless the "
        "model has convolutions and runs on CPU)",
    )
    checkpoint_every: int = Field(
        100, ge=1, description="steps between saves of the fitting state (for --resume)"
    )
    length_inputs: int = Field(
        1024,
        ge=1,
        description="training inputs (a fixed, evenly strided subset) for the lengths in the stats",
    )


# ---------------------------------------------------------------------------------------------
# The energy


def chain_energy(log_probs: Tensor) -> Tensor:
    """The discrete geodesic energy ``sum_i mean_x JSD(p_i(x) || p_{i+1}(x))`` (Tan et al. Eq. 2).

    ``log_probs``: ``(N, B, C)`` log-probabilities of N consecutive models on B inputs.
    Returns a scalar (nats), differentiable.
    """
    if log_probs.dim() != 3 or log_probs.shape[0] < 2:
        raise ValueError(f"log_probs must have shape (N >= 2, B, C), got {tuple(log_probs.shape)}")
    jsd = jsd_from_log_probs(log_probs[:-1], log_probs[1:])  # (N-1, B)
    return jsd.mean(dim=1).sum()


def chain_length(log_probs: Tensor) -> float:
    """The discretised length ``sum_i sqrt(mean_x JSD(p_i || p_{i+1}))`` (the paper's Figure 2).

    Up to the constant ``sqrt(8)`` of the paper's Eq. 1 this is the Fisher-Rao length of the chain.
    """
    jsd = jsd_from_log_probs(log_probs[:-1], log_probs[1:])  # (N-1, B)
    return float(jsd.mean(dim=1).clamp_min(0).sqrt().sum())


def resolve_engine(engine: str, model: nn.Module, device: torch.device) -> str:
    """``vmap`` or ``loop``. ``auto`` picks vmap except for convolutional models on CPU.

    Measured on this project's 2-core CPU, one step over 25 nodes at batch 256 (see
    ``benchmarks/bench_geodesic.py``): vmap is 2-6x faster than a loop for narrow MLPs and on par
    for wide ones; for a small BN CNN it ranged from on par to ~1.5x slower (vmap turns the
    convolutions into grouped ones). On GPU vmap is the default everywhere (not measured here).
    """
    if engine not in ("auto", "vmap", "loop"):
        raise ValueError(f"unknown engine {engine!r}; expected 'auto', 'vmap' or 'loop'")
    if engine != "auto":
        return engine
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv and device.type == "cpu" else "vmap"


def node_log_probs(
    objective: Objective, nodes: StackedStateDict, inputs: Tensor, *, engine: str = "vmap"
) -> Tensor:
    """Log-probabilities ``(K, B, C)`` of K stacked models on the same inputs ``(B, ...)``.

    ``engine="vmap"`` runs all K models in one batched call; ``"loop"`` one after another.
    Differentiable in ``nodes``. Run it inside ``objective.session()`` (BatchNorm then uses
    each model's own batch statistics).
    """

    def run_one(params: StateDict, x: Tensor) -> Tensor:
        return objective.forward(params, x)  # (B, C)

    if engine == "vmap":
        logits = vmap(run_one, in_dims=(0, None))(nodes, inputs)  # (K, B, C)
    elif engine == "loop":
        keys = list(nodes)
        # unbind (not indexing) so that backward stacks the K gradients once: O(K) not O(K^2).
        per_key = [nodes[k].unbind(0) for k in keys]
        logits = torch.stack(
            [run_one(dict(zip(keys, values)), inputs) for values in zip(*per_key)]
        )  # (K, B, C)
    else:
        raise ValueError(f"unknown engine {engine!r}; expected 'vmap' or 'loop'")
    return F.log_softmax(logits, dim=-1)  # (K, B, C)


def chain_log_probs(
    objective: Objective,
    start: StateDict,
    interior: StackedStateDict,
    end: StateDict,
    inputs: Tensor,
    engine: str,
) -> Tensor:
    """Log-probabilities ``(N, B, C)`` of the whole chain: fixed endpoints around the interior.

    The endpoints run without gradient; the ``N-2`` stacked interior nodes with ``engine``.
    ``chain_energy(chain_log_probs(...))`` is the objective of one geodesic step.
    """
    with torch.no_grad():
        lp_a = F.log_softmax(objective.forward(start, inputs), dim=-1)  # (B, C)
        lp_b = F.log_softmax(objective.forward(end, inputs), dim=-1)  # (B, C)
    lp_mid = node_log_probs(objective, interior, inputs, engine=engine)  # (N-2, B, C)
    return torch.cat([lp_a[None], lp_mid, lp_b[None]])  # (N, B, C)


def initial_nodes(
    start: StateDict,
    end: StateDict,
    num_nodes: int,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> StackedStateDict:
    """The ``num_nodes - 2`` interior nodes, evenly on the line from ``start`` to ``end``.

    Node i sits at ``t_i = i / (N-1)``. With ``noise > 0`` each tensor gets a seeded Gaussian
    perturbation of standard deviation ``noise * rms(end - start)`` (per tensor), drawn on CPU
    from ``generator`` so that a seed gives the same start on every device.
    """
    ts = uniform_knots(num_nodes)[1:-1]  # (N-2,)
    interior: StackedStateDict = {}
    for key, a in start.items():
        b = end[key]
        t = ts.to(device=a.device, dtype=a.dtype).reshape(-1, *([1] * a.dim()))  # (N-2, 1, ...)
        nodes = (1 - t) * a + t * b  # (N-2, *shape)
        if noise > 0:
            scale = noise * float((b - a).double().pow(2).mean().sqrt())
            eps = torch.randn(nodes.shape, generator=generator, dtype=a.dtype)  # (N-2, *shape)
            nodes = nodes + scale * eps.to(a.device)
        interior[key] = nodes.contiguous()
    return interior


# ---------------------------------------------------------------------------------------------
# Fitting


class _InputSampler:
    """Shuffled epochs of training *inputs* only, with a state that can be saved exactly."""

    def __init__(self, x: Tensor, batch_size: int, generator: torch.Generator, augment):
        self.x = x  # (n, ...), on the objective's device
        self.n = len(x)
        self.batch_size = min(batch_size, self.n)
        self.generator = generator
        self.augment = augment
        self.order = torch.randperm(self.n, generator=generator)  # (n,)
        self.cursor = 0

    def next(self) -> Tensor:
        if self.cursor + self.batch_size > self.n:  # drop the short last batch of an epoch
            self.order = torch.randperm(self.n, generator=self.generator)
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]  # (B,)
        self.cursor += self.batch_size
        xb = self.x[idx.to(self.x.device)]  # (B, ...)
        if self.augment is not None:
            xb = self.augment(xb, self.generator)
        return xb


def _length_inputs(x: Tensor, count: int) -> Tensor:
    """A fixed, evenly strided subset of ``count`` training inputs (no augmentation)."""
    n = len(x)
    count = min(count, n)
    idx = torch.arange(count) * n // count  # (count,)
    return x[idx.to(x.device)]


@torch.no_grad()
def _measure(
    objective: Objective,
    start: StateDict,
    interior: StackedStateDict,
    end: StateDict,
    inputs: Tensor,
    batch_size: int,
    engine: str,
) -> dict[str, float]:
    """Length, energy and weight length of the chain on fixed inputs, in fitting mode."""
    chunks = [
        chain_log_probs(objective, start, interior, end, inputs[i : i + batch_size], engine)
        for i in range(0, len(inputs), batch_size)
    ]
    log_probs = torch.cat(chunks, dim=1)  # (N, M, C)
    weight = 0.0
    for k in range(log_probs.shape[0] - 1):
        a = start if k == 0 else {key: v[k - 1] for key, v in interior.items()}
        b = end if k == log_probs.shape[0] - 2 else {key: v[k] for key, v in interior.items()}
        weight += math.sqrt(sum(float((b[key] - a[key]).double().pow(2).sum()) for key in a))
    return {
        "length": chain_length(log_probs),
        "energy": float(chain_energy(log_probs)),
        "weight_length": weight,
    }


def _history(energies: Tensor, points: int = _HISTORY_POINTS) -> dict[str, list]:
    """Window means of the per-step energies: at most ``points`` (last step, mean) pairs."""
    total = len(energies)
    if total == 0:
        return {"step": [], "energy": []}
    bins = min(points, total)
    edges = [round(i * total / bins) for i in range(bins + 1)]
    return {
        "step": [edges[i + 1] for i in range(bins)],
        "energy": [float(energies[edges[i] : edges[i + 1]].mean()) for i in range(bins)],
    }


def _resume_key(config: GeodesicConfig, engine: str, keys: list[str]) -> dict:
    """What a checkpoint must agree on to be resumed (the step budget may grow)."""
    return {
        "nodes": config.nodes,
        "lr": config.lr,
        "optimizer": config.optimizer,
        "momentum": config.momentum,
        "schedule": config.schedule,
        "init_noise": config.init_noise,
        "seed": config.seed,
        "length_inputs": config.length_inputs,
        "engine": engine,
        "keys": keys,
    }


class _Optimizer:
    """SGD (with optional momentum, PyTorch's convention) or Adam, with a savable state.

    Written out rather than ``torch.optim`` so that its few buffers go into the fitting state
    by name and a resumed run continues bit for bit.
    """

    BETA2, EPS = 0.999, 1e-8

    def __init__(self, config: GeodesicConfig, params: StateDict):
        self.kind = config.optimizer
        self.lr = config.lr
        self.schedule = config.schedule
        self.steps = config.steps
        default = 0.9 if self.kind == "adam" else 0.0
        self.beta = default if config.momentum is None else config.momentum
        names = ["m", "v"] if self.kind == "adam" else (["m"] if self.beta > 0 else [])
        self.buffers = {
            f"{name}/{k}": torch.zeros_like(p) for name in names for k, p in params.items()
        }

    def lr_at(self, step: int) -> float:
        if self.schedule == "cosine" and self.steps > 0:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr

    @torch.no_grad()
    def step(self, step: int, params: StateDict, grads: StateDict) -> None:
        """Update ``params`` in place; ``step`` counts from 0."""
        lr = self.lr_at(step)
        for key, param in params.items():
            grad = grads[key]
            if self.kind == "adam":
                m, v = self.buffers[f"m/{key}"], self.buffers[f"v/{key}"]
                m.mul_(self.beta).add_(grad, alpha=1 - self.beta)
                v.mul_(self.BETA2).addcmul_(grad, grad, value=1 - self.BETA2)
                m_hat = m / (1 - self.beta ** (step + 1))  # bias corrections
                v_hat = v / (1 - self.BETA2 ** (step + 1))
                param.addcdiv_(m_hat, v_hat.sqrt_().add_(self.EPS), value=-lr)
            else:
                if self.beta > 0:  # buf = beta * buf + grad (buf = grad at the first step)
                    grad = self.buffers[f"m/{key}"].mul_(self.beta).add_(grad)
                param.add_(grad, alpha=-lr)


def _save_state(ctx: FitContext, interior, optimizer, sampler, energies, step, meta) -> None:
    tensors = {f"node/{k}": v.detach() for k, v in interior.items()}
    tensors.update({f"optimizer/{k}": v for k, v in optimizer.buffers.items()})
    tensors["sampler/order"] = sampler.order
    tensors["sampler/generator"] = sampler.generator.get_state()
    tensors["energies"] = energies[:step].cpu()
    save_tensors(
        ctx.checkpoint,
        tensors,
        {**meta, "format": _CHECKPOINT_FORMAT, "step": step, "cursor": sampler.cursor},
    )


def fit_geodesic(
    objective: Objective,
    start: StateDict,
    end: StateDict,
    config: GeodesicConfig,
    ctx: FitContext,
) -> PolyChain:
    """Fit the geodesic chain of Tan et al. 2023 between ``start`` and ``end``.

    Minimises :func:`chain_energy` over the ``config.nodes - 2`` interior models with plain SGD
    on mini-batches of training inputs (labels are never read), the endpoints fixed. Returns the
    :class:`PolyChain` through the N nodes at uniform knots. Records in ``ctx.stats`` the lengths
    ``sum sqrt(JSD)`` before and after on a fixed subset of training inputs, the energy history,
    the engine and the number of per-node gradient evaluations. Saves its state to
    ``ctx.checkpoint`` every ``config.checkpoint_every`` steps and at the end; with
    ``ctx.resume`` it continues from there and ends identical to an uninterrupted run.
    """
    if objective.model is None or objective.is_vector or objective.data is None:
        raise TypeError(
            "the geodesic method needs a model with a predictive distribution (softmax outputs) "
            "and data; an energy function of a vector has none: use 'linear', 'bezier' or 'autoneb'"
        )
    if not isinstance(config, GeodesicConfig):
        raise TypeError(f"fit_geodesic needs a GeodesicConfig, got {type(config).__name__}")
    device = objective.device
    engine = resolve_engine(config.engine, objective.model, device)
    batch_size = objective.batch_size or config.batch_size
    # The model's parameter order (not the caller's key order) fixes the seeded initial noise.
    start = {k: v.detach().to(device) for k, v in model_parameters(objective.model, start).items()}
    end = {k: v.detach().to(device) for k, v in model_parameters(objective.model, end).items()}
    keys = list(start)
    if config.nodes == 2:
        ctx.stats.update({"nodes": 2, "steps": 0, "engine": engine})
        return PolyChain(stack_nodes([start, end]))

    x_train = objective.data.x_train.to(device)  # inputs only: the labels are never touched
    generator = torch.Generator().manual_seed(config.seed)
    interior = initial_nodes(start, end, config.nodes, noise=config.init_noise, generator=generator)
    sampler = _InputSampler(x_train, batch_size, generator, objective.data.augment)
    probe = _length_inputs(x_train, config.length_inputs)
    energies = torch.zeros(config.steps, dtype=torch.float64)  # per-step mini-batch energy
    resume_key = _resume_key(config, engine, keys)
    step = 0
    before = None
    optimizer = _Optimizer(config, interior)
    if ctx.resume and ctx.checkpoint is not None and ctx.checkpoint.exists():
        tensors, meta = load_tensors(ctx.checkpoint, what="geodesic fitting state")
        if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("resume_key") != resume_key:
            raise ValueError(
                f"{ctx.checkpoint} was written by a different geodesic fit "
                f"({meta.get('resume_key')}); expected {resume_key}: delete it or drop --resume"
            )
        step = int(meta["step"])
        if step > config.steps:
            raise ValueError(
                f"{ctx.checkpoint} is at step {step}, beyond steps={config.steps}: "
                f"ask for at least {step} steps"
            )
        interior = {k: tensors[f"node/{k}"].to(device) for k in keys}
        optimizer.buffers = {k: tensors[f"optimizer/{k}"].to(device) for k in optimizer.buffers}
        generator.set_state(tensors["sampler/generator"])
        sampler.order = tensors["sampler/order"]
        sampler.cursor = int(meta["cursor"])
        energies[:step] = tensors["energies"]
        before = meta["before"]
        log.info("geodesic: resumed from %s at step %d", ctx.checkpoint, step)
    if before is None:
        before = _measure(objective, start, interior, end, probe, batch_size, engine)

    params = [interior[k].requires_grad_() for k in keys]
    meta = {"resume_key": resume_key, "before": before}
    began = time.perf_counter()
    first = step
    with progress_bar(config.steps, "geodesic", enabled=ctx.progress) as bar:
        bar.advance(step)
        while step < config.steps:
            inputs = sampler.next()  # (B, ...)
            log_probs = chain_log_probs(objective, start, interior, end, inputs, engine)
            energy = chain_energy(log_probs)  # scalar
            grads = torch.autograd.grad(energy, params)
            optimizer.step(step, interior, dict(zip(keys, grads)))
            energies[step] = energy.detach()
            bar.advance(1, energy=float(energies[step]))
            step += 1
            if ctx.checkpoint is not None and (
                step % config.checkpoint_every == 0 or step == config.steps
            ):
                _save_state(ctx, interior, optimizer, sampler, energies, step, meta)
    seconds = time.perf_counter() - began
    interior = {k: v.detach() for k, v in interior.items()}
    after = _measure(objective, start, interior, end, probe, batch_size, engine)
    ctx.stats.update(
        {
            "nodes": config.nodes,
            "steps": step,
            "engine": engine,
            "batch_size": batch_size,
            # one forward+backward pass of one model on one mini-batch per interior node and step
            "gradient_evaluations": step * (config.nodes - 2),
            "seconds_per_step": round(seconds / max(step - first, 1), 5),
            "length_inputs": len(probe),
            "length_before": before["length"],
            "length_after": after["length"],
            "energy_before": before["energy"],
            "energy_after": after["energy"],
            "weight_length_before": before["weight_length"],
            "weight_length_after": after["weight_length"],
            "energy_history": _history(energies[:step]),
        }
    )
    log.info(
        "geodesic: %d steps, length sum sqrt(JSD) %.4f -> %.4f, energy %.4g -> %.4g",
        step,
        before["length"],
        after["length"],
        before["energy"],
        after["energy"],
    )
    nodes = {k: torch.cat([start[k][None], interior[k], end[k][None]]) for k in keys}
    return PolyChain(nodes)  # (N, *shape) per key, uniform knots
