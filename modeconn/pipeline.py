"""From endpoint files to a path artifact: align, fit, recompute BN, evaluate, save.

The glue that ``modeconn connect``, ``modeconn fge``, ``modeconn compare`` and the demo share.
Every method of the table goes through :func:`fit_artifact`; FGE, which starts from one
network, gets ``b=None`` and becomes an artifact of kind ``points``.

In a process group (``torchrun``) every rank fits; rank 0 alone then evaluates the path and
writes the artifact while the others wait (see :mod:`modeconn.distributed`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path as FsPath

import torch
import torch.nn.functional as F
from torch import nn

from modeconn import distributed
from modeconn.artifact import (
    PathArtifact,
    compute_served_buffers,
    default_served_ts,
    save_artifact,
)
from modeconn.bn import DEFAULT_BN_EXAMPLES, bn_subset, check_bn_examples
from modeconn.checkpoint import Checkpoint
from modeconn.data import Dataset
from modeconn.evaluate import evaluate_path, predict
from modeconn.fit.configs import MethodConfig
from modeconn.fit.connect import connect
from modeconn.fit.methods import get_method, make_config
from modeconn.formats import DataInfo, Manifest, ModelInfo, absolute_data_spec
from modeconn.models.spec import PermutationSpec
from modeconn.paths import as_state
from modeconn.types import StateDict

__all__ = [
    "align_endpoints",
    "endpoint_record",
    "ensemble_metrics",
    "fit_artifact",
    "fit_state_file",
    "save_fitted",
]

log = logging.getLogger("modeconn")


def endpoint_record(ckpt: Checkpoint) -> dict:
    """How a manifest names an endpoint: its file (absolute), seed and the metrics it was saved
    with."""
    return {
        "file": os.path.abspath(ckpt.path_name) if ckpt.path_name else "",
        "metrics": ckpt.meta.get("metrics", {}),
        "seed": ckpt.meta.get("seed"),
    }


def save_fitted(
    out: str | os.PathLike | None, artifact: PathArtifact, fit_state: FsPath | None
) -> None:
    """Save a finished fit (if ``out``) and drop its resumable state, which is no longer needed."""
    if out is None:
        return
    save_artifact(out, artifact)
    if fit_state is not None:
        fit_state.unlink(missing_ok=True)


def fit_state_file(out: str | os.PathLike | None, *, resume: bool) -> FsPath | None:
    """Where a fit of artifact ``out`` keeps its resumable state: a hidden file beside it.

    Without ``resume`` a stale state from an earlier, interrupted fit is removed first (by
    rank 0, which alone writes it).
    """
    if out is None:
        return None
    out = FsPath(out)
    state = out.with_name(f".{out.name}.fit-state.safetensors")
    if not resume and distributed.is_main():
        state.unlink(missing_ok=True)
    return state


def align_endpoints(
    a: Checkpoint,
    b: Checkpoint,
    data: Dataset,
    *,
    seed: int = 0,
    max_iter: int = 100,
    spec: PermutationSpec | None = None,
) -> tuple[dict, dict]:
    """Permute B onto A by weight matching; returns ``(B's permuted state, alignment record)``.

    ``spec`` (default: inferred from the network's graph) is proven on A and the data first.
    """
    from modeconn.matching import align_models

    model = a.build_model()
    probe = data.x_train[:128]
    result = align_models(model, a.state, b.state, probe, max_iter=max_iter, seed=seed, spec=spec)
    record = {
        "method": "weight_matching",
        "spec": "inferred" if spec is None else "given",
        "groups": len(result.perms),
        "seed": seed,
        "sweeps": result.sweeps,
        "objective_start": result.objective[0],
        "objective_end": result.objective[-1],
        "seconds": round(result.seconds, 4),
    }
    log.info(
        "aligned B onto A: %d sweeps, objective %.4g -> %.4g (%.3fs)",
        result.sweeps,
        result.objective[0],
        result.objective[-1],
        result.seconds,
    )
    return result.state, record


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


def fit_artifact(
    a: Checkpoint,
    b: Checkpoint | None,
    data: Dataset,
    method: str,
    *,
    config: MethodConfig | None = None,
    params: dict | None = None,
    out: str | os.PathLike | None = None,
    align: bool = False,
    spec: PermutationSpec | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    resume: bool = False,
    checkpoint_every: int | None = None,
    eval_points: int = 61,
    served_ts: list[float] | None = None,
    cache_key: str | None = None,
    bn_examples: int | None = DEFAULT_BN_EXAMPLES,
) -> tuple[PathArtifact, dict | None]:
    """Fit ``method`` between endpoints ``a`` and ``b`` and (if ``out``) save the artifact.

    ``config`` is the method's validated options (or give ``params`` to validate here).
    ``b`` is None for a method that starts from one network (FGE). Returns the artifact and
    the path evaluation (``None`` when ``eval_points`` is 0). With ``align``, B is first
    permuted onto A with ``spec`` (default: inferred from the graph). For a point set (FGE)
    the metrics also hold the members' ensemble (``ensemble``) beside the start (``start``).
    BatchNorm statistics, stored and evaluated, come from ``bn_examples`` seeded training
    inputs (``None`` or 0: all of them), recorded in the manifest for every later use.

    In a process group every rank fits, then rank 0 alone evaluates the path and writes the
    artifact while the others wait; they return an artifact without buffers or evaluation.
    """
    bn_examples = check_bn_examples(bn_examples)  # a bad count fails before any work
    row = get_method(method)
    if config is None:
        config = make_config(method, **dict(params or {}))  # fail on bad options before any work
    elif params:
        raise TypeError("give the method's options as config or as params, not both")
    if (b is None) != (row.endpoints == 1):
        raise ValueError(
            f"method {method!r} takes {row.endpoints} endpoint{'s' if row.endpoints > 1 else ''}"
        )
    model = a.build_model()
    state_b, alignment = (b.state if b is not None else None), None
    if align and b is not None:
        state_b, alignment = align_endpoints(a, b, data, seed=config.seed, spec=spec)
    checkpoint = fit_state_file(out, resume=resume) if method != "linear" else None
    stats: dict = {}
    start = time.perf_counter()
    path = connect(
        model,
        a.state,
        state_b,
        method,
        config=config,
        data=data,
        device=device,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        checkpoint_every=checkpoint_every,
        stats=stats,
    )
    seconds = time.perf_counter() - start
    path.to("cpu")
    model.cpu()
    ts = served_ts if served_ts is not None else default_served_ts()
    if path.kind == "points":
        ts = [float(k) for k in path.knots()]
    main = distributed.is_main()  # the others hold the same path: rank 0 evaluates it
    buffers: dict[float, StateDict] = {}
    if main:
        bn_inputs = bn_subset(data.x_train, bn_examples)  # (min(N, bn_examples), *input_shape)
        buffers = compute_served_buffers(model, path, bn_inputs, ts, device=device)
        model.cpu()
    metrics: dict = {}
    if eval_points and main:
        evaluation = evaluate_path(
            model,
            path,
            data,
            points=eval_points,
            device=device,
            progress=progress,
            bn_examples=bn_examples,
            buffers=buffers,  # the same statistics at the served t values: not computed twice
        )
        model.cpu()
        metrics = evaluation.to_json()
    if path.kind == "points" and main:
        members = [{**as_state(path.at(t)), **buffers.get(t, {})} for t in ts]
        metrics["ensemble"] = ensemble_metrics(model, members, data, device=device)
        metrics["start"] = ensemble_metrics(model, [a.state], data, device=device)
        model.cpu()
    endpoints = {"a": endpoint_record(a)}
    if b is not None:
        endpoints["b"] = endpoint_record(b)
    manifest = Manifest(
        kind="points" if path.kind == "points" else "path",
        method=method,
        basis=path.basis,
        num_nodes=path.num_nodes,
        knots=[float(k) for k in path.knots()],
        model=ModelInfo(**a.model.to_json()),
        data=DataInfo(**{**data.describe(), "name": absolute_data_spec(data.name)}),
        alignment=alignment,
        endpoints=endpoints,
        served_ts=ts,
        bn_examples=bn_examples,
        metrics=metrics,
        fit={
            "name": FsPath(out).name if out is not None else method,
            "method": method,
            "config": config.model_dump(),
            "seconds": round(seconds, 3),
            "summary": row.summary,
            "stats": stats,
            "cache_key": cache_key,
        },
        seed=config.seed,
    )
    artifact = PathArtifact(manifest=manifest, path=path, buffers=buffers)
    with distributed.main_first() as main:
        if main:
            save_fitted(out, artifact, checkpoint)
    return artifact, metrics or None
