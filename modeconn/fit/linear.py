"""The straight line between the endpoints: the baseline every method is measured against."""

from __future__ import annotations

from modeconn.fit.configs import LinearConfig
from modeconn.fit.objective import Objective
from modeconn.fit.state import FitContext
from modeconn.paths import Path, linear
from modeconn.types import StateDict

__all__ = ["fit_linear"]


def fit_linear(
    objective: Objective, start: StateDict, end: StateDict, config: LinearConfig, ctx: FitContext
) -> Path:
    """``w(t) = (1 - t) A + t B``: nothing to fit."""
    return linear(start, end)
