"""Curve fitting: Bezier curves and polygonal chains (Garipov et al. 2018, arXiv 1802.10026).

The interior nodes ``theta`` of a path ``w(t) = sum_k c_k(t) node_k`` (endpoints fixed) minimise
the expected loss over ``t ~ U(0, 1)``, with one ``t`` drawn per mini-batch (the paper's
stochastic estimate of ``int_0^1 L(w(t)) dt``), plus the weight decay ``0.5 * wd * |w(t)|^2`` on
the point ``w(t)`` rather than on the nodes. SGD with momentum 0.9; the learning rate stays at
its base value for the first 50 % of training, decays linearly to 1 % of it by 90 %, then stays
there (the reference schedule, applied here per step as a function of training progress).

Interior nodes start on the straight line from A to B, plus a small seeded perturbation: a
straight line through the saddle of a symmetric landscape (the ring ``(|w|^2 - 1)^2`` from
(1, 0) to (-1, 0)) is a stationary point of the objective and would never bend.

Efficiency: all nodes live in one flat ``(K, N)`` buffer, so ``w(t)`` is a single weighted sum
per step whatever the number of tensors, and the network runs on views of it with
``torch.func.functional_call`` (no curve layers). The gradient with respect to ``w(t)`` is
gathered into one flat vector and turned into the interior nodes' gradient (``c_k`` times it,
plus the weight decay) with one or two ops; the optimised leaf shares storage with the
interior rows, and the endpoints never see a gradient.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor

from modeconn.fitting import FitContext, MethodConfig
from modeconn.io import load_tensors, save_tensors
from modeconn.objective import Objective
from modeconn.paths import Bezier, Path, PolyChain, uniform_knots
from modeconn.progress import progress_bar
from modeconn.types import StackedStateDict, StateDict

__all__ = [
    "CurveConfig",
    "CurveTrainer",
    "FlatLayout",
    "curve_lr_factor",
    "resolved_epochs",
    "MODEL_EPOCHS",
    "ENERGY_EPOCHS",
    "fit_curve",
    "fit_bezier",
    "fit_polychain",
]

log = logging.getLogger("modeconn")

_CHECKPOINT_FORMAT = "modeconn.curve-fit/1"


class CurveConfig(MethodConfig):
    """Options of the ``bezier`` and ``polychain`` methods (Garipov et al. 2018).

    The paper (CIFAR, K = 3) used batch 128, 200-600 epochs, lr 0.015-0.03 and weight decay
    3e-4 to 5e-4. The defaults (200 epochs, lr 0.015, wd 5e-4) fit a digits MLP in well under
    a minute on two CPU cores. lr 0.015 rather than 0.03: a chain's middle node sees the full
    curvature of the loss at t = 0.5 (a Bezier control point a quarter of it), and at 0.03 the
    polygonal chain on the seed's ring diverged for one seed in eight. For an energy function
    an epoch is ``objective.steps_per_epoch`` steps (100), and the default budget is 50 epochs
    (5,000 steps): enough for the ring without tuning.
    """

    nodes: int = Field(3, ge=3, description="number of nodes, endpoints included (K)")
    epochs: int | None = Field(
        None,
        ge=1,
        description="training epochs (default: 200 over the data for a model; 50 epochs of "
        "100 steps for an energy function)",
    )
    lr: float = Field(0.015, gt=0, description="base learning rate (SGD)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(
        5e-4, ge=0, description="weight decay 0.5*wd*|w(t)|^2 on the point w(t)"
    )
    batch_size: int = Field(128, ge=1, description="mini-batch size")
    init_noise: float = Field(
        0.01,
        ge=0,
        description="std of the seeded perturbation of the interior nodes at initialisation, "
        "relative to the RMS of B - A per tensor",
    )


#: Default epochs when ``CurveConfig.epochs`` is None: over the data for a model, and of
#: ``objective.steps_per_epoch`` (100) steps for an energy function.
MODEL_EPOCHS = 200
ENERGY_EPOCHS = 50


def resolved_epochs(config: CurveConfig, objective: Objective) -> int:
    """The epoch budget of a fit: ``config.epochs`` or the default for the objective's kind."""
    if config.epochs is not None:
        return config.epochs
    return ENERGY_EPOCHS if objective.is_vector else MODEL_EPOCHS


def curve_lr_factor(progress: float) -> float:
    """Garipov et al.'s schedule: 1 up to 50 % of training, linear to 0.01 at 90 %, then 0.01."""
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (progress - 0.5) / 0.4 * 0.99
    return 0.01


class FlatLayout:
    """Where each named tensor sits in one flat parameter vector (all of one dtype)."""

    def __init__(self, template: StateDict):
        if not template:
            raise ValueError("nothing to fit: the endpoints have no parameters")
        dtypes = {v.dtype for v in template.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(
                f"curve fitting needs parameters of one floating dtype, got {sorted(map(str, dtypes))}"
            )
        self.keys = list(template)
        self.shapes = [tuple(template[k].shape) for k in self.keys]
        self.sizes = [template[k].numel() for k in self.keys]
        self.numel = sum(self.sizes)

    def flatten(self, state: StateDict) -> Tensor:
        return torch.cat([state[k].detach().reshape(-1) for k in self.keys])  # (N,)

    def unflatten(self, flat: Tensor) -> StateDict:
        """Views into ``flat`` (N,), keyed and shaped like the template."""
        parts = flat.split(self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes)}

    def unflatten_stacked(self, flat: Tensor) -> StackedStateDict:
        """``(K, N)`` -> ``{key: (K, *shape)}`` (contiguous copies)."""
        parts = flat.split(self.sizes, dim=1)
        return {
            k: p.reshape(len(flat), *s).clone() for k, p, s in zip(self.keys, parts, self.shapes)
        }


class CurveTrainer:
    """The state of a curve fit (flat nodes, optimiser, generator) and one training step.

    ``basis`` is ``"bezier"`` or ``"polychain"``. :meth:`step` draws nothing itself: the caller
    gives the batch and ``t``, which makes one step directly comparable with a plain training
    step (see ``benchmarks/bench_curves.py``).
    """

    def __init__(
        self,
        objective: Objective,
        start: StateDict,
        end: StateDict,
        config: CurveConfig,
        basis: str = "bezier",
        generator: torch.Generator | None = None,
    ):
        if basis not in ("bezier", "polychain"):
            raise ValueError(f"basis must be 'bezier' or 'polychain', got {basis!r}")
        if list(start) != list(end):
            raise ValueError("start and end must hold the same parameter names, in the same order")
        self.objective = objective
        self.config = config
        self.basis = basis
        self.layout = FlatLayout(start)
        k = config.nodes
        a = self.layout.flatten(start)  # (N,)
        b = self.layout.flatten(end)  # (N,)
        if a.shape != b.shape:
            raise ValueError("start and end parameters differ in shape")
        generator = generator if generator is not None else torch.Generator()
        # Interior nodes on the straight line, at the knots, plus a seeded perturbation.
        knots = uniform_knots(k)[1:-1].to(a.dtype)  # (K-2,)
        interior = a + knots.to(a.device)[:, None] * (b - a)  # (K-2, N)
        if config.init_noise > 0:
            noise = torch.randn(interior.shape, generator=generator, dtype=a.dtype)  # (K-2, N)
            interior = interior + config.init_noise * noise.to(a.device) * self._scale(a, b)
        self.nodes = torch.cat([a[None], interior, b[None]])  # (K, N)
        # The optimised leaf: the interior rows of `nodes`, sharing their storage.
        self.interior = self.nodes[1:-1].detach().requires_grad_(True)  # (K-2, N)
        self.optimizer = torch.optim.SGD([self.interior], lr=config.lr, momentum=config.momentum)
        self._knots = uniform_knots(k).tolist()
        self._binom = [float(math.comb(k - 1, i)) for i in range(k)]

    def _scale(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-element RMS of B - A over its tensor, as a (N,) vector."""
        rms = [
            part.pow(2).mean().sqrt().expand(len(part)) for part in (b - a).split(self.layout.sizes)
        ]
        return torch.cat(rms)  # (N,)

    def coefficients(self, t: float) -> Tensor:
        """Basis coefficients ``(K,)`` at ``t``, in the nodes' dtype and device."""
        return torch.tensor(self._coefficients(t), dtype=self.nodes.dtype, device=self.nodes.device)

    def _coefficients(self, t: float) -> list[float]:
        k = self.config.nodes
        if self.basis == "bezier":
            # Bernstein basis binom(K-1, i) t^i (1-t)^(K-1-i), in plain floats (cheap per step)
            return [self._binom[i] * t**i * (1.0 - t) ** (k - 1 - i) for i in range(k)]
        c = [0.0] * k
        seg = min(int(t * (k - 1)), k - 2)
        frac = (t - self._knots[seg]) / (self._knots[seg + 1] - self._knots[seg])
        c[seg], c[seg + 1] = 1.0 - frac, frac
        return c

    def point(self, t: float) -> StateDict:
        """``w(t)``: one weighted sum of the flat nodes, as views keyed like the parameters."""
        c = torch.tensor(self._coefficients(t), dtype=self.nodes.dtype, device=self.nodes.device)
        with torch.no_grad():
            w = c @ self.nodes  # (K,) @ (K, N) -> (N,)
        return self.layout.unflatten(w)

    def step(self, batch, t: float, lr: float | None = None) -> Tensor:
        """One SGD step on ``L(w(t); batch) + 0.5 wd |w(t)|^2``; returns the data loss (detached).

        ``w(t)`` is computed once, without autograd, and its per-tensor views become leaves for
        the network's backward; the chain rule to interior node k (``c_k``) and the weight-decay
        term are then applied to the laid-out gradients with multi-tensor ops. No autograd
        graph runs through the nodes, and the endpoints never see a gradient.
        """
        if lr is not None:
            self.optimizer.param_groups[0]["lr"] = lr
        coeffs = self._coefficients(t)
        c = torch.tensor(coeffs, dtype=self.nodes.dtype, device=self.nodes.device)  # (K,)
        with torch.no_grad():
            w = c @ self.nodes  # (K,) @ (K, N) -> (N,)
        point = {k: v.requires_grad_(True) for k, v in self.layout.unflatten(w).items()}
        loss = self.objective.loss(point, batch)
        single = len(coeffs) == 3  # one interior node: fold c_1 into the loss, one pass below
        (loss * coeffs[1] if single else loss).backward()
        # dL/dw(t), laid out contiguously by the leaves (zeros for unused parameters)
        grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in point.values()]
        grad = torch.cat([g.reshape(-1) for g in grads])  # (N,)
        wd = self.config.weight_decay
        if single:  # c_1 * (g + wd * w), with g already scaled by c_1
            if wd:
                grad.add_(w, alpha=wd * coeffs[1])
            self.interior.grad = grad[None]  # (1, N)
        else:
            if wd:
                grad.add_(w, alpha=wd)
            self.interior.grad = torch.outer(c[1:-1], grad)  # (K-2, N)
        self.optimizer.step()
        return loss.detach()

    def path(self) -> Path:
        """The fitted path (a copy of the nodes)."""
        stacked = self.layout.unflatten_stacked(self.nodes.detach())
        if self.basis == "bezier":
            return Bezier(stacked, is_vector=self.objective.is_vector)
        return PolyChain(stacked, is_vector=self.objective.is_vector)

    # -- resumable state -------------------------------------------------------------------

    def state_tensors(self, generator: torch.Generator) -> StateDict:
        tensors = {"interior": self.interior.detach(), "generator": generator.get_state()}
        buf = self.optimizer.state.get(self.interior, {}).get("momentum_buffer")
        if buf is not None:
            tensors["momentum"] = buf
        return tensors

    def load_state_tensors(self, tensors: StateDict, generator: torch.Generator) -> None:
        interior = tensors["interior"]
        if interior.shape != self.interior.shape or interior.dtype != self.interior.dtype:
            raise ValueError(
                f"the saved nodes have shape {tuple(interior.shape)}, this fit needs "
                f"{tuple(self.interior.shape)}"
            )
        with torch.no_grad():
            self.interior.copy_(interior.to(self.interior.device))  # shares `nodes` storage
        if "momentum" in tensors:
            buf = tensors["momentum"].to(self.interior.device).clone()
            self.optimizer.state[self.interior]["momentum_buffer"] = buf
        generator.set_state(tensors["generator"])


def fit_curve(
    objective: Objective,
    start: StateDict,
    end: StateDict,
    config: CurveConfig,
    ctx: FitContext,
    *,
    basis: str = "bezier",
) -> Path:
    """Fit a ``basis`` curve's interior nodes by Garipov et al.'s expected-loss training.

    Minimises ``E_{t~U(0,1)} [L(w(t)) + 0.5 wd |w(t)|^2]`` with one ``t`` per mini-batch,
    endpoints fixed. Checkpoints to ``ctx.checkpoint`` after every epoch and, with
    ``ctx.resume``, continues from it, ending bitwise identical to an uninterrupted run.
    Records ``steps``, ``gradient_evaluations`` and the per-epoch mean loss in ``ctx.stats``.
    """
    generator = torch.Generator().manual_seed(config.seed)
    trainer = CurveTrainer(objective, start, end, config, basis=basis, generator=generator)
    epochs, steps_per_epoch = resolved_epochs(config, objective), objective.steps_per_epoch
    total = epochs * steps_per_epoch
    fingerprint = _fingerprint(trainer, basis)
    history: list[float] = []
    first_epoch = 0
    if ctx.resume and ctx.checkpoint is not None and ctx.checkpoint.exists():
        tensors, meta = load_tensors(ctx.checkpoint, what="curve fit checkpoint")
        if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{ctx.checkpoint} holds the state of a different fit (method, options or "
                "endpoints differ); delete it or run without resume"
            )
        trainer.load_state_tensors(tensors, generator)
        first_epoch = int(meta["epoch"])
        history = list(meta.get("loss_history", []))
        ctx.stats["resumed_from_epoch"] = first_epoch
        log.info("resuming the %s fit at epoch %d of %d", basis, first_epoch, epochs)

    started = time.perf_counter()
    with progress_bar(epochs, f"fit {basis}", enabled=ctx.progress) as bar:
        bar.advance(first_epoch)
        for epoch in range(first_epoch, epochs):
            running = torch.zeros((), dtype=torch.float64, device=trainer.nodes.device)
            count = 0
            for i, batch in enumerate(objective.epoch(generator)):
                t = float(torch.rand((), generator=generator, dtype=torch.float64))
                lr = config.lr * curve_lr_factor((epoch * steps_per_epoch + i) / total)
                running += trainer.step(batch, t, lr)
                count += 1
            mean = float(running) / max(count, 1)
            if not math.isfinite(mean):
                raise RuntimeError(
                    f"{basis} fit diverged at epoch {epoch + 1} (loss {mean}); lower lr "
                    f"(now {config.lr})"
                )
            history.append(round(mean, 6))
            if ctx.checkpoint is not None:
                save_tensors(
                    ctx.checkpoint,
                    trainer.state_tensors(generator),
                    {
                        "format": _CHECKPOINT_FORMAT,
                        "fingerprint": fingerprint,
                        "epoch": epoch + 1,
                        "loss_history": history,
                    },
                )
            bar.advance(1, loss=mean)
    ctx.stats.update(
        {
            "basis": basis,
            "num_nodes": config.nodes,
            "epochs": epochs,
            "steps": total,
            "gradient_evaluations": total,
            "loss_history": _thin(history),
            "final_epoch_loss": history[-1] if history else None,
            "seconds_this_run": round(time.perf_counter() - started, 3),
        }
    )
    return trainer.path()


def _fingerprint(trainer: CurveTrainer, basis: str) -> dict:
    """What must match for a checkpoint to belong to this fit (JSON-able)."""
    a, b = trainer.nodes[0], trainer.nodes[-1]
    return {
        "basis": basis,
        "config": trainer.config.model_dump(),
        "numel": trainer.layout.numel,
        "keys": len(trainer.layout.keys),
        "steps_per_epoch": trainer.objective.steps_per_epoch,
        "endpoints": [float(a.double().sum()), float(b.double().sum())],
    }


def _thin(history: list[float], keep: int = 200) -> list[float]:
    """At most ``keep`` evenly chosen entries (the manifest stays small for long runs)."""
    if len(history) <= keep:
        return history
    idx = torch.linspace(0, len(history) - 1, keep).round().long().tolist()
    return [history[i] for i in idx]


def _fitter(basis: str) -> Callable[..., Path]:
    def fit(
        objective: Objective, start: StateDict, end: StateDict, config, ctx: FitContext
    ) -> Path:
        return fit_curve(objective, start, end, config, ctx, basis=basis)

    fit.__name__ = f"fit_{basis}"
    fit.__doc__ = f"Fit a {basis} curve (Garipov et al. 2018); see :func:`fit_curve`."
    return fit


fit_bezier = _fitter("bezier")
fit_polychain = _fitter("polychain")
