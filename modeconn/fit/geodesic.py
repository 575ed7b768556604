"""Geodesic paths: shortest paths in the space of predictive distributions.

Tan et al. 2023, "Geodesic Mode Connectivity" (ICLR Tiny Papers). N models are initialised
evenly on the straight line between A and (aligned) B; the endpoints stay fixed and the interior
models minimise the discrete *energy*

    E({theta_i}) = sum_{i=1}^{N-1} JSD(p_i || p_{i+1})          (the paper's Eq. 2)

where ``p_i`` is model i's predictive distribution over the classes, averaged over training
*inputs* (the empirical p(x)); labels are never read. Minimising the energy rather than the length
``sum sqrt(JSD)`` gives the constant-speed geodesic; the length is what we report (the paper's
Figure 2, left). JSD is computed in log space from ``log_softmax``, so saturated outputs stay
finite. Plain SGD, lr 0.1, batch 256 (the paper's settings); the budget is the paper's 20 epochs
(~3,900 steps) with ``budget="paper"``; the standard budget has a floor of steps, because on a
small data set 20 epochs are only a hundred-odd steps.

Plain SGD is slow when the straight path is already nearly flat: the energy is then tiny, and it
is stiff (its curvature grows like (N-1)^2 along the chain), so a stable learning rate moves the
chain little. Measured on aligned digits MLPs: width 16, 1,500 steps bring the straight path's
peak train loss 0.317 down to 0.122; width 256 (straight peak 0.048, endpoints 0.015) only to
0.040, and to 0.029 with momentum 0.9 after 3,000 steps. ``optimizer="adam"`` with
``schedule="cosine"`` (lr 1e-3) minimises the same energy far faster: 0.018 after 2,000 steps.

The N-2 interior models are evaluated together: their parameters are stacked along a leading
axis and run with ``torch.func.vmap(functional_call)``, or in a loop over nodes where that is
faster (convolutions on CPU, see :func:`modeconn.fit.state.resolve_engine`). BatchNorm models run in batch-statistics
mode (every node normalises by its own statistics on the same batch); their running statistics
are recomputed per served t when the artifact is built.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from modeconn.fit.configs import GeodesicConfig
from modeconn.fit.objective import Objective, model_parameters
from modeconn.fit.state import (
    BatchStream,
    FitContext,
    FitState,
    FlatLayout,
    fingerprint,
    load_optimizer_tensors,
    optimizer_tensors,
    resolve_engine,
    straight_interior,
)
from modeconn.metrics import jsd_from_log_probs
from modeconn.paths import PolyChain, stack_nodes, uniform_knots
from modeconn.progress import progress_bar
from modeconn.types import StackedStateDict, StateDict

__all__ = [
    "fit_geodesic",
    "initial_nodes",
    "node_log_probs",
    "chain_energy",
    "chain_length",
    "chain_log_probs",
]

log = logging.getLogger("modeconn")

_HISTORY_POINTS = 100  # energy history kept in the stats (window means)
#: Steps between saves of the fit state when the context does not say.
CHECKPOINT_EVERY = 100


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
    layout = FlatLayout(start)
    a, b = layout.flatten(start), layout.flatten(end)  # (D,)
    generator = generator if generator is not None else torch.Generator()
    knots = uniform_knots(num_nodes)[1:-1]  # (N-2,)
    return layout.unflatten_stacked(straight_interior(layout, a, b, knots, noise, generator))


# ---------------------------------------------------------------------------------------------
# Fitting


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


def _optimizer(config: GeodesicConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    """Plain SGD (the paper's), SGD with momentum, or Adam; ``momentum`` is Adam's beta1."""
    if config.optimizer == "adam":
        beta = 0.9 if config.momentum is None else config.momentum
        return torch.optim.Adam(params, lr=config.lr, betas=(beta, 0.999))
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum or 0.0)


def _lr_at(config: GeodesicConfig, step: int, total: int) -> float:
    if config.schedule == "cosine" and total > 0:
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return config.lr


def fit_geodesic(
    objective: Objective,
    start: StateDict,
    end: StateDict,
    config: GeodesicConfig,
    ctx: FitContext,
) -> PolyChain:
    """Fit the geodesic chain of Tan et al. 2023 between ``start`` and ``end``.

    Minimises :func:`chain_energy` over the ``config.nodes - 2`` interior models on
    mini-batches of training inputs (labels are never read), the endpoints fixed. Returns the
    :class:`PolyChain` through the N nodes at uniform knots. Records in ``ctx.stats`` the lengths
    ``sum sqrt(JSD)`` before and after on a fixed subset of training inputs, the energy history,
    the engine and the number of per-node gradient evaluations. Saves its state every
    ``ctx.checkpoint_every`` steps (default 100) and at the end; with ``ctx.resume`` it
    continues from there and ends identical to an uninterrupted run (a larger ``steps`` budget
    continues a finished run).
    """
    if objective.model is None or objective.is_vector or objective.data is None:
        raise TypeError(
            "the geodesic method needs a model with a predictive distribution (softmax outputs) "
            "and data; an energy function of a vector has none: use 'linear', 'bezier' or 'autoneb'"
        )
    if not isinstance(config, GeodesicConfig):
        raise TypeError(f"fit_geodesic needs a GeodesicConfig, got {type(config).__name__}")
    device = objective.device
    engine = resolve_engine(config.engine, objective)
    batch_size = objective.batch_size or config.batch_size
    # The model's parameter order (not the caller's key order) fixes the seeded initial noise.
    start = {k: v.detach().to(device) for k, v in model_parameters(objective.model, start).items()}
    end = {k: v.detach().to(device) for k, v in model_parameters(objective.model, end).items()}
    keys = list(start)
    if config.nodes == 2:
        ctx.stats.update({"nodes": 2, "steps": 0, "engine": engine})
        return PolyChain(stack_nodes([start, end]))

    layout = FlatLayout(start)
    generator = torch.Generator().manual_seed(config.seed)
    interior = initial_nodes(start, end, config.nodes, noise=config.init_noise, generator=generator)
    stream = BatchStream(objective, torch.Generator().manual_seed(config.seed + 1))
    probe = _length_inputs(objective.data.x_train.to(device), config.length_inputs)
    total = config.total_steps(objective.steps_per_epoch)
    energies = torch.zeros(total, dtype=torch.float64)  # per-step mini-batch energy
    ends = (layout.flatten(start), layout.flatten(end))
    state = FitState(
        ctx,
        "geodesic",
        {
            **fingerprint(config, layout, *ends, exclude={"steps", "epochs", "budget"}),
            "engine": engine,
        },
        every=CHECKPOINT_EVERY,
    )
    params = [interior[k].requires_grad_() for k in keys]
    optimizer = _optimizer(config, params)
    step = 0
    before = None
    if (saved := state.resume()) is not None:
        step = int(saved.progress["step"])
        if step > total:
            raise ValueError(
                f"{ctx.checkpoint} is at step {step}, beyond this budget's {total} steps: "
                f"ask for at least {step} steps"
            )
        with torch.no_grad():
            for k in keys:
                interior[k].copy_(saved.tensors[f"node/{k}"])
        load_optimizer_tensors(optimizer, {k: v.to(device) for k, v in saved.tensors.items()})
        stream.restore(saved.tensors, saved.progress)
        energies[:step] = saved.tensors["energies"]
        before = saved.stats["before"]
    if before is None:
        before = _measure(objective, start, interior, end, probe, batch_size, engine)

    def save() -> None:
        tensors, progress = stream.state()
        tensors.update({f"node/{k}": v.detach() for k, v in interior.items()})
        tensors.update(optimizer_tensors(optimizer))
        tensors["energies"] = energies[:step]
        state.save({"step": step, **progress}, tensors, {"before": before})

    began = time.perf_counter()
    first = step
    with progress_bar(total, "geodesic", enabled=ctx.progress) as bar:
        bar.skip(step)
        while step < total:
            batch = stream.next()
            assert batch is not None
            inputs = batch[0]  # (B, ...): the labels are never read
            log_probs = chain_log_probs(objective, start, interior, end, inputs, engine)
            energy = chain_energy(log_probs)  # scalar
            optimizer.param_groups[0]["lr"] = _lr_at(config, step, total)
            optimizer.zero_grad(set_to_none=True)
            energy.backward()
            optimizer.step()
            energies[step] = energy.detach()
            bar.advance(1, energy=float(energies[step]))
            step += 1
            if state.due(step) or step == total:
                save()
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
