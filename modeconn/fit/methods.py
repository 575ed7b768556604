"""The table of connection methods: a name, its options, its fitter and a one-line summary.

A new method is one fitter module under :mod:`modeconn.fit` plus one row below (and its
options in :mod:`modeconn.fit.configs`). The table names each fitter by ``module:function`` and
imports it on first use, so listing methods and their options (``modeconn connect --help``)
never loads torch; the fitters import nothing from here.

A fitter has the signature ``fit(objective, start, end, config, context) -> Path`` (see
:class:`modeconn.fit.state.FitContext`); a method with ``endpoints=1`` (FGE) gets ``end=None``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from modeconn.fit.configs import (
    AutoNEBConfig,
    CurveConfig,
    FGEConfig,
    GeodesicConfig,
    LinearConfig,
    MethodConfig,
    NEBConfig,
    read_options,
)
from modeconn.validation import validate

__all__ = ["Method", "METHODS", "method_names", "get_method", "make_config", "load_config"]


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    name: str
    config: type[MethodConfig]
    fitter: str  # "module:function", imported on first use
    summary: str
    endpoints: Literal[1, 2] = 2  # FGE starts from one network

    def fit(self, objective, start, end, config: MethodConfig, ctx) -> Any:
        """Run the fitter: ``fit(objective, start, end, config, ctx) -> Path``."""
        return self.fitter_function()(objective, start, end, config, ctx)

    def fitter_function(self) -> Callable[..., Any]:
        module, _, function = self.fitter.partition(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", LinearConfig, "modeconn.fit.linear:fit_linear", "straight line (the baseline)"),
        Method("bezier", CurveConfig, "modeconn.fit.curves:fit_bezier", "Bezier curve (Garipov et al. 2018)"),
        Method("polychain", CurveConfig, "modeconn.fit.curves:fit_polychain", "polygonal chain (Garipov et al. 2018)"),
        Method("neb", NEBConfig, "modeconn.fit.neb:fit_neb", "nudged elastic band (Draxler et al. 2018)"),
        Method("autoneb", AutoNEBConfig, "modeconn.fit.autoneb:fit_autoneb", "AutoNEB cycles (Draxler et al. 2018)"),
        Method("geodesic", GeodesicConfig, "modeconn.fit.geodesic:fit_geodesic", "JSD geodesic chain (Tan et al. 2023)"),
        Method("fge", FGEConfig, "modeconn.fit.fge:fit_fge", "Fast Geometric Ensembling (Garipov et al. 2018)", endpoints=1),
    )
}  # fmt: skip


def method_names(endpoints: int | None = None) -> list[str]:
    """Names in the table (only those taking ``endpoints`` endpoints, if given)."""
    return [m.name for m in METHODS.values() if endpoints is None or m.endpoints == endpoints]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def make_config(method: str, **params) -> MethodConfig:
    """Validate ``params`` into ``method``'s config, with an error that names the bad option."""
    return validate(get_method(method).config, params, f"options for method {method!r}")


def load_config(path: str | os.PathLike, method: str = "autoneb") -> MethodConfig:
    """Read and validate a YAML file of ``method``'s options."""
    return make_config(method, **read_options(path))
