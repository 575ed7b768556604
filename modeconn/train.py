"""Endpoint training: one network, trained from a seed, to be connected to another later.

Same seed, same device, same data: same weights (shuffling and initialisation both come from
the seed; the CPU kernels used here are deterministic).

Under ``torchrun`` training is data-parallel (:mod:`modeconn.distributed`): the ranks start
from rank 0's initialisation, draw the same batches, each computes on its block of every batch,
and the gradients are summed over the ranks in one all-reduce per step, so the weights stay the
same on every rank and, without BatchNorm, end within float rounding of one process's. A
BatchNorm layer normalises each block by its own statistics; its running statistics, tracked
per rank, are averaged over the ranks at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modeconn import distributed
from modeconn.data import Dataset, iterate_batches
from modeconn.evaluate import predict
from modeconn.progress import progress_bar

__all__ = ["TrainConfig", "train_model", "evaluate_model"]


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum 0.9 and a cosine learning-rate schedule."""

    epochs: int = 100
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def evaluate_model(model: nn.Module, data: Dataset, *, device=None) -> dict[str, float]:
    """Train/test loss and accuracy of ``model`` as it is (eval mode)."""
    state = dict(model.state_dict())
    out = {}
    for split in ("train", "test"):
        x, y = data.split(split)
        log_probs = predict(model, state, x.to(device), device=device)
        out[f"{split}_loss"] = float(F.nll_loss(log_probs, y))
        out[f"{split}_acc"] = float((log_probs.argmax(-1) == y).float().mean())
    return out


def train_model(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` in place on ``data``; returns its final metrics."""
    device = torch.device(device or "cpu")
    model.to(device)
    for tensor in (*model.parameters(), *model.buffers()):  # rank 0's start on every rank
        distributed.broadcast(tensor.data)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    n = len(data.y_train)
    drop_last = n > config.batch_size
    steps_per_epoch = n // config.batch_size if drop_last else 1
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    model.train()
    with progress_bar(config.epochs, "train", enabled=progress) as bar:
        for _ in range(config.epochs):
            running = 0.0
            for x, y in iterate_batches(
                data.x_train,
                data.y_train,
                config.batch_size,
                generator=generator,
                augment=data.augment,
                drop_last=drop_last,
            ):
                optimizer.zero_grad(set_to_none=True)
                (x, y), share = distributed.shard((x, y))  # this rank's rows, their share
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                if distributed.active():
                    loss = loss * share
                loss.backward()
                loss = distributed.all_reduce_gradients(model.parameters(), loss)  # batch's mean
                optimizer.step()
                scheduler.step()
                running += float(loss)
            if not math.isfinite(running):
                raise RuntimeError(
                    f"training diverged (loss {running}); lower the learning rate (now {config.lr})"
                )
            bar.advance(1, loss=running / steps_per_epoch)
    _average_buffers(model)
    model.eval()
    return evaluate_model(model, data, device=device)


def _average_buffers(model: nn.Module) -> None:
    """The mean over the ranks of each floating buffer (BatchNorm's running statistics, which
    each rank tracked on its own blocks), so that every rank ends with the same model."""
    world = distributed.world_size()
    if world == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            distributed.all_reduce_sum(buffer.data).div_(world)
