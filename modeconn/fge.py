"""Fast Geometric Ensembling (Garipov et al. 2018, arXiv 1802.10026, section 5).

From one trained network, SGD continues with a triangular cyclical learning rate: within each
cycle of ``cycle_epochs`` epochs it falls linearly from ``lr1`` to ``lr2`` at mid-cycle and
rises back to ``lr1``; a member is collected at each low point. The members lie close to each
other in weight space but make different mistakes, so their averaged softmax beats the
starting network at the cost of a few epochs. The result is a :class:`~modeconn.paths.PointSet`
(members at knots ``0, 1/(n-1), ..., 1``, no path between them) saved as an artifact of kind
``"points"``, with each member's BatchNorm statistics stored at its knot.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path as FsPath

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn

from modeconn.artifact import (
    DataInfo,
    Manifest,
    ModelInfo,
    PathArtifact,
    compute_served_buffers,
)
from modeconn.bn import has_batchnorm, parameter_names
from modeconn.checkpoint import Checkpoint
from modeconn.data import Dataset
from modeconn.evaluate import evaluate_path, predict
from modeconn.fitting import MethodConfig
from modeconn.io import load_tensors, save_tensors
from modeconn.objective import model_objective
from modeconn.paths import PointSet, stack_nodes, uniform_knots
from modeconn.pipeline import endpoint_record, fit_state_file, save_fitted
from modeconn.progress import progress_bar
from modeconn.types import StateDict

__all__ = ["FGEConfig", "fge", "fge_lr", "make_fge_config", "fge_artifact", "ensemble_metrics"]

log = logging.getLogger("modeconn")

_CHECKPOINT_FORMAT = "modeconn.fge-fit/1"


class FGEConfig(MethodConfig):
    """Options of Fast Geometric Ensembling: lr1 0.05 and lr2 1e-4 as in the paper's code.

    The paper's cycles of 2-4 epochs are 800-1,600 steps on CIFAR; a digits epoch is 11 steps,
    and 4-epoch cycles leave the members almost identical (6 members from a width-16 digits
    MLP: ensemble test NLL 0.1598, start 0.1597), so the default cycle is 20 epochs (0.1582;
    width 256: 0.1004 vs 0.1045). On large data sets set ``cycle_epochs`` to 2-4.
    """

    cycles: int = Field(6, ge=2, description="number of cycles = ensemble members")
    cycle_epochs: int = Field(
        20,
        ge=1,
        description="epochs per cycle (the paper: 2 to 4 CIFAR epochs, ~800-1,600 steps; "
        "20 digits epochs are 220 steps)",
    )
    lr1: float = Field(0.05, gt=0, description="learning rate at the start and end of a cycle")
    lr2: float = Field(
        1e-4, gt=0, description="learning rate at mid-cycle, where members are taken"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    batch_size: int = Field(128, ge=1, description="mini-batch size")


def make_fge_config(**params) -> FGEConfig:
    """Validate FGE options, with an error that names the bad one."""
    try:
        return FGEConfig(**params)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(
            f"bad FGE options: {problems} (options: {', '.join(FGEConfig.model_fields)})"
        ) from err


def fge_lr(progress: float, lr1: float, lr2: float) -> float:
    """Triangular cyclical rate at ``progress`` in [0, 1) of a cycle: lr1 -> lr2 at 0.5 -> lr1."""
    if progress < 0.5:
        return lr1 * (1.0 - 2.0 * progress) + lr2 * 2.0 * progress
    return lr1 * (2.0 * progress - 1.0) + lr2 * (2.0 - 2.0 * progress)


def fge(
    model: nn.Module,
    state: StateDict,
    data: Dataset,
    cycles: int = 6,
    cycle_epochs: int = 20,
    lr1: float = 0.05,
    lr2: float = 1e-4,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    stats: dict | None = None,
) -> PointSet:
    """Fast Geometric Ensembling (Garipov et al. 2018) from the trained ``state`` of ``model``.

    Returns the ``cycles`` members as a :class:`PointSet` (parameters only; recompute or store
    their BN statistics for BatchNorm models). ``model`` itself is not modified. With
    ``checkpoint`` the state is saved after every cycle; ``resume`` continues from it and ends
    identical to an uninterrupted run.
    """
    config = make_fge_config(
        cycles=cycles,
        cycle_epochs=cycle_epochs,
        lr1=lr1,
        lr2=lr2,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )
    stats = stats if stats is not None else {}
    objective = model_objective(model, data, batch_size=config.batch_size, device=device)
    names = parameter_names(model)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"state lacks parameters {missing[:5]} of {type(model).__name__}")
    params = {n: state[n].detach().to(objective.device).clone().requires_grad_(True) for n in names}
    optimizer = torch.optim.SGD(
        list(params.values()),
        lr=config.lr1,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = objective.steps_per_epoch
    cycle_steps = config.cycle_epochs * steps_per_epoch
    # A member is taken after this many steps of a cycle, when the rate has come down to lr2
    # (the last step before it ran at t = 0.5 - 1/cycle_steps, as in the reference code).
    collect_at = max(1, cycle_steps // 2)
    members: list[StateDict] = []
    history: list[float] = []
    first_cycle = 0
    fingerprint = {
        "config": config.model_dump(),
        "names": len(names),
        "numel": sum(p.numel() for p in params.values()),
        "steps_per_epoch": steps_per_epoch,
        "start": float(sum(p.detach().double().sum() for p in params.values())),
    }
    ckpt = FsPath(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.exists():
        first_cycle, history = _load_state(ckpt, fingerprint, params, optimizer, generator, members)
        stats["resumed_from_cycle"] = first_cycle
        log.info("resuming FGE at cycle %d of %d", first_cycle, config.cycles)

    started = time.perf_counter()
    with objective.session(), progress_bar(config.cycles, "FGE", enabled=progress) as bar:
        bar.advance(first_cycle)
        for cycle in range(first_cycle, config.cycles):
            step = 0
            for _ in range(config.cycle_epochs):
                running = torch.zeros((), dtype=torch.float64, device=objective.device)
                count = 0
                for batch in objective.epoch(generator):
                    lr = fge_lr(step / cycle_steps, config.lr1, config.lr2)
                    optimizer.param_groups[0]["lr"] = lr
                    loss = objective.loss(params, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    running += loss.detach()  # no device sync per step
                    count += 1
                    step += 1
                    if step == collect_at:
                        members.append({n: p.detach().clone() for n, p in params.items()})
                mean = float(running) / max(count, 1)
                if not math.isfinite(mean):
                    raise RuntimeError(
                        f"FGE diverged in cycle {cycle + 1} (loss {mean}); lower lr1 (now {config.lr1})"
                    )
                history.append(round(mean, 6))
            if ckpt is not None:
                _save_state(
                    ckpt, fingerprint, cycle + 1, history, params, optimizer, generator, members
                )
            bar.advance(1, loss=history[-1])
    stats.update(
        {
            "members": len(members),
            "cycles": config.cycles,
            "cycle_epochs": config.cycle_epochs,
            "steps": config.cycles * cycle_steps,
            "gradient_evaluations": config.cycles * cycle_steps,
            "collect_step_in_cycle": collect_at,
            "loss_history": history[-200:],
            "seconds_this_run": round(time.perf_counter() - started, 3),
        }
    )
    nodes = stack_nodes([{k: v.cpu() for k, v in m.items()} for m in members])
    return PointSet(nodes, knots=uniform_knots(len(members)))


def _save_state(ckpt, fingerprint, cycle, history, params, optimizer, generator, members) -> None:
    tensors = {"generator": generator.get_state()}
    for n, p in params.items():
        tensors[f"param/{n}"] = p.detach()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum/{n}"] = buf
    for i, member in enumerate(members):
        for n, v in member.items():
            tensors[f"member{i}/{n}"] = v
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "cycle": cycle,
        "members": len(members),
        "loss_history": history,
    }
    save_tensors(ckpt, tensors, meta)


def _load_state(ckpt, fingerprint, params, optimizer, generator, members) -> tuple[int, list]:
    tensors, meta = load_tensors(ckpt, what="FGE checkpoint")
    if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{ckpt} holds the state of a different FGE run (options or start differ); "
            "delete it or run without resume"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"].to(p.device))
            if f"momentum/{n}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"momentum/{n}"].to(p.device)
    generator.set_state(tensors["generator"])
    device = next(iter(params.values())).device
    for i in range(int(meta["members"])):
        members.append({n: tensors[f"member{i}/{n}"].to(device) for n in params})
    return int(meta["cycle"]), list(meta.get("loss_history", []))


@torch.no_grad()
def ensemble_metrics(
    model: nn.Module,
    states: list[StateDict],
    data: Dataset,
    *,
    split: str = "test",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Accuracy and NLL of the mean softmax of the networks ``states`` (full state dicts)."""
    x, y = data.split(split)
    log_probs = torch.stack(
        [predict(model, s, x.to(device), device=device) for s in states]
    )  # (M, N, C)
    mean_log_probs = torch.logsumexp(log_probs, 0) - math.log(len(states))  # (N, C)
    return {
        "members": len(states),
        f"{split}_acc": float((mean_log_probs.argmax(-1) == y).float().mean()),
        f"{split}_nll": float(F.nll_loss(mean_log_probs, y)),
        f"{split}_member_nll_mean": float(sum(F.nll_loss(lp, y) for lp in log_probs) / len(states)),
    }


def fge_artifact(
    a: Checkpoint,
    data: Dataset,
    *,
    out: str | os.PathLike | None = None,
    params: dict | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    resume: bool = False,
) -> tuple[PathArtifact, dict]:
    """Run FGE from checkpoint ``a`` and (if ``out``) save the members as a ``points`` artifact.

    The manifest's ``endpoints.a`` is the starting checkpoint; the BN statistics of every member
    are stored at its knot (the served t values); ``metrics`` holds the members' evaluation and
    the ensemble's test accuracy and NLL beside the starting network's.
    """
    config = make_fge_config(**dict(params or {}))
    model = a.build_model()
    checkpoint = fit_state_file(out, resume=resume)
    stats: dict = {}
    start = time.perf_counter()
    path = fge(
        model,
        a.state,
        data,
        **config.model_dump(),
        device=device,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        stats=stats,
    )
    seconds = time.perf_counter() - start
    model.cpu()
    ts = [float(k) for k in path.knots()]
    buffers = compute_served_buffers(model, path, data.x_train, ts, device=device)
    model.cpu()
    evaluation = evaluate_path(model, path, data, device=device, progress=progress)
    model.cpu()
    bn = has_batchnorm(model)
    states = [{**path.at(t), **(buffers[t] if bn else {})} for t in ts]
    start_state = {k: v for k, v in a.state.items()}
    metrics = {
        **evaluation.to_json(),
        "ensemble": ensemble_metrics(model, states, data, device=device),
        "start": ensemble_metrics(model, [start_state], data, device=device),
    }
    model.cpu()
    manifest = Manifest(
        kind="points",
        method="fge",
        basis="points",
        num_nodes=path.num_nodes,
        knots=ts,
        model=ModelInfo(**a.model.to_json()),
        data=DataInfo(**data.describe()),
        endpoints={"a": endpoint_record(a)},
        served_ts=ts,
        metrics=metrics,
        fit={
            "name": FsPath(out).name if out is not None else "fge",
            "method": "fge",
            "config": config.model_dump(),
            "seconds": round(seconds, 3),
            "summary": "Fast Geometric Ensembling (Garipov et al. 2018)",
            "stats": stats,
        },
        seed=config.seed,
    )
    artifact = PathArtifact(manifest=manifest, path=path, buffers=buffers)
    save_fitted(out, artifact, checkpoint)
    return artifact, metrics
