"""AutoNEB (Draxler et al. 2018, arXiv 1803.00885): NEB cycles that insert pivots where needed.

Each cycle of the schedule first inserts pivots, then runs NEB steps with a fresh optimiser
(the engine is :func:`modeconn.fit.neb.fit_chain`). What AutoNEB adds is the insertion rule
``highest``: the loss is evaluated densely between neighbouring pivots (``subsample`` points
per gap), and up to ``insert_count`` pivots go where it rises most above the chord between the
two neighbours, if that rise exceeds ``insert_threshold`` times the chain's loss range.

Sharded across ranks, the dense evaluation is shared out by points and gathered, so every rank
computes the same insertion from the same losses; the grown chain is then shared out afresh
(new blocks, each rank building its own from the old rows it needs: see
:mod:`modeconn.fit.neb`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modeconn.fit.configs import AutoNEBConfig, ChainConfig
from modeconn.fit.neb import fit_chain
from modeconn.fit.objective import Objective
from modeconn.fit.state import FitContext
from modeconn.paths import PolyChain
from modeconn.types import StateDict

__all__ = ["fit_autoneb", "highest_fill"]


def fit_autoneb(
    objective: Objective, start: StateDict, end: StateDict, config: AutoNEBConfig, ctx: FitContext
) -> PolyChain:
    """AutoNEB: NEB cycles that insert pivots where the loss rises (Draxler et al. 2018)."""
    return fit_chain(objective, start, end, config, ctx, "autoneb", highest=highest_fill)


def highest_fill(
    dense: Tensor, num_pivots: int, count: int, config: ChainConfig
) -> list[list[float]]:
    """Up to ``count`` gaps where the dense loss ``(M,)`` rises most above the chord.

    Returns, per gap, the fractions at which to insert a pivot (the point of the largest rise).
    """
    per_gap = config.subsample + 1
    pivots = dense[::per_gap]  # (P,)
    fill: list[list[float]] = [[] for _ in range(num_pivots - 1)]
    if count == 0:
        return fill
    span = float(pivots.max() - pivots.min()) + 1e-12
    alphas = torch.linspace(0, 1, config.subsample + 2, dtype=torch.float64)[1:-1]  # (S,)
    inner = dense[:-1].reshape(num_pivots - 1, per_gap)[:, 1:].double()  # (P-1, S)
    left, right = pivots[:-1].double(), pivots[1:].double()  # (P-1,)
    chord = left[:, None] * (1 - alphas) + right[:, None] * alphas  # (P-1, S)
    scores = (inner - chord) / span  # (P-1, S)
    best, where = scores.max(dim=1)  # (P-1,)
    threshold = (
        config.insert_threshold
        if isinstance(config, AutoNEBConfig)
        else AutoNEBConfig.model_fields["insert_threshold"].default
    )
    for g in best.argsort(descending=True)[:count].tolist():
        if float(best[g]) > threshold:
            fill[g].append(float(alphas[where[g]]))
    return fill
