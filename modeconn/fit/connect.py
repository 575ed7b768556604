"""``connect``: the one entry point to every method of :data:`modeconn.fit.methods.METHODS`."""

from __future__ import annotations

import os
from pathlib import Path as FsPath

import torch
from torch import Tensor, nn

from modeconn.data import Dataset
from modeconn.fit.configs import MethodConfig
from modeconn.fit.methods import get_method, make_config
from modeconn.fit.objective import (
    Objective,
    check_energy,
    energy_objective,
    model_objective,
    model_parameters,
)
from modeconn.fit.state import FitContext
from modeconn.paths import Path
from modeconn.types import VECTOR_KEY, Energy, StateDict

__all__ = ["connect"]


def connect(
    model_or_energy: nn.Module | Energy,
    start: StateDict | Tensor,
    end: StateDict | Tensor | None,
    method: str = "linear",
    *,
    config: MethodConfig | None = None,
    data: Dataset | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    stats: dict | None = None,
    **params,
) -> Path:
    """Fit a low-loss path from ``start`` to ``end`` with ``method``.

    Two forms:

    * ``connect(energy, a, b, method=...)`` with ``energy(w: 1-D Tensor) -> scalar`` and 1-D
      tensors ``a``, ``b``: the returned path's ``.at(t)`` is a 1-D tensor;
    * ``connect(model, state_a, state_b, method=..., data=dataset)`` with any ``nn.Module`` and
      two state dicts of it: the path's nodes hold the model's parameters (not its buffers).

    The method's options come as a validated ``config`` or as keyword ``params`` (see
    ``METHODS[method].config``). ``end`` is None for a method that starts from one network
    (``fge``). ``checkpoint`` is a file for the resumable fit state, saved every
    ``checkpoint_every`` steps (default: the method's own interval); ``resume`` continues from
    it. ``stats``, if given, receives what the fitter measured.
    """
    row = get_method(method)
    if config is None:
        if batch_size is not None and "batch_size" in row.config.model_fields:
            params["batch_size"] = batch_size  # the method's option and the objective's agree
        config = make_config(method, **params)
    elif params:
        raise TypeError(f"give the options of {method!r} as config or as keywords, not both")
    elif not isinstance(config, row.config):
        raise TypeError(
            f"method {method!r} takes a {row.config.__name__}, got {type(config).__name__}"
        )
    batch_size = getattr(config, "batch_size", batch_size)  # a method's own batch size wins
    if row.endpoints == 1 and end is not None:
        raise ValueError(f"method {method!r} starts from one network: pass end=None")
    if row.endpoints == 2 and end is None:
        raise ValueError(f"method {method!r} connects two endpoints: give end")
    ctx = FitContext(
        progress=progress,
        checkpoint=FsPath(checkpoint) if checkpoint is not None else None,
        resume=resume,
        checkpoint_every=checkpoint_every,
        stats=stats if stats is not None else {},
    )
    objective, a, b = _objective(model_or_energy, start, end, data, batch_size, device)
    if b is not None and all(torch.equal(a[k], b[k]) for k in a):
        raise ValueError("start and end are the same point: there is no path to fit")
    if not isinstance(model_or_energy, nn.Module):
        ends = (
            {"start": a[VECTOR_KEY]}
            if b is None
            else {"start": a[VECTOR_KEY], "end": b[VECTOR_KEY]}
        )
        check_energy(model_or_energy, ends, gradient=method != "linear")
    with objective.session():
        path = row.fit(objective, a, b, config, ctx)
    path.is_vector = objective.is_vector
    return path


def _objective(
    model_or_energy: nn.Module | Energy,
    start: StateDict | Tensor,
    end: StateDict | Tensor | None,
    data: Dataset | None,
    batch_size: int | None,
    device: torch.device | str | None,
) -> tuple[Objective, StateDict, StateDict | None]:
    """The objective and the endpoints as parameter dicts on its device."""
    if isinstance(model_or_energy, nn.Module):
        if data is None:
            raise ValueError("connecting two models needs data=Dataset (e.g. load_data('digits'))")
        if not isinstance(start, dict) or not (end is None or isinstance(end, dict)):
            raise TypeError("with a model, start and end must be state dicts of that model")
        model = model_or_energy
        objective = (
            model_objective(model, data, device=device)
            if batch_size is None
            else model_objective(model, data, device=device, batch_size=batch_size)
        )

        def params(state: StateDict) -> StateDict:
            return {k: v.to(objective.device) for k, v in model_parameters(model, state).items()}

        return objective, params(start), None if end is None else params(end)
    if callable(model_or_energy):
        a = _as_vector(start, "start")
        b = None if end is None else _as_vector(end, "end")
        if b is not None and a.shape != b.shape:
            raise ValueError(f"start and end differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        objective = energy_objective(model_or_energy)
        return objective, {VECTOR_KEY: a}, None if b is None else {VECTOR_KEY: b}
    raise TypeError(
        f"connect needs an nn.Module or a callable energy(w) -> scalar, got {type(model_or_energy)}"
    )


def _as_vector(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor for an energy function, got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        value = value.float()
    return value.detach()
