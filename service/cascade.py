"""A cascade request resolved against a served path: its member graphs and its stop rule.

The members are the merged-model graphs at the t values of the bundle's cascade
(:class:`modeconn.formats.ServedCascade`), in the order they run; each runs only on the inputs
still in the cascade (:func:`modeconn.cascade.run_cascade`), so an easy batch costs about one
network and a hard one the whole ensemble. A request may use the first ``k`` members only, and
its own rule and threshold instead of those the bundle was built with.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from modeconn.cascade import CascadeResult, StopRule, run_cascade

from .graph import Graph

__all__ = ["CascadeRun"]


@dataclass(frozen=True)
class CascadeRun:
    """Member graphs (in the order they run) and the stop rule of one cascade request."""

    members: tuple[Graph, ...]
    rule: StopRule

    mode = "cascade"

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def ts(self) -> list[float]:
        return [g.ts[0] for g in self.members]

    @property
    def key(self) -> Hashable:
        """Requests with equal keys run as one cascade on their inputs stacked: each input's
        answer depends on its own outputs only."""
        return (tuple(id(g) for g in self.members), self.rule)

    def ensure_usable(self) -> None:
        for graph in self.members:
            graph.ensure_usable()

    def open(self) -> None:
        for graph in self.members:
            graph.open()

    @property
    def provider(self) -> str:
        return ", ".join(sorted({g.open().provider for g in self.members}))

    def run(self, x: np.ndarray) -> CascadeResult:
        """The cascade on ``x`` (``(N, *input_shape)``)."""
        members = [_probabilities(g) for g in self.members]
        return run_cascade(members, x, self.rule)


def _probabilities(graph: Graph):
    def run(x: np.ndarray) -> np.ndarray:
        return graph.outputs(x)["probabilities"]

    return run


def describe(members: Sequence[Graph]) -> str:
    return ", ".join(f"{g.ts[0]:.4g}" for g in members)
