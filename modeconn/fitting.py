"""What every connection method is made of: its options, its context, and its table entry.

A method is a :class:`Method`: a frozen pydantic config (its options, with the papers'
defaults) and a fitter ``fit(objective, start, end, config, context) -> Path``. Fitters are
written against :class:`modeconn.objective.Objective`, so each works both on models with data
and on a plain energy function of a 1-D vector. The table itself is in :mod:`modeconn.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from pydantic import BaseModel, ConfigDict

from modeconn.objective import Objective
from modeconn.paths import Path
from modeconn.types import StateDict

__all__ = ["MethodConfig", "FitContext", "FitFn", "Method"]


class MethodConfig(BaseModel):
    """Base of every method's options: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0


@dataclass
class FitContext:
    """What a fitter gets besides its config: progress, resumable state, and a place for stats.

    ``checkpoint``: a file where the fitter saves its state (every epoch or cycle) and, with
    ``resume``, restarts from. Fitters record what they measured (gradient evaluations, loss
    history, lengths before/after) in ``stats``; it ends up in the artifact's manifest.
    """

    progress: bool = False
    checkpoint: FsPath | None = None
    resume: bool = False
    stats: dict = field(default_factory=dict)


FitFn = Callable[[Objective, StateDict, StateDict, MethodConfig, FitContext], Path]


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    fit: FitFn
    summary: str
