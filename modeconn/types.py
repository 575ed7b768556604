"""Names for the types that recur across the library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeAlias

from torch import Tensor

from modeconn.models.spec import (
    StateDict,  # parameters or buffers keyed like ``model.state_dict()``
)

__all__ = ["StateDict", "StackedStateDict", "Energy", "Batch", "BatchIterator", "VECTOR_KEY"]

#: Nodes of a path stacked along a new leading axis: each value has shape ``(K, *param_shape)``.
StackedStateDict: TypeAlias = dict[str, Tensor]

#: A differentiable scalar function of a flat 1-D parameter vector.
Energy: TypeAlias = Callable[[Tensor], Tensor]

#: One mini-batch as the data loaders yield it: ``(inputs, labels)``.
Batch: TypeAlias = tuple[Tensor, Tensor]

BatchIterator: TypeAlias = Iterator[Batch]

#: The single key under which a 1-D parameter vector is stored when a path runs on vectors.
VECTOR_KEY = "w"
