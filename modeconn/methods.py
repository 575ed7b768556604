"""The table of connection methods, and ``connect``: the one entry point to all of them.

Each method is a :class:`modeconn.fitting.Method` (a config and a fitter); the table below is
the whole list. ``modeconn.connect`` is :func:`connect`.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from modeconn.curves import CurveConfig, fit_bezier, fit_polychain
from modeconn.data import Dataset
from modeconn.fitting import FitContext, Method, MethodConfig
from modeconn.geodesic import GeodesicConfig, fit_geodesic
from modeconn.neb import AutoNEBConfig, NEBConfig, fit_autoneb, fit_neb
from modeconn.objective import Objective, energy_objective, model_objective
from modeconn.paths import Path, linear
from modeconn.types import VECTOR_KEY, Energy, StateDict

__all__ = [
    "Method",
    "MethodConfig",
    "FitContext",
    "METHODS",
    "connect",
    "method_names",
    "make_config",
]


class LinearConfig(MethodConfig):
    pass


def _fit_linear(
    objective: Objective, start: StateDict, end: StateDict, config: MethodConfig, ctx: FitContext
) -> Path:
    return linear(start, end)


def _build_methods() -> dict[str, Method]:
    table = [
        Method("linear", LinearConfig, _fit_linear, "straight line (the baseline)"),
        Method("bezier", CurveConfig, fit_bezier, "Bezier curve (Garipov et al. 2018)"),
        Method("polychain", CurveConfig, fit_polychain, "polygonal chain (Garipov et al. 2018)"),
        Method("neb", NEBConfig, fit_neb, "nudged elastic band (Draxler et al. 2018)"),
        Method("autoneb", AutoNEBConfig, fit_autoneb, "AutoNEB cycles (Draxler et al. 2018)"),
        Method("geodesic", GeodesicConfig, fit_geodesic, "JSD geodesic chain (Tan et al. 2023)"),
    ]
    return {m.name: m for m in table}


METHODS: dict[str, Method] = _build_methods()


def method_names() -> list[str]:
    return list(METHODS)


def make_config(method: str, **params) -> MethodConfig:
    """Validate ``params`` into ``method``'s config, with an error that names the bad option."""
    methods = METHODS
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(methods)}")
    cls = methods[method].config
    try:
        return cls(**params)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        valid = ", ".join(cls.model_fields)
        raise ValueError(
            f"bad options for method {method!r}: {problems} (options: {valid})"
        ) from err


def connect(
    model_or_energy: nn.Module | Energy,
    start: StateDict | Tensor,
    end: StateDict | Tensor,
    method: str = "linear",
    *,
    data: Dataset | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    stats: dict | None = None,
    **params,
) -> Path:
    """Fit a low-loss path from ``start`` to ``end`` with ``method``.

    Two forms:

    * ``connect(energy, a, b, method=...)`` with ``energy(w: 1-D Tensor) -> scalar`` and 1-D
      tensors ``a``, ``b``: the returned path's ``.at(t)`` is a 1-D tensor;
    * ``connect(model, state_a, state_b, method=..., data=dataset)`` with a registry model and
      two state dicts of it: the path's nodes hold the model's parameters (not its buffers).

    ``params`` are the method's options (see ``METHODS[method].config``); ``stats``, if given,
    receives what the fitter measured.
    """
    if (
        batch_size is not None
        and "batch_size" in getattr(METHODS.get(method), "config", LinearConfig).model_fields
    ):
        params["batch_size"] = batch_size  # the method's option and the objective's must agree
    config = make_config(method, **params)
    batch_size = getattr(config, "batch_size", batch_size)  # a method's own batch size wins
    ctx = FitContext(
        progress=progress,
        checkpoint=FsPath(checkpoint) if checkpoint is not None else None,
        resume=resume,
        stats=stats if stats is not None else {},
    )
    if isinstance(model_or_energy, nn.Module):
        if data is None:
            raise ValueError("connecting two models needs data=Dataset (e.g. load_data('digits'))")
        if not isinstance(start, dict) or not isinstance(end, dict):
            raise TypeError("with a model, start and end must be state dicts of that model")
        from modeconn.objective import model_parameters

        model = model_or_energy
        kwargs = {} if batch_size is None else {"batch_size": batch_size}
        objective = model_objective(model, data, device=device, **kwargs)
        a = {k: v.to(objective.device) for k, v in model_parameters(model, start).items()}
        b = {k: v.to(objective.device) for k, v in model_parameters(model, end).items()}
    elif callable(model_or_energy):
        start, end = _as_vector(start, "start"), _as_vector(end, "end")
        if start.shape != end.shape:
            raise ValueError(
                f"start and end differ in shape: {tuple(start.shape)} vs {tuple(end.shape)}"
            )
        objective = energy_objective(model_or_energy)
        a, b = {VECTOR_KEY: start}, {VECTOR_KEY: end}
    else:
        raise TypeError(
            f"connect needs an nn.Module or a callable energy(w) -> scalar, got {type(model_or_energy)}"
        )
    with objective.session():
        path = METHODS[method].fit(objective, a, b, config, ctx)
    path.is_vector = objective.is_vector
    return path


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
