"""Permutation specs: which axis of which tensor belongs to which permutation group.

A hidden unit of a network can be renamed without changing the function it computes, as long
as every tensor that touches it is renamed the same way (Ainsworth et al. 2022, "Git Re-Basin",
arXiv 2209.04836). A :data:`PermutationSpec` records that bookkeeping: for every key of
``model.state_dict()``, a tuple with one entry per tensor axis, in PyTorch axis order, naming the
permutation group of that axis or ``None`` when the axis is not permutable:

* Linear weight ``(P_out, P_in)``, bias ``(P_out,)``;
* Conv2d weight ``(P_out, P_in, None, None)``;
* BatchNorm/GroupNorm weight, bias, running_mean, running_var ``(P,)``; num_batches_tracked ``()``.

The network's input axes and its head's output axes are ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import torch
from torch import Tensor

from modeconn.types import StateDict

__all__ = [
    "PermutationSpec",
    "apply_permutation",
    "random_permutation",
    "group_sizes",
    "check_spec",
]

#: state-dict key -> permutation group (or None) of each tensor axis, in PyTorch axis order.
PermutationSpec: TypeAlias = dict[str, tuple[str | None, ...]]


def check_spec(spec: PermutationSpec, state: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``spec`` names every key of ``state`` with the right rank.

    Also checks that every group has one size (see :func:`group_sizes`).
    """
    missing = [key for key in state if key not in spec]
    if missing:
        raise ValueError(f"permutation spec has no entry for state-dict key(s) {missing[:5]}")
    extra = [key for key in spec if key not in state]
    if extra:
        raise ValueError(f"permutation spec names key(s) absent from the state dict: {extra[:5]}")
    for key, axes in spec.items():
        if len(axes) != state[key].dim():
            raise ValueError(
                f"permutation spec for {key!r} has {len(axes)} axes {axes}, "
                f"but the tensor has shape {tuple(state[key].shape)}"
            )
    group_sizes(spec, state)


def group_sizes(spec: PermutationSpec, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Size of every permutation group, read off the tensors; ``ValueError`` on disagreement."""
    sizes: dict[str, int] = {}
    first: dict[str, str] = {}
    for key, axes in spec.items():
        if key not in state:
            raise ValueError(f"permutation spec names key {key!r}, absent from the state dict")
        shape = state[key].shape
        if len(axes) != len(shape):
            raise ValueError(
                f"permutation spec for {key!r} has {len(axes)} axes {axes}, "
                f"but the tensor has shape {tuple(shape)}"
            )
        for axis, group in enumerate(axes):
            if group is None:
                continue
            size = int(shape[axis])
            if group not in sizes:
                sizes[group] = size
                first[group] = f"{key} axis {axis}"
            elif sizes[group] != size:
                raise ValueError(
                    f"permutation group {group!r} has size {sizes[group]} at {first[group]} "
                    f"but size {size} at {key} axis {axis}"
                )
    return sizes


def apply_permutation(
    state: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> StateDict:
    """A new state dict with every permutable axis reordered: ``new = old[perms[group]]``.

    Groups absent from ``perms`` stay in place; keys absent from ``spec`` raise ``ValueError``.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key not in spec:
            raise ValueError(f"permutation spec has no entry for state-dict key {key!r}")
        for axis, group in enumerate(spec[key]):
            if group is None or group not in perms:
                continue
            index = perms[group].to(device=value.device, dtype=torch.long)
            value = value.index_select(axis, index)
        out[key] = value
    return out


def random_permutation(
    spec: PermutationSpec, state: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A uniformly random permutation for every group of ``spec`` (sorted by group name)."""
    sizes = group_sizes(spec, state)
    return {group: torch.randperm(sizes[group], generator=generator) for group in sorted(sizes)}
