"""The options of every connection method: one frozen pydantic model each, with the papers'
defaults and the reasons where ours differ.

Torch-free on purpose: the CLI derives each method's flags and help from these models without
loading torch, and a YAML file of options is validated here once. The fitters that consume
them live one per module beside this one; the table that joins the two is
:mod:`modeconn.fit.methods`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Budget",
    "BUDGETS",
    "EVAL_POINTS",
    "Length",
    "MethodConfig",
    "LinearConfig",
    "CurveConfig",
    "CycleConfig",
    "ChainConfig",
    "NEBConfig",
    "AutoNEBConfig",
    "GeodesicConfig",
    "FGEConfig",
    "DEFAULT_CYCLES",
    "read_options",
]

Engine = Literal["auto", "vmap", "loop"]

_ENGINE_HELP = (
    "how the nodes are run: vmap (stacked), loop, or auto (vmap unless the model has "
    "convolutions and runs on CPU)"
)


# ---------------------------------------------------------------------------------------------
# Budgets: how long a fit runs, in passes over the training set

Budget = Literal["quick", "standard", "paper"]
BUDGETS: tuple[Budget, ...] = ("quick", "standard", "paper")
#: t values of the evaluation along a path, per budget: a quick look evaluates 21 points, a
#: third of the work of Garipov et al.'s 61 (which the evaluation of a small CNN on a few
#: thousand 28x28 images spends about a second on each).
EVAL_POINTS: dict[Budget, int] = {"quick": 21, "standard": 61, "paper": 61}


@dataclass(frozen=True)
class Length:
    """A fit's length: ``epochs`` passes over the training set, and at least ``min_steps`` steps.

    Passes are what the papers budget in, and what scales with the data; the floor gives a small
    data set (8x8 digits: 11 steps an epoch) enough optimiser steps to converge. For an energy
    function an epoch is 100 steps.
    """

    epochs: float
    min_steps: int = 0

    def steps(self, steps_per_epoch: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * steps_per_epoch), 1)

    def __str__(self) -> str:
        floor = f", at least {self.min_steps:,} steps" if self.min_steps else ""
        unit = "epoch" if self.epochs == 1 else "epochs"
        return f"{self.epochs:g} {unit}{floor}"


def _lengths_help(lengths: dict[Budget, Length], unit: str = "") -> str:
    return "; ".join(f"{b}: {lengths[b]}{unit}" for b in BUDGETS)


def _epochs_field(lengths: dict[Budget, Length], what: str = "passes over the training set"):
    """An optional length in epochs, whose help gives the budget's lengths."""
    return Field(
        None, gt=0, description=f"{what} (default from the budget: {_lengths_help(lengths)})"
    )


def _steps_field(what: str, *, least: int = 0):
    """An optional length in steps, which overrides the epochs and the budget."""
    return Field(
        None, ge=least, description=f"{what} (default from --epochs, else from the budget)"
    )


def _resolve_steps(
    steps: int | None, epochs: float | None, length: Length, steps_per_epoch: int
) -> int:
    """``steps`` if given, else ``epochs`` passes, else the budget's ``length``."""
    if steps is not None:
        return steps
    if epochs is not None:
        return max(1, math.ceil(epochs * steps_per_epoch))
    return length.steps(steps_per_epoch)


class MethodConfig(BaseModel):
    """Base of every method's options: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="seed of the initial perturbation and the data order")
    budget: Budget = Field(
        "standard",
        description="how long the fit runs when its length is not given: quick (a first look "
        "in minutes), standard, or paper (the papers' passes over the data)",
    )


class LinearConfig(MethodConfig):
    """The straight line: nothing to fit."""


# ---------------------------------------------------------------------------------------------
# Garipov et al. 2018: Bezier curves and polygonal chains


class CurveConfig(MethodConfig):
    """Options of the ``bezier`` and ``polychain`` methods (Garipov et al. 2018).

    The paper (CIFAR, K = 3) used batch 128, 200-600 epochs, lr 0.015-0.03 and weight decay
    3e-4 to 5e-4 (the ``paper`` budget is 600 epochs). The standard budget, 50 epochs and at
    least 2,000 steps, fits a digits MLP in well under a minute on two CPU cores. lr 0.015
    rather than 0.03: a chain's middle node sees the full
    curvature of the loss at t = 0.5 (a Bezier control point a quarter of it), and at 0.03 the
    polygonal chain on the seed's ring diverged for one seed in eight. For an energy function
    an epoch is ``objective.steps_per_epoch`` steps (100), the standard budget is 5,000 steps,
    and the default optimiser is Adam: an analytic landscape has no natural
    scale (Muller-Brown's gradients are ~1e2-1e3, where SGD at lr 0.015 diverges), and Adam's
    step is invariant to it, as NEB's is.
    """

    LENGTHS: ClassVar[dict[Budget, Length]] = {
        "quick": Length(3, min_steps=300),
        "standard": Length(50, min_steps=2000),
        "paper": Length(600),
    }

    nodes: int = Field(3, ge=3, description="control points of the curve, endpoints included (K)")
    epochs: float | None = _epochs_field(LENGTHS, "training epochs")
    lr: float = Field(
        0.015,
        gt=0,
        description="base learning rate (the paper: 0.015-0.03 with SGD); with adam, about the "
        "largest step of a coordinate",
    )
    optimizer: Literal["auto", "sgd", "adam"] = Field(
        "auto",
        description="auto: sgd with momentum for a model (the paper's), adam for an energy "
        "function, whose scale is arbitrary (adam's step does not depend on it)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(
        5e-4, ge=0, description="weight decay 0.5*wd*|w(t)|^2 on the point w(t)"
    )
    batch_size: int = Field(128, ge=1, description="mini-batch size")
    init_noise: float = Field(
        0.01,
        ge=0,
        description="std of the seeded perturbation of the interior control points at the "
        "start, relative to the RMS of B - A per tensor",
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the fit: ``epochs`` passes, else the budget's."""
        return _resolve_steps(None, self.epochs, self.LENGTHS[self.budget], steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# Draxler et al. 2018: NEB and AutoNEB


class CycleConfig(BaseModel):
    """One AutoNEB cycle: insert pivots, then ``steps`` NEB steps with a fresh optimiser.

    ``repeat`` runs the same entry several times in a row (each a cycle of its own, with its
    own insertion), so a schedule reads like the paper's: "4 cycles of 1000 steps at lr 0.1".
    Its length is ``steps``, else ``epochs`` passes over the data, else the AutoNEB budget's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(default=None, gt=0, description="NEB steps in the cycle")
    epochs: float | None = Field(
        default=None, gt=0, description="the cycle's length in passes over the training set"
    )
    lr: float = Field(gt=0, description="learning rate of the cycle's optimiser")
    optimizer: Literal["adam", "sgd"] = Field(
        default="adam", description="adam (scale-free step, the default) or sgd with momentum"
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(
        default=0.0, ge=0, description="0.5*wd*|w|^2 added to every pivot's loss"
    )
    insert: Literal["equal", "highest", "none"] = Field(
        default="highest", description="where to insert pivots before the cycle's steps"
    )
    insert_count: int = Field(
        default=2, ge=0, description="equal: pivots per gap; highest: at most this many pivots"
    )
    repeat: int = Field(default=1, ge=1, description="run this entry this many times in a row")


#: Default AutoNEB schedule: 8 Adam cycles, lr 3e-3 -> 1e-3 -> 3e-4, each as long as the budget
#: says (standard: 3 epochs, at least 60 steps: 300 on a 2-D test surface, 105 on 4,500
#: images at batch 128). The demo's cycles of 300 steps take a few minutes for two digits MLPs
#: of 64-256-256-10 on 2 CPU cores.
DEFAULT_CYCLES: tuple[CycleConfig, ...] = (
    CycleConfig(lr=3e-3, insert="equal", insert_count=3),
    CycleConfig(lr=3e-3, insert="highest", insert_count=2, repeat=3),
    CycleConfig(lr=1e-3, insert="highest", insert_count=2, repeat=2),
    CycleConfig(lr=3e-4, insert="highest", insert_count=2, repeat=2),
)


class ChainConfig(MethodConfig):
    """Options that NEB and AutoNEB share; :meth:`schedule` lists the cycles to run."""

    batch_size: int = Field(128, gt=0, description="mini-batch size (models only)")
    init_noise: float = Field(
        0.01,
        ge=0,
        description="seeded initial bump of the interior pivots (a smooth bend along a random "
        "direction), relative to |B - A|",
    )
    subsample: int = Field(
        9, ge=1, description="points evaluated between neighbouring pivots (insertion, barrier)"
    )
    eval_size: int | None = Field(
        None,
        ge=0,
        description="training examples for the dense loss between pivots (0: all; default: "
        "512 with the quick budget, else 2048)",
    )
    engine: Engine = Field("auto", description=_ENGINE_HELP)

    def schedule(self, steps_per_epoch: int) -> list[CycleConfig]:
        """The cycles to run, each with its number of ``steps`` set."""
        raise NotImplementedError

    def dense_examples(self) -> int:
        """Training examples of the dense loss between pivots: ``eval_size``, else the budget's
        (0: all of them)."""
        if self.eval_size is not None:
            return self.eval_size
        return 512 if self.budget == "quick" else 2048


class NEBConfig(ChainConfig):
    """Plain NEB: ``nodes`` pivots (endpoints included), one optimiser, no insertion."""

    LENGTHS: ClassVar[dict[Budget, Length]] = {
        "quick": Length(1, min_steps=60),
        "standard": Length(15, min_steps=300),
        "paper": Length(40),  # the reference schedule's first cycles: 4 x 1,000 steps of CIFAR
    }

    nodes: int = Field(9, ge=3, description="pivots of the chain, endpoints included")
    steps: int | None = _steps_field("NEB steps", least=1)
    epochs: float | None = _epochs_field(LENGTHS)
    lr: float = Field(3e-3, gt=0, description="learning rate (of Adam by default)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam or sgd (with momentum)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(0.0, ge=0, description="0.5*wd*|w|^2 added to the loss")

    def schedule(self, steps_per_epoch: int) -> list[CycleConfig]:
        steps = _resolve_steps(self.steps, self.epochs, self.LENGTHS[self.budget], steps_per_epoch)
        return [
            CycleConfig(
                steps=steps,
                lr=self.lr,
                optimizer=self.optimizer,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                insert="equal",
                insert_count=self.nodes - 2,
            )
        ]


class AutoNEBConfig(ChainConfig):
    """AutoNEB: a schedule of NEB cycles that insert pivots where the chain needs them.

    The reference schedule (ResNet-20 on CIFAR-10) ran 14 cycles, ~16,000 steps at batch 512:
    about 12 passes over the data a cycle, the ``paper`` budget.
    """

    LENGTHS: ClassVar[dict[Budget, Length]] = {
        "quick": Length(0.25, min_steps=15),
        "standard": Length(3, min_steps=60),
        "paper": Length(12),
    }

    cycles: list[CycleConfig] = Field(
        default_factory=lambda: list(DEFAULT_CYCLES),
        description="the cycle schedule (from --config FILE.yaml); a cycle without steps or "
        f"epochs runs the budget's length ({_lengths_help(LENGTHS, ' a cycle')})",
    )
    insert_threshold: float = Field(
        0.01,
        ge=0,
        description="insert only where the loss rises above the chord by this share of the "
        "chain's loss range (0.1 added no pivot after the first cycle on Muller-Brown and ended "
        "0.29 above the saddle; 0.01 ends within 0.001 of it)",
    )
    max_nodes: int = Field(33, ge=3, description="never grow the chain beyond this many pivots")

    @field_validator("cycles")
    @classmethod
    def _not_empty(cls, cycles: list[CycleConfig]) -> list[CycleConfig]:
        if not cycles:
            raise ValueError("the schedule needs at least one cycle")
        return cycles

    @model_validator(mode="after")
    def _first_cycle_inserts(self) -> AutoNEBConfig:
        first = self.cycles[0]
        if first.insert == "equal" and 2 + first.insert_count > self.max_nodes:
            raise ValueError(
                f"the first cycle inserts {first.insert_count} pivots, more than "
                f"max_nodes={self.max_nodes} allows"
            )
        if first.insert == "none" or first.insert_count == 0:
            raise ValueError(
                "the first cycle must insert pivots between the endpoints "
                f"(got insert={first.insert!r}, insert_count={first.insert_count}); "
                "use insert: equal with insert_count >= 1"
            )
        return self

    def schedule(self, steps_per_epoch: int) -> list[CycleConfig]:
        length = self.LENGTHS[self.budget]
        return [
            c.model_copy(
                update={"steps": _resolve_steps(c.steps, c.epochs, length, steps_per_epoch)}
            )
            for c in self.cycles
            for _ in range(c.repeat)
        ]


# ---------------------------------------------------------------------------------------------
# Tan et al. 2023: geodesic chains


class GeodesicConfig(MethodConfig):
    """Options of the geodesic method (Tan et al. 2023); defaults are the paper's.

    The paper ran 20 epochs of CIFAR-10 at batch 256 (~3,900 steps), the ``paper`` budget. A
    small data set needs more passes: the standard budget has a floor of 200 steps (25 small
    CNNs on 28x28 inputs: ~2.5 s a step on 2 CPU cores); the demo's 1,500 steps over 25 digits
    MLPs take ~1.5 min at width 256 (~60 ms a step).
    """

    LENGTHS: ClassVar[dict[Budget, Length]] = {
        "quick": Length(0.5, min_steps=30),
        "standard": Length(5, min_steps=200),
        "paper": Length(20),
    }

    nodes: int = Field(
        25, ge=2, description="models on the chain, endpoints included (the paper's N = 25)"
    )
    steps: int | None = _steps_field("optimiser steps")
    epochs: float | None = _epochs_field(LENGTHS)
    lr: float = Field(0.1, gt=0, description="learning rate (the paper's 0.1 with plain SGD)")
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd (the paper's, plain by default) or adam"
    )
    momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="SGD momentum, or Adam's beta1 (default: 0 for sgd, 0.9 for adam)",
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over the steps: constant (the paper's) or cosine to 0",
    )
    batch_size: int = Field(256, ge=1, description="mini-batch size (the paper's 256)")
    init_noise: float = Field(
        1e-3,
        ge=0,
        description="seeded perturbation of the interior models at the start, relative to the "
        "RMS of B - A per tensor",
    )
    engine: Engine = Field("auto", description=_ENGINE_HELP)
    length_inputs: int = Field(
        1024,
        ge=1,
        description="training inputs (a fixed, evenly strided subset) for the lengths in the stats",
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the fit: ``steps``, else ``epochs`` passes, else the budget's."""
        return _resolve_steps(self.steps, self.epochs, self.LENGTHS[self.budget], steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# Garipov et al. 2018, section 5: Fast Geometric Ensembling


class FGEConfig(MethodConfig):
    """Options of Fast Geometric Ensembling: lr1 0.05 and lr2 1e-4 as in the paper's code.

    The paper's cycles of 2-4 epochs are 800-1,600 steps on CIFAR; a digits epoch is 11 steps,
    and 4-epoch cycles leave the members almost identical (6 members from a width-16 digits
    MLP: ensemble test NLL 0.1598, start 0.1597), so a standard cycle is 4 epochs but at least
    220 steps (20 digits epochs: 0.1582; width 256: 0.1004 vs 0.1045).
    """

    LENGTHS: ClassVar[dict[Budget, Length]] = {
        "quick": Length(1, min_steps=60),
        "standard": Length(4, min_steps=220),
        "paper": Length(4),
    }

    cycles: int = Field(6, ge=2, description="number of cycles = ensemble members")
    cycle_epochs: float | None = Field(
        None,
        gt=0,
        description="epochs per cycle (the paper: 2 to 4 CIFAR epochs, ~800-1,600 steps; default "
        f"from the budget: {_lengths_help(LENGTHS, ' a cycle')})",
    )
    lr1: float = Field(0.05, gt=0, description="learning rate at the start and end of a cycle")
    lr2: float = Field(
        1e-4, gt=0, description="learning rate at mid-cycle, where members are taken"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    batch_size: int = Field(128, ge=1, description="mini-batch size")

    def cycle_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of one cycle: ``cycle_epochs`` passes, else the budget's."""
        return _resolve_steps(None, self.cycle_epochs, self.LENGTHS[self.budget], steps_per_epoch)


def read_options(path: str | os.PathLike) -> dict:
    """The mapping of option: value in a YAML file (e.g. ``configs/autoneb_resnet20.yaml``).

    Validate it with :func:`modeconn.fit.methods.make_config`.
    """
    import yaml

    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"options file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} must hold a mapping of option: value, got {type(loaded).__name__}"
        )
    return loaded
