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

Sharded across ranks (``torchrun``, see :mod:`modeconn.fit.sharding`): each rank owns a
contiguous block of the interior nodes (parameters and optimiser state) and every rank draws
the same batches. Node i enters the energy only through ``JSD(p_{i-1} || p_i)`` and
``JSD(p_i || p_{i+1})``, so the gradient at a rank's nodes needs, besides its own models' outputs,
only the *predictions* of the two nodes next to its block on the step's batch: ``(B, C)``
log-probabilities from each neighbour (an endpoint's are computed locally), received as
constants. Each rank differentiates the sum of the JSD terms that touch its nodes -- the same
terms, with the same values, as the single-process energy has for them -- and the energy itself
(for the record) is the sum of every pair's term, gathered as ``N-1`` scalars. So a step moves
one ``(B, C)`` block per rank boundary each way, plus ``N-1`` scalars, however large the models;
the chain comes out bitwise the single-process one (per node, the same ops on the same batch).
The before/after lengths gather every node's predictions on the probe inputs (``(N, M, C)``),
the weight-space length one neighbour's parameters and one scalar per pair.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from modeconn import distributed
from modeconn.fit.configs import GeodesicConfig
from modeconn.fit.objective import Objective, model_parameters
from modeconn.fit.sharding import Shard, agree, assemble, fetch_rows, gather_rows, halo_wants
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
    shard: Shard | None = None,
) -> dict[str, float]:
    """Length, energy and weight length of the chain on fixed inputs, in fitting mode.

    ``interior``: this rank's block of nodes under ``shard`` (all of them without one). Every
    rank gets the whole chain's figures.
    """
    shard = Shard(len(next(iter(interior.values()))) + 2) if shard is None else shard
    chunks = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i : i + batch_size]  # (b, ...)
        own = node_log_probs(objective, interior, x, engine=engine) if shard.count else None
        chunks.append(_with_ends(objective, start, own, end, x))  # (n + 2, b, C)
    band = torch.cat(chunks, dim=1)  # (n + 2, M, C): this rank's nodes and the endpoints
    inner = assemble(shard, band[1:-1], shard.lo - 1, shard.interior)  # (N-2, M, C)
    log_probs = torch.cat([band[:1], inner, band[-1:]])  # (N, M, C)
    weight = 0.0
    for square in _pair_squares(start, interior, end, shard).tolist():  # (N-1,), in order
        weight += math.sqrt(square)
    return {
        "length": chain_length(log_probs),
        "energy": float(chain_energy(log_probs)),
        "weight_length": weight,
    }


def _with_ends(
    objective: Objective, start: StateDict, own: Tensor | None, end: StateDict, x: Tensor
) -> Tensor:
    """``own`` log-probabilities ``(n, b, C)`` between the endpoints' on ``x``: ``(n + 2, b, C)``."""
    lp_a = F.log_softmax(objective.forward(start, x), dim=-1)  # (b, C)
    lp_b = F.log_softmax(objective.forward(end, x), dim=-1)  # (b, C)
    middle = [own] if own is not None else []
    return torch.cat([lp_a[None], *middle, lp_b[None]])


def _pair_squares(
    start: StateDict, interior: StackedStateDict, end: StateDict, shard: Shard
) -> Tensor:
    """``|w_{k+1} - w_k|^2`` for every pair of neighbours ``(N-1,)`` float64, each rank
    measuring the pairs to the left of its nodes (the last owner also the one into B), with
    the left neighbour's parameters fetched."""
    keys = list(start)
    wants = [[r for r in (shard.on(q).lo - 1,) if r > 0 and shard.on(q).count] for q in
             range(shard.world)]  # fmt: skip
    fetched = fetch_rows(shard, [interior[k] for k in keys], wants) if shard.sharded else []
    left = dict(zip(keys, (rows[0] for rows in fetched))) if wants[shard.rank] else start

    def node(row: int) -> StateDict:
        if row == shard.size - 1:
            return end
        if row == shard.lo - 1:
            return left
        return {key: v[row - shard.lo] for key, v in interior.items()}

    count = shard.count + int(shard.edge_segment())
    squares = [
        sum(float((node(k + 1)[key] - node(k)[key]).double().pow(2).sum()) for key in keys)
        for k in range(shard.lo - 1, shard.lo - 1 + count)
    ]
    own = torch.tensor(squares, dtype=torch.float64, device=start[keys[0]].device)
    return assemble(shard, own, shard.lo - 1, shard.size - 1)


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
    continues a finished run). Under a process group every rank fits its block of the nodes
    (see the module docstring) and returns the whole path.
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
    shard = Shard.of(config.nodes)
    interior = _initial_block(layout, start, end, config, shard)  # this rank's nodes
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
    agree(
        "the fit (options, endpoints, checkpoint and resume)",
        [state.fingerprint, state.enabled, ctx.resume, state.every],
    )
    params = [interior[k].requires_grad_() for k in keys]
    optimizer = _optimizer(config, params)
    step = 0
    before = None
    saved = state.resume()
    agree("the saved fit state they resume from", saved.progress if saved else None)
    if saved is not None:
        step = int(saved.progress["step"])
        if step > total:
            raise ValueError(
                f"{ctx.checkpoint} is at step {step}, beyond this budget's {total} steps: "
                f"ask for at least {step} steps"
            )
        _restore(saved.tensors, interior, optimizer, shard)
        stream.restore(saved.tensors, saved.progress)
        energies[:step] = saved.tensors["energies"]
        before = saved.stats["before"]
    if before is None:
        before = _measure(objective, start, interior, end, probe, batch_size, engine, shard)

    def save() -> None:
        tensors, progress = stream.state()
        tensors.update(_whole_state(interior, optimizer, shard))
        tensors["energies"] = energies[:step]
        if distributed.is_main():
            state.save({"step": step, **progress}, tensors, {"before": before})

    began = time.perf_counter()
    first = step
    shown = ctx.progress and distributed.is_main()
    with progress_bar(total, "geodesic", enabled=shown) as bar:
        bar.skip(step)
        while step < total:
            batch = stream.next()
            assert batch is not None
            inputs = batch[0]  # (B, ...): the labels are never read
            optimizer.param_groups[0]["lr"] = _lr_at(config, step, total)
            energy = _step(objective, start, interior, end, inputs, engine, optimizer, shard)
            energies[step] = energy
            bar.advance(1, energy=float(energies[step]))
            step += 1
            if state.due(step) or (step == total and state.enabled):
                save()
    seconds = time.perf_counter() - began
    interior = {k: v.detach() for k, v in interior.items()}
    after = _measure(objective, start, interior, end, probe, batch_size, engine, shard)
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
    return _path(start, interior, end, shard)  # (N, *shape) per key, uniform knots


def _initial_block(
    layout: FlatLayout, start: StateDict, end: StateDict, config: GeodesicConfig, shard: Shard
) -> StackedStateDict:
    """This rank's interior nodes where :func:`initial_nodes` puts them: on the line, plus the
    seeded noise drawn on the CPU for the whole chain (as one process draws it) and cut to the
    rank's rows, so every rank starts its block as one process would."""
    a, b = layout.flatten(start), layout.flatten(end)  # (D,)
    knots = uniform_knots(config.nodes)[1:-1]  # (N-2,)
    generator = torch.Generator().manual_seed(config.seed)
    rows = slice(shard.lo - 1, shard.hi - 1)
    block = straight_interior(layout, a, b, knots, config.init_noise, generator, rows)  # (n, D)
    return layout.unflatten_stacked(block)


def _step(
    objective: Objective,
    start: StateDict,
    interior: StackedStateDict,
    end: StateDict,
    inputs: Tensor,
    engine: str,
    optimizer: torch.optim.Optimizer,
    shard: Shard,
) -> Tensor:
    """One optimiser step on this rank's nodes; returns the whole chain's energy on ``inputs``.

    The gradient of the JSD terms that touch this rank's nodes is the gradient of the whole
    energy there: the other terms do not depend on them.
    """
    optimizer.zero_grad(set_to_none=True)
    if shard.count:
        jsd = _band_jsd(objective, start, interior, end, inputs, engine, shard)  # (n+1,)
        jsd.sum().backward()
    else:  # a rank without nodes: keep its (empty) optimiser state in step with the others
        jsd = torch.zeros(0, device=inputs.device)  # it takes no part in the exchange
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    count = shard.count + int(shard.edge_segment())  # the pairs this rank accounts for
    pairs = assemble(shard, jsd[:count].detach(), shard.lo - 1, shard.size - 1)  # (N-1,)
    return pairs.sum()


def _neighbour_wants(shard: Shard) -> list[list[int]]:
    """The nodes next to each rank's block (those of ranks with no nodes: none)."""
    return [w if shard.on(r).count else [] for r, w in enumerate(halo_wants(shard))]


def _band_jsd(
    objective: Objective,
    start: StateDict,
    interior: StackedStateDict,
    end: StateDict,
    inputs: Tensor,
    engine: str,
    shard: Shard,
) -> Tensor:
    """``mean_x JSD(p_k || p_{k+1})`` for the pairs ``lo-1 .. hi-1`` that touch this rank's
    nodes, ``(n+1,)``, differentiable in them; the neighbours' predictions are constants."""
    own = node_log_probs(objective, interior, inputs, engine=engine)  # (n, B, C)
    got: dict[int, Tensor] = {}
    if shard.sharded:
        wants = _neighbour_wants(shard)
        [rows] = fetch_rows(shard, [own.detach()], wants)  # (<= 2, B, C)
        got = dict(zip(wants[shard.rank], rows))
    with torch.no_grad():
        if shard.lo - 1 == 0:
            got[0] = F.log_softmax(objective.forward(start, inputs), dim=-1)  # (B, C)
        if shard.hi == shard.size - 1:
            got[shard.hi] = F.log_softmax(objective.forward(end, inputs), dim=-1)  # (B, C)
    lp = torch.cat([got[shard.lo - 1][None], own, got[shard.hi][None]])  # (n+2, B, C)
    return jsd_from_log_probs(lp[:-1], lp[1:]).mean(dim=1)  # (n+1,)


def _whole_state(
    interior: StackedStateDict, optimizer: torch.optim.Optimizer, shard: Shard
) -> dict[str, Tensor]:
    """The nodes and optimiser moments of the whole chain, gathered on rank 0 (on its CPU when
    sharded; the other ranks keep only the shared step counts): what a state saves, so that
    any number of ranks resumes it."""
    device = torch.device("cpu") if shard.sharded else None
    out = {}
    for key, value in interior.items():
        out[f"node/{key}"] = gather_rows(shard, value.detach(), dst=0, device=device)
    for key, value in optimizer_tensors(optimizer).items():
        out[key] = gather_rows(shard, value, dst=0, device=device) if value.dim() else value
    return {k: v for k, v in out.items() if v is not None}


def _restore(
    tensors: StateDict, interior: StackedStateDict, optimizer: torch.optim.Optimizer, shard: Shard
) -> None:
    """Load this rank's block of the saved nodes and optimiser moments (whole in the file)."""
    device = next(iter(interior.values())).device
    with torch.no_grad():
        for k in interior:
            interior[k].copy_(shard.take(tensors[f"node/{k}"]))
    mine = {
        k: (shard.take(v) if k.startswith("optim/") and v.dim() else v).to(device)
        for k, v in tensors.items()
    }
    load_optimizer_tensors(optimizer, mine)


def _path(start: StateDict, interior: StackedStateDict, end: StateDict, shard: Shard) -> PolyChain:
    """The whole chain on every rank (sharded: gathered on the CPU)."""
    device = torch.device("cpu") if shard.sharded else None
    nodes = {}
    for k, v in interior.items():
        whole = gather_rows(shard, v, device=device)  # (N-2, *shape)
        assert whole is not None
        ends = start[k][None].to(whole.device), end[k][None].to(whole.device)
        nodes[k] = torch.cat([ends[0], whole, ends[1]])
    return PolyChain(nodes)
