"""ResNet-20 for CIFAR (He et al. 2016, arXiv 1512.03385), with a width multiplier.

Three stages of three basic blocks with ``16, 32, 64`` channels times ``width``; the first block
of stages 2 and 3 halves the spatial size. When a block changes shape its shortcut is a 1x1 conv
plus norm ("option B"). ``norm="ln"`` uses ``nn.GroupNorm(1, C)``: LayerNorm over (C, H, W) with
a per-channel affine, which needs no running statistics (Git Re-Basin's ResNet variant).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register_model
from models.spec import PermutationSpec

__all__ = ["ResNet", "BasicBlock", "resnet20"]

_NORMS = ("bn", "ln")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(1, channels)


def _norm_spec(prefix: str, group: str, kind: str) -> PermutationSpec:
    spec: PermutationSpec = {f"{prefix}.weight": (group,), f"{prefix}.bias": (group,)}
    if kind == "bn":
        spec[f"{prefix}.running_mean"] = (group,)
        spec[f"{prefix}.running_var"] = (group,)
        spec[f"{prefix}.num_batches_tracked"] = ()
    return spec


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _norm(norm, out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))  # (N, C, H', W')
        out = self.norm2(self.conv2(out))  # (N, C, H', W')
        skip = x if self.shortcut is None else self.shortcut(x)  # (N, C, H', W')
        return F.relu(out + skip)


class ResNet(nn.Module):
    """Stem conv, three stages of basic blocks, global average pool, Linear head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        blocks_per_stage: int = 3,
        width: int = 1,
        norm: str = "bn",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs image inputs (C, H, W), got input_shape={input_shape}")
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r} for resnet; choose one of {_NORMS}")
        if width < 1:
            raise ValueError(f"width must be a positive integer multiplier, got {width}")
        self.norm_kind = norm
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.norm = _norm(norm, widths[0])
        stages = []
        in_channels = widths[0]
        for s, out_channels in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, norm))
                in_channels = out_channels
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))  # (N, 16w, H, W)
        for stage in self.stages:
            for block in stage:
                x = block(x)  # (N, C_s, H_s, W_s)
        x = x.mean(dim=(2, 3))  # (N, 64w): global average pool
        return self.head(x)  # (N, num_classes)

    def permutation_spec(self) -> PermutationSpec:
        """One stream permutation per stage (stem, shortcuts, block outputs) plus one inside
        every block (between conv1 and conv2)."""
        spec: PermutationSpec = {}
        stream = "P_stage0"  # the stem writes the stage-0 residual stream
        spec["conv.weight"] = (stream, None, None, None)
        spec.update(_norm_spec("norm", stream, self.norm_kind))
        for s, stage in enumerate(self.stages):
            prev_stream, stream = stream, f"P_stage{s}"
            for b, block in enumerate(stage):
                name = f"stages.{s}.{b}"
                inner = f"P_{name}.inner"
                block_in = prev_stream if b == 0 else stream
                spec[f"{name}.conv1.weight"] = (inner, block_in, None, None)
                spec.update(_norm_spec(f"{name}.norm1", inner, self.norm_kind))
                spec[f"{name}.conv2.weight"] = (stream, inner, None, None)
                spec.update(_norm_spec(f"{name}.norm2", stream, self.norm_kind))
                if block.shortcut is not None:
                    spec[f"{name}.shortcut.0.weight"] = (stream, block_in, None, None)
                    spec.update(_norm_spec(f"{name}.shortcut.1", stream, self.norm_kind))
        spec["head.weight"] = (None, stream)
        spec["head.bias"] = (None,)
        return spec


@register_model("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """CIFAR ResNet-20; kwargs ``width=1`` (channel multiplier) and ``norm="bn"|"ln"``."""
    return ResNet(input_shape, num_classes, blocks_per_stage=3, **kwargs)
