"""A small VGG-style CNN: stages of 3x3 conv blocks and 2x2 max-pools, global average pool, head.

Works on any ``(C, H, W)`` input: a stage pools only while the feature map is at least 4x4, so
8x8 digits and 32x32 CIFAR images both fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from modeconn.models.registry import register_model

__all__ = ["CNN", "cnn"]

_NORMS = ("bn", "none")


class ConvBlock(nn.Module):
    """``conv3x3 -> norm -> relu``; the conv has a bias only when there is no norm."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none")
        self.norm = nn.BatchNorm2d(out_channels) if norm == "bn" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class CNN(nn.Module):
    """``[ConvBlock * convs_per_stage -> maxpool2x2] per stage -> global avg pool -> Linear``."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        norm: str = "bn",
        convs_per_stage: int = 1,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image inputs (C, H, W), got input_shape={input_shape}")
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r} for cnn; choose one of {_NORMS}")
        if convs_per_stage not in (1, 2):
            raise ValueError(f"convs_per_stage must be 1 or 2, got {convs_per_stage}")
        if not channels:
            raise ValueError("cnn needs at least one stage: channels=() given")
        self.norm_kind = norm
        in_channels, height, width = input_shape
        stages, pools = [], []
        for out_channels in channels:
            blocks = []
            for _ in range(convs_per_stage):
                blocks.append(ConvBlock(in_channels, out_channels, norm))
                in_channels = out_channels
            stages.append(nn.ModuleList(blocks))
            # Pool only while it keeps at least a 2x2 map, so tiny inputs still work.
            pool = min(height, width) >= 4
            pools.append(pool)
            if pool:
                height, width = height // 2, width // 2
        self.stages = nn.ModuleList(stages)
        self.pools = tuple(pools)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for stage, pool in zip(self.stages, self.pools):
            for block in cast(nn.ModuleList, stage):  # stages hold ModuleLists
                x = block(x)  # (N, C_s, H, W)
            if pool:
                x = F.max_pool2d(x, 2)  # (N, C_s, H/2, W/2)
        x = x.mean(dim=(2, 3))  # (N, C_last): global average pool
        return self.head(x)  # (N, num_classes)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """VGG-style CNN; kwargs ``channels=(32, 64)``, ``norm="bn"|"none"``, ``convs_per_stage=1``."""
    return CNN(input_shape, num_classes, **kwargs)
