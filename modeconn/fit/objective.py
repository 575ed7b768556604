"""What a fitter minimises: one interface for models on data and for plain energy functions.

Every connection method (curves, NEB/AutoNEB, geodesic) is written once against
:class:`Objective`, so the same engine fits a path between two ResNets on CIFAR and between two
points of an analytic landscape such as the ring ``L(w) = (|w|^2 - 1)^2``. Parameters are always a
name-keyed dict; a 1-D vector is stored under :data:`modeconn.types.VECTOR_KEY`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.bn import batch_stats_mode, parameter_names
from modeconn.data import Dataset, iterate_batches
from modeconn.types import VECTOR_KEY, Batch, Energy, StateDict

__all__ = ["Objective", "energy_objective", "model_objective", "model_parameters", "check_energy"]


@dataclass(frozen=True)
class Objective:
    """A differentiable loss of a parameter dict, plus the stream of mini-batches it takes.

    ``loss(params, batch)`` is a scalar; ``batch`` is ``None`` for an energy function.
    ``epoch(generator)`` yields one epoch of batches (``steps_per_epoch`` of them).
    ``forward(params, inputs)`` gives logits (models only: the geodesic energy needs them).
    Enter ``session()`` around fitting: it puts a model into train mode with BatchNorm on batch
    statistics (see :func:`modeconn.bn.batch_stats_mode`) and restores it afterwards.
    """

    loss: Callable[[StateDict, Batch | None], Tensor]
    epoch: Callable[[torch.Generator], Iterator[Batch | None]]
    steps_per_epoch: int
    is_vector: bool
    model: nn.Module | None = None
    data: Dataset | None = None
    batch_size: int | None = None
    device: torch.device = torch.device("cpu")

    def forward(self, params: StateDict, inputs: Tensor) -> Tensor:
        if self.model is None:
            raise TypeError("this objective is an energy function: it has no model outputs")
        return functional_call(self.model, params, (inputs,))

    def session(self) -> contextlib.AbstractContextManager:
        return batch_stats_mode(self.model) if self.model is not None else contextlib.nullcontext()

    def stream(self, generator: torch.Generator) -> Iterator[Batch | None]:
        """Endless batches, epoch after epoch."""
        while True:
            yield from self.epoch(generator)


def energy_objective(energy: Energy, *, steps_per_epoch: int = 100) -> Objective:
    """Wrap ``energy(w: 1-D Tensor) -> scalar`` as an objective (an 'epoch' is a step count)."""
    if not callable(energy):
        raise TypeError(f"energy must be callable as energy(w) -> scalar, got {type(energy)}")

    def loss(params: StateDict, batch: Batch | None) -> Tensor:
        return energy(params[VECTOR_KEY]).reshape(())  # a one-element result becomes 0-d

    def epoch(generator: torch.Generator) -> Iterator[None]:
        for _ in range(steps_per_epoch):
            yield None

    return Objective(loss=loss, epoch=epoch, steps_per_epoch=steps_per_epoch, is_vector=True)


def check_energy(energy: Energy, points: dict[str, Tensor], *, gradient: bool = True) -> None:
    """Refuse, with one line naming the problem, an energy that no method can follow.

    At each of ``points`` (e.g. the endpoints) ``energy(w)`` must return a finite one-element
    torch tensor and, with ``gradient``, one that depends differentiably on ``w`` (not computed
    from ``w.detach()``, ``.item()``, numpy or under ``torch.no_grad``).
    """
    for name, w in points.items():
        x = w.detach().clone().requires_grad_(gradient)
        try:
            with torch.enable_grad():
                value = energy(x)
        except Exception as err:  # the user's function: say where it failed
            raise ValueError(
                f"energy(w) failed at the {name} point: {type(err).__name__}: {err} "
                "(it must be a torch function of the 1-D tensor w)"
            ) from err
        if not isinstance(value, Tensor):
            raise TypeError(
                f"energy(w) must return a scalar torch tensor; at the {name} point it returned "
                f"{type(value).__name__} (do not call .item() or go through numpy)"
            )
        if value.numel() != 1:
            raise ValueError(
                f"energy(w) must return a scalar; at the {name} point it returned shape "
                f"{tuple(value.shape)} (reduce it, e.g. with .sum())"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"the energy is {float(value)} at the {name} point; it must be finite at both "
                "endpoints"
            )
        if gradient and (
            not value.requires_grad
            or torch.autograd.grad(value.sum(), x, allow_unused=True)[0] is None
        ):
            raise ValueError(
                "energy(w) has no gradient with respect to w: it is computed from w.detach(), "
                ".item(), numpy or under torch.no_grad; fitting needs a differentiable torch "
                "function (only method 'linear' does without)"
            )


def model_objective(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    augment: bool = True,
) -> Objective:
    """Cross-entropy of ``model`` run with given parameters on ``data``'s training set."""
    device = torch.device(device or "cpu")
    model.to(device)
    x_train = data.x_train.to(device)
    y_train = data.y_train.to(device)
    n = len(y_train)
    drop_last = n > batch_size  # avoid a tiny last batch (and BN on a batch of one)
    steps = n // batch_size if drop_last else 1

    def loss(params: StateDict, batch: Batch | None) -> Tensor:
        if batch is None:
            raise TypeError("a model's loss needs a batch of (inputs, labels)")
        x, y = batch
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def epoch(generator: torch.Generator) -> Iterator[Batch]:
        return iterate_batches(
            x_train,
            y_train,
            batch_size,
            generator=generator,
            augment=data.augment if augment else None,
            drop_last=drop_last,
        )

    return Objective(
        loss=loss,
        epoch=epoch,
        steps_per_epoch=steps,
        is_vector=False,
        model=model,
        data=data,
        batch_size=batch_size,
        device=device,
    )


def model_parameters(model: nn.Module, state: StateDict) -> StateDict:
    """The trainable parameters of ``state`` (a full state dict), in the model's order."""
    names = parameter_names(model)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"state dict lacks parameters {missing[:5]} of {type(model).__name__}")
    return {n: state[n] for n in names}
