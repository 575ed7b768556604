"""ResNet-20 for CIFAR (He et al. 2016, arXiv 1512.03385), with a width multiplier.

Three stages of three basic blocks with ``16, 32, 64`` channels times ``width``; the first block
of stages 2 and 3 halves the spatial size. When a block changes shape its shortcut is a 1x1 conv
plus norm ("option B"). ``norm="ln"`` uses ``nn.GroupNorm(1, C)``: LayerNorm over (C, H, W) with
a per-channel affine, which needs no running statistics (Git Re-Basin's ResNet variant).
"""

from __future__ import annotations

from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.models.registry import register_model

__all__ = ["ResNet", "BasicBlock", "resnet20"]

_NORMS = ("bn", "ln")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(1, channels)


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
            for block in cast(nn.ModuleList, stage):  # stages hold ModuleLists
                x = block(x)  # (N, C_s, H_s, W_s)
        x = x.mean(dim=(2, 3))  # (N, 64w): global average pool
        return self.head(x)  # (N, num_classes)


@register_model("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """CIFAR ResNet-20; kwargs ``width=1`` (channel multiplier) and ``norm="bn"|"ln"``."""
    return ResNet(input_shape, num_classes, blocks_per_stage=3, **kwargs)
