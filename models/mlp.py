"""A plain multilayer perceptron: flatten, ``depth`` hidden Linear+activation layers, a head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.models.registry import register_model

__all__ = ["MLP", "mlp"]

# Elementwise activations only: they commute with a permutation of the hidden units.
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class MLP(nn.Module):
    """``flatten -> [Linear -> act] * depth -> Linear head``; layers ``layers.i`` and ``head``."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 2,
        width: int = 256,
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}"
            )
        if depth < 0 or width < 1:
            raise ValueError(f"need depth >= 0 and width >= 1, got depth={depth}, width={width}")
        self.activation = activation
        self._act = _ACTIVATIONS[activation]
        in_features = math.prod(input_shape)
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(depth))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (N, prod(input_shape))
        for layer in self.layers:
            x = self._act(layer(x))  # (N, width)
        return self.head(x)  # (N, num_classes)


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """MLP; kwargs ``depth=2`` hidden layers of ``width=256`` with ``activation="relu"``."""
    return MLP(input_shape, num_classes, **kwargs)
