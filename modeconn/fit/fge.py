"""Fast Geometric Ensembling (Garipov et al. 2018, arXiv 1802.10026, section 5).

From one trained network, SGD continues with a triangular cyclical learning rate: within each
cycle (``cycle_epochs`` epochs, or the budget's length) it falls linearly from ``lr1`` to ``lr2`` at mid-cycle and
rises back to ``lr1``; a member is collected at each low point. The members lie close to each
other in weight space but make different mistakes, so their averaged softmax beats the
starting network at the cost of a few epochs. The result is a :class:`~modeconn.paths.PointSet`
(members at knots ``0, 1/(n-1), ..., 1``, no path between them); as an artifact it is of kind
``"points"``, with each member's BatchNorm statistics stored at its knot.

FGE is the method of the table that starts from one network (``endpoints=1``): its fitter
takes ``end=None``.

Under ``torchrun`` it runs data-parallel (:mod:`modeconn.distributed`): every rank draws the
same batches, computes on its block of each, and the gradients are summed over the ranks in one
all-reduce per step, so the members are the same on every rank.
"""

from __future__ import annotations

import math
import time

import torch

from modeconn import distributed
from modeconn.fit.configs import FGEConfig
from modeconn.fit.objective import Objective
from modeconn.fit.state import (
    BatchStream,
    FitContext,
    FitState,
    FlatLayout,
    fingerprint,
    load_optimizer_tensors,
    optimizer_tensors,
    thin,
)
from modeconn.paths import PointSet, stack_nodes, uniform_knots
from modeconn.progress import progress_bar
from modeconn.types import StateDict

__all__ = ["fit_fge", "fge_lr"]


def fge_lr(progress: float, lr1: float, lr2: float) -> float:
    """Triangular cyclical rate at ``progress`` in [0, 1) of a cycle: lr1 -> lr2 at 0.5 -> lr1."""
    if progress < 0.5:
        return lr1 * (1.0 - 2.0 * progress) + lr2 * 2.0 * progress
    return lr1 * (2.0 * progress - 1.0) + lr2 * (2.0 - 2.0 * progress)


def fit_fge(
    objective: Objective, start: StateDict, end: None, config: FGEConfig, ctx: FitContext
) -> PointSet:
    """Fast Geometric Ensembling (Garipov et al. 2018) from the parameters ``start``.

    Returns the ``config.cycles`` members as a :class:`PointSet` (parameters only; recompute or
    store their BN statistics for BatchNorm models). Saves its state after every cycle (or
    every ``ctx.checkpoint_every`` steps); ``ctx.resume`` continues from it and ends identical
    to an uninterrupted run.
    """
    if end is not None:
        raise ValueError("FGE starts from one network: give no second endpoint")
    layout = FlatLayout(start)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    optimizer = torch.optim.SGD(
        list(params.values()),
        lr=config.lr1,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    stream = BatchStream(objective, torch.Generator().manual_seed(config.seed))
    cycle_steps = config.cycle_steps(objective.steps_per_epoch)
    total = config.cycles * cycle_steps
    # A member is taken after this many steps of a cycle, when the rate has come down to lr2
    # (the last step before it ran at t = 0.5 - 1/cycle_steps, as in the reference code).
    collect_at = max(1, cycle_steps // 2)
    state = FitState(
        ctx, "fge", fingerprint(config, layout, layout.flatten(start), None), every=cycle_steps
    )
    members: list[StateDict] = []
    history: list[float] = []
    step = 0
    device = next(iter(params.values())).device
    running = torch.zeros((), dtype=torch.float64, device=device)  # the epoch's loss sum
    if (saved := state.resume()) is not None:
        step = int(saved.progress["step"])
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved.tensors[f"param/{k}"])
        load_optimizer_tensors(optimizer, {k: v.to(device) for k, v in saved.tensors.items()})
        stream.restore(saved.tensors, saved.progress)
        for i in range(int(saved.progress["members"])):
            members.append({k: saved.tensors[f"member{i}/{k}"].to(device) for k in params})
        running = saved.tensors["running"].to(device)
        history = list(saved.stats.get("loss_history", []))
        ctx.stats["resumed_from_cycle"] = step // cycle_steps

    def save() -> None:
        tensors, progress = stream.state()
        tensors.update({f"param/{k}": p.detach() for k, p in params.items()})
        tensors.update(optimizer_tensors(optimizer))
        for i, member in enumerate(members):
            tensors.update({f"member{i}/{k}": v for k, v in member.items()})
        tensors["running"] = running
        progress.update(step=step, members=len(members))
        state.save(progress, tensors, {"loss_history": history})

    started = time.perf_counter()
    per_epoch = objective.steps_per_epoch
    with progress_bar(total, "FGE", enabled=ctx.progress) as bar:
        bar.skip(step - step % per_epoch)
        while step < total:
            in_cycle = step % cycle_steps
            optimizer.param_groups[0]["lr"] = fge_lr(in_cycle / cycle_steps, config.lr1, config.lr2)
            batch = stream.next()
            optimizer.zero_grad(set_to_none=True)
            if batch is not None and distributed.active():
                rows, share = distributed.shard(batch)  # this rank's rows, their share
                loss = objective.loss(params, rows) * share
                loss.backward()
                loss = distributed.all_reduce_gradients(params.values(), loss)  # batch's mean
            else:  # one process, or an energy (no batch): every rank computes the same
                loss = objective.loss(params, batch)
                loss.backward()
            optimizer.step()
            running += loss.detach()  # no device sync per step
            step += 1
            if in_cycle + 1 == collect_at:
                members.append({k: p.detach().clone() for k, p in params.items()})
            if step % per_epoch == 0:
                mean = float(running) / per_epoch
                if not math.isfinite(mean):
                    raise RuntimeError(
                        f"FGE diverged in cycle {step // cycle_steps + 1} (loss {mean}); "
                        f"lower lr1 (now {config.lr1})"
                    )
                history.append(round(mean, 6))
                running.zero_()
                bar.advance(per_epoch, loss=mean)
            elif step == total:
                bar.advance(step % per_epoch)
            if state.due(step) or step == total:
                save()
    ctx.stats.update(
        {
            "members": len(members),
            "cycles": config.cycles,
            "budget": config.budget,
            "cycle_epochs": round(cycle_steps / objective.steps_per_epoch, 3),
            "cycle_steps": cycle_steps,
            "steps": total,
            "gradient_evaluations": total,
            "collect_step_in_cycle": collect_at,
            "loss_history": thin(history),
            "seconds_this_run": round(time.perf_counter() - started, 3),
        }
    )
    nodes = stack_nodes([{k: v.cpu() for k, v in m.items()} for m in members])
    return PointSet(nodes, knots=uniform_knots(len(members)))
