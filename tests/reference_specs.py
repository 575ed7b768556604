"""Hand-written permutation specs of the registry's architectures: the independent reference that
the specs inferred from the graph (``models.infer``) are tested against."""

from __future__ import annotations

from torch import nn

from modeconn.models.cnn import CNN
from modeconn.models.mlp import MLP
from modeconn.models.resnet import ResNet
from modeconn.models.spec import PermutationSpec

__all__ = ["reference_spec", "canonical"]


def reference_spec(model: nn.Module) -> PermutationSpec:
    if isinstance(model, MLP):
        return _mlp(model)
    if isinstance(model, CNN):
        return _cnn(model)
    if isinstance(model, ResNet):
        return _resnet(model)
    raise TypeError(f"no reference spec for {type(model).__name__}")


def canonical(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` with groups renamed g0, g1, ... in order of first appearance (names differ)."""
    names: dict[str, str] = {}

    def rename(group):
        if group is None:
            return None
        return names.setdefault(group, f"g{len(names)}")

    def entry(e):
        if e is None or isinstance(e, str):
            return rename(e)
        return tuple((rename(g), c, i) for g, c, i in e)

    return {key: tuple(entry(e) for e in axes) for key, axes in spec.items()}


def _mlp(model: MLP) -> PermutationSpec:
    spec: PermutationSpec = {}
    prev: str | None = None  # the input features are not permutable
    for i in range(len(model.layers)):
        group = f"P_layers.{i}"
        spec[f"layers.{i}.weight"] = (group, prev)
        spec[f"layers.{i}.bias"] = (group,)
        prev = group
    spec["head.weight"] = (None, prev)
    spec["head.bias"] = (None,)
    return spec


def _cnn(model: CNN) -> PermutationSpec:
    spec: PermutationSpec = {}
    prev: str | None = None  # input channels are not permutable
    for s, stage in enumerate(model.stages):
        for j, _ in enumerate(stage):
            name = f"stages.{s}.{j}"
            group = f"P_{name}"
            spec[f"{name}.conv.weight"] = (group, prev, None, None)
            if model.norm_kind == "none":
                spec[f"{name}.conv.bias"] = (group,)
            else:
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    spec[f"{name}.norm.{leaf}"] = (group,)
                spec[f"{name}.norm.num_batches_tracked"] = ()
            prev = group
    # Global average pooling keeps one feature per channel: the head's input is `prev`.
    spec["head.weight"] = (None, prev)
    spec["head.bias"] = (None,)
    return spec


def _norm_spec(prefix: str, group: str, kind: str) -> PermutationSpec:
    spec: PermutationSpec = {f"{prefix}.weight": (group,), f"{prefix}.bias": (group,)}
    if kind == "bn":
        spec[f"{prefix}.running_mean"] = (group,)
        spec[f"{prefix}.running_var"] = (group,)
        spec[f"{prefix}.num_batches_tracked"] = ()
    return spec


def _resnet(model: ResNet) -> PermutationSpec:
    """One stream permutation per stage (stem, shortcuts, block outputs) plus one inside every
    block (between conv1 and conv2)."""
    kind = model.norm_kind
    spec: PermutationSpec = {}
    stream = "P_stage0"  # the stem writes the stage-0 residual stream
    spec["conv.weight"] = (stream, None, None, None)
    spec.update(_norm_spec("norm", stream, kind))
    for s, stage in enumerate(model.stages):
        prev_stream, stream = stream, f"P_stage{s}"
        for b, block in enumerate(stage):
            name = f"stages.{s}.{b}"
            inner = f"P_{name}.inner"
            block_in = prev_stream if b == 0 else stream
            spec[f"{name}.conv1.weight"] = (inner, block_in, None, None)
            spec.update(_norm_spec(f"{name}.norm1", inner, kind))
            spec[f"{name}.conv2.weight"] = (stream, inner, None, None)
            spec.update(_norm_spec(f"{name}.norm2", stream, kind))
            if block.shortcut is not None:
                spec[f"{name}.shortcut.0.weight"] = (stream, block_in, None, None)
                spec.update(_norm_spec(f"{name}.shortcut.1", stream, kind))
    spec["head.weight"] = (None, stream)
    spec["head.bias"] = (None,)
    return spec
