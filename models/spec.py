"""Permutation specs: which axis of which tensor belongs to which permutation group.

A hidden unit of a network can be renamed without changing the function it computes, as long
as every tensor that touches it is renamed the same way (Ainsworth et al. 2022, "Git Re-Basin",
arXiv 2209.04836). A :data:`PermutationSpec` records that bookkeeping: for every key of
``model.state_dict()``, a tuple with one entry per tensor axis, in PyTorch axis order. An entry is

* ``None``: the axis is not permuted;
* a group name ``"P"``: the whole axis is permuted by group ``P`` (its size is the group's size);
* a tuple of :data:`Segment` ``(group, count, inner)``: the axis is cut into consecutive segments
  and each one is ``count`` blocks of ``inner`` elements whose *blocks* ``group`` permutes
  (``None``: that segment stays in place). Concatenation makes these (DenseNet's input to a layer
  is the concatenation of every earlier layer's output: one segment per earlier group), and so
  does flattening a feature map channel-major (``(C, H, W) -> C*H*W`` is one segment
  ``(P, C, H*W)``), and multi-head attention (one segment per head).

Examples: Linear weight ``(P_out, P_in)``, bias ``(P_out,)``; Conv2d weight
``(P_out, P_in, None, None)``; BatchNorm weight, bias, running_mean, running_var ``(P,)``;
num_batches_tracked ``()``. The network's input axes and its head's output axes are ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "StateDict",
    "Segment",
    "AxisEntry",
    "PermutationSpec",
    "apply_permutation",
    "random_permutation",
    "group_sizes",
    "check_spec",
    "axis_index",
    "axis_segments",
    "spec_to_json",
    "spec_from_json",
    "rename_groups",
]

#: Parameters or buffers keyed like ``model.state_dict()`` (defined here so models needs no modeconn).
StateDict: TypeAlias = dict[str, Tensor]

#: ``(group or None, count, inner)``: ``count`` blocks of ``inner`` consecutive elements.
Segment: TypeAlias = tuple[str | None, int, int]

#: One axis of one tensor: not permuted, permuted whole by a group, or cut into segments.
AxisEntry: TypeAlias = str | None | tuple[Segment, ...]

#: state-dict key -> entry of each tensor axis, in PyTorch axis order.
PermutationSpec: TypeAlias = dict[str, tuple[AxisEntry, ...]]


def axis_segments(entry: AxisEntry, size: int) -> tuple[Segment, ...]:
    """``entry`` as segments covering an axis of ``size`` elements (a name is one segment)."""
    if entry is None:
        return ((None, size, 1),)
    if isinstance(entry, str):
        return ((entry, size, 1),)
    return tuple(entry)


def _iter_groups(spec: PermutationSpec, state: Mapping[str, Tensor]) -> Iterator[tuple]:
    """``(group, count, key, axis)`` for every permuted segment; ``ValueError`` on bad shapes."""
    for key, axes in spec.items():
        if key not in state:
            raise ValueError(f"permutation spec names key {key!r}, absent from the state dict")
        shape = state[key].shape
        if len(axes) != len(shape):
            raise ValueError(
                f"permutation spec for {key!r} has {len(axes)} axes {axes}, "
                f"but the tensor has shape {tuple(shape)}"
            )
        for axis, entry in enumerate(axes):
            if entry is None:
                continue
            segments = axis_segments(entry, int(shape[axis]))
            covered = sum(count * inner for _, count, inner in segments)
            if covered != shape[axis]:
                raise ValueError(
                    f"permutation spec for {key!r} axis {axis} has segments covering {covered} "
                    f"elements, but the axis has {shape[axis]}"
                )
            for group, count, _ in segments:
                if group is not None:
                    yield group, count, key, axis


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
    group_sizes(spec, state)


def group_sizes(spec: PermutationSpec, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Size of every permutation group, read off the tensors; ``ValueError`` on disagreement."""
    sizes: dict[str, int] = {}
    first: dict[str, str] = {}
    for group, count, key, axis in _iter_groups(spec, state):
        if group not in sizes:
            sizes[group] = count
            first[group] = f"{key} axis {axis}"
        elif sizes[group] != count:
            raise ValueError(
                f"permutation group {group!r} has size {sizes[group]} at {first[group]} "
                f"but size {count} at {key} axis {axis}"
            )
    return sizes


def axis_index(
    entry: AxisEntry, size: int, perms: Mapping[str, Tensor], device: torch.device | None = None
) -> Tensor | None:
    """The gather index that permutes one axis (``new = old[index]``); ``None`` if unchanged."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return perms[entry].to(device=device, dtype=torch.long) if entry in perms else None
    parts, offset, moved = [], 0, False
    for group, count, inner in entry:
        if group is None or group not in perms:
            parts.append(torch.arange(offset, offset + count * inner, device=device))
        else:
            blocks = perms[group].to(device=device, dtype=torch.long)  # (count,)
            within = torch.arange(inner, device=device)  # (inner,)
            parts.append((offset + blocks[:, None] * inner + within[None, :]).reshape(-1))
            moved = True
        offset += count * inner
    if offset != size:
        raise ValueError(f"segments {entry} cover {offset} elements, but the axis has {size}")
    return torch.cat(parts) if moved else None


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
        for axis, entry in enumerate(spec[key]):
            index = axis_index(entry, value.shape[axis], perms, value.device)
            if index is not None:
                value = value.index_select(axis, index)
        out[key] = value
    return out


def random_permutation(
    spec: PermutationSpec, state: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A uniformly random permutation for every group of ``spec`` (sorted by group name)."""
    sizes = group_sizes(spec, state)
    return {group: torch.randperm(sizes[group], generator=generator) for group in sorted(sizes)}


def rename_groups(spec: PermutationSpec, names: Mapping[str, str]) -> PermutationSpec:
    """``spec`` with every group ``g`` renamed ``names.get(g, g)``."""

    def entry(e: AxisEntry) -> AxisEntry:
        if e is None:
            return None
        if isinstance(e, str):
            return names.get(e, e)
        return tuple((None if g is None else names.get(g, g), c, i) for g, c, i in e)

    return {key: tuple(entry(e) for e in axes) for key, axes in spec.items()}


def spec_to_json(spec: PermutationSpec) -> dict[str, list]:
    """A JSON-ready form: an entry is null, a group name, or a list of ``[group, count, inner]``."""
    return {
        key: [e if e is None or isinstance(e, str) else [list(s) for s in e] for e in axes]
        for key, axes in spec.items()
    }


def spec_from_json(obj: Any, source: str = "spec") -> PermutationSpec:
    """The inverse of :func:`spec_to_json`, with one clear error for anything malformed."""
    if isinstance(obj, dict) and "spec" in obj and isinstance(obj["spec"], dict):
        obj = obj["spec"]  # the file `modeconn spec --out` writes: {"spec": ..., "groups": ...}
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a JSON object mapping state-dict keys to axes")
    spec: PermutationSpec = {}
    for key, axes in obj.items():
        if not isinstance(axes, list):
            raise ValueError(f"{source}: {key!r} must map to a list of axes, got {axes!r}")
        entries: list[AxisEntry] = []
        for e in axes:
            if e is None or isinstance(e, str):
                entries.append(e)
            elif isinstance(e, list) and all(_is_segment(s) for s in e):
                entries.append(tuple((s[0], int(s[1]), int(s[2])) for s in e))
            else:
                raise ValueError(
                    f"{source}: {key!r} has axis entry {json.dumps(e)}; expected null, a group "
                    "name, or a list of [group-or-null, count, inner] segments"
                )
        spec[key] = tuple(entries)
    return spec


def _is_segment(s: Any) -> bool:
    return (
        isinstance(s, list)
        and len(s) == 3
        and (s[0] is None or isinstance(s[0], str))
        and all(isinstance(v, int) and v >= 1 for v in s[1:])
    )
