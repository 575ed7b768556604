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

Under ``torchrun`` the fit is data-parallel (:mod:`modeconn.distributed`): every rank draws the
same batches and ``t``, computes on its block of each batch, and that flat gradient (with the
loss) is summed over the ranks in one all-reduce per step, so the nodes stay identical on
every rank and a saved state resumes under any number of ranks.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from modeconn import distributed
from modeconn.fit.configs import CurveConfig
from modeconn.fit.objective import Objective
from modeconn.fit.state import (
    BatchStream,
    FitContext,
    FitState,
    FlatLayout,
    fingerprint,
    load_optimizer_tensors,
    optimizer_tensors,
    straight_interior,
    thin,
)
from modeconn.paths import Bezier, Path, PolyChain, uniform_knots
from modeconn.progress import progress_bar
from modeconn.types import Batch, StateDict

__all__ = [
    "CurveTrainer",
    "curve_lr_factor",
    "fit_curve",
    "fit_bezier",
    "fit_polychain",
]


def curve_lr_factor(progress: float) -> float:
    """Garipov et al.'s schedule: 1 up to 50 % of training, linear to 0.01 at 90 %, then 0.01."""
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (progress - 0.5) / 0.4 * 0.99
    return 0.01


class CurveTrainer:
    """The state of a curve fit (flat nodes, optimiser) and one training step.

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
        knots = uniform_knots(k)[1:-1]  # (K-2,)
        interior = straight_interior(self.layout, a, b, knots, config.init_noise, generator)
        self.nodes = torch.cat([a[None], interior, b[None]])  # (K, N)
        # The optimised leaf: the interior rows of `nodes`, sharing their storage.
        self.interior = self.nodes[1:-1].detach().requires_grad_(True)  # (K-2, N)
        self.optimizer = _optimizer(config, objective, self.interior)
        self._knots = uniform_knots(k).tolist()
        self._binom = [float(math.comb(k - 1, i)) for i in range(k)]

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
        with torch.no_grad():
            w = self.coefficients(t) @ self.nodes  # (K,) @ (K, N) -> (N,)
        return self.layout.unflatten(w)

    def step(self, batch: Batch | None, t: float, lr: float | None = None) -> Tensor:
        """One SGD step on ``L(w(t); batch) + 0.5 wd |w(t)|^2``; returns the data loss (detached).

        ``w(t)`` is computed once, without autograd, and its per-tensor views become leaves for
        the network's backward; the chain rule to interior node k (``c_k``) and the weight-decay
        term are then applied to the laid-out gradients with multi-tensor ops. No autograd
        graph runs through the nodes, and the endpoints never see a gradient.

        In a process group every rank is given the same ``batch`` and ``t``; each computes on
        its block of the rows, weighted by its share, and the flat gradient and the loss are
        summed over the ranks in one all-reduce, before the weight decay (added once).
        """
        if lr is not None:
            self.optimizer.param_groups[0]["lr"] = lr
        coeffs = self._coefficients(t)
        c = torch.tensor(coeffs, dtype=self.nodes.dtype, device=self.nodes.device)  # (K,)
        with torch.no_grad():
            w = c @ self.nodes  # (K,) @ (K, N) -> (N,)
        point = {k: v.requires_grad_(True) for k, v in self.layout.unflatten(w).items()}
        # An energy has no batch to share: every rank computes the same full gradient.
        parallel = batch is not None and distributed.active()
        if batch is not None and parallel:
            rows, share = distributed.shard(batch)  # this rank's rows, their share
            loss = self.objective.loss(point, rows) * share
        else:
            loss = self.objective.loss(point, batch)
        single = len(coeffs) == 3  # one interior node: fold c_1 into the loss, one pass below
        (loss * coeffs[1] if single else loss).backward()
        # dL/dw(t), laid out contiguously by the leaves (zeros for unused parameters)
        grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in point.values()]
        parts = [g.reshape(-1) for g in grads]
        if parallel:  # the gradient and the loss, summed over the ranks in one all-reduce
            flat = torch.cat([*parts, loss.detach().reshape(1).to(parts[0].dtype)])  # (N + 1,)
            distributed.all_reduce_sum(flat)
            grad, loss = flat[:-1], flat[-1]  # (N,), ()
        else:
            grad, loss = torch.cat(parts), loss.detach()  # (N,), ()
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
        return loss

    def path(self) -> Path:
        """The fitted path (a copy of the nodes)."""
        stacked = self.layout.unflatten_stacked(self.nodes)
        if self.basis == "bezier":
            return Bezier(stacked, is_vector=self.objective.is_vector)
        return PolyChain(stacked, is_vector=self.objective.is_vector)

    # -- resumable state -------------------------------------------------------------------

    def state_tensors(self) -> StateDict:
        return {"interior": self.interior.detach(), **optimizer_tensors(self.optimizer)}

    def load_state_tensors(self, tensors: StateDict) -> None:
        device = self.interior.device
        with torch.no_grad():
            self.interior.copy_(tensors["interior"].to(device))  # shares `nodes`
        load_optimizer_tensors(self.optimizer, {k: v.to(device) for k, v in tensors.items()})


def _optimizer(config: CurveConfig, objective: Objective, leaf: Tensor) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) for a model; Adam for an energy unless told otherwise."""
    kind = config.optimizer
    if kind == "auto":
        kind = "adam" if objective.is_vector else "sgd"
    if kind == "adam":
        return torch.optim.Adam([leaf], lr=config.lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD([leaf], lr=config.lr, momentum=config.momentum)


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
    endpoints fixed. Saves its state after every epoch (or every ``ctx.checkpoint_every``
    steps) and, with ``ctx.resume``, continues from it, ending bitwise identical to an
    uninterrupted run. Records ``steps``, ``gradient_evaluations`` and the per-epoch mean loss
    in ``ctx.stats``.
    """
    trainer = CurveTrainer(
        objective,
        start,
        end,
        config,
        basis=basis,
        generator=torch.Generator().manual_seed(config.seed),
    )
    per_epoch = objective.steps_per_epoch
    total = config.total_steps(per_epoch)
    stream = BatchStream(objective, torch.Generator().manual_seed(config.seed + 1))
    t_draws = torch.Generator().manual_seed(config.seed + 2)  # one t per step
    a, b = trainer.nodes[0], trainer.nodes[-1]
    state = FitState(ctx, basis, fingerprint(config, trainer.layout, a, b), every=per_epoch)
    history: list[float] = []
    step = 0
    running = torch.zeros((), dtype=torch.float64, device=trainer.nodes.device)  # epoch loss sum
    if (saved := state.resume()) is not None:
        trainer.load_state_tensors(saved.tensors)
        stream.restore(saved.tensors, saved.progress)
        t_draws.set_state(saved.tensors["rng/t"])
        running = saved.tensors["running"].to(running.device)
        step = int(saved.progress["step"])
        history = list(saved.stats.get("loss_history", []))
        ctx.stats["resumed_from_epoch"] = step / per_epoch

    def save() -> None:
        stream_tensors, progress = stream.state()
        tensors = {**trainer.state_tensors(), **stream_tensors}
        tensors.update({"rng/t": t_draws.get_state(), "running": running})
        state.save({"step": step, **progress}, tensors, {"loss_history": history})

    started = time.perf_counter()
    with progress_bar(total, f"fit {basis}", enabled=ctx.progress) as bar:
        bar.skip(step - step % per_epoch)
        while step < total:
            batch = stream.next()
            t = float(torch.rand((), generator=t_draws, dtype=torch.float64))
            lr = config.lr * curve_lr_factor(step / total)
            running += trainer.step(batch, t, lr)
            step += 1
            if step % per_epoch == 0:
                mean = float(running) / per_epoch  # one device sync per epoch
                if not math.isfinite(mean):
                    raise RuntimeError(
                        f"{basis} fit diverged at epoch {step // per_epoch} (loss {mean}); "
                        f"lower lr (now {config.lr})"
                    )
                history.append(round(mean, 6))
                running.zero_()
                bar.advance(per_epoch, loss=mean)
            elif step == total:
                bar.advance(step % per_epoch)
            if state.due(step) or step == total:
                save()
    ctx.stats.update(
        {
            "basis": basis,
            "num_nodes": config.nodes,
            "budget": config.budget,
            "epochs": round(total / per_epoch, 3),
            "steps": total,
            "gradient_evaluations": total,
            "loss_history": thin(history),
            "final_epoch_loss": history[-1] if history else None,
            "seconds_this_run": round(time.perf_counter() - started, 3),
        }
    )
    return trainer.path()


def fit_bezier(
    objective: Objective, start: StateDict, end: StateDict, config: CurveConfig, ctx: FitContext
) -> Path:
    """Fit a Bezier curve (Garipov et al. 2018); see :func:`fit_curve`."""
    return fit_curve(objective, start, end, config, ctx, basis="bezier")


def fit_polychain(
    objective: Objective, start: StateDict, end: StateDict, config: CurveConfig, ctx: FitContext
) -> Path:
    """Fit a polygonal chain (Garipov et al. 2018); see :func:`fit_curve`."""
    return fit_curve(objective, start, end, config, ctx, basis="polychain")
