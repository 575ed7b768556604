"""Evaluate a path along t: loss, accuracy, barriers and lengths (DESIGN.md, "Barrier and metrics").

At every t the network is run with ``functional_call`` on ``w(t)`` and, for BatchNorm models,
with statistics recomputed at that t (from a seeded subset of the training inputs,
:func:`modeconn.bn.bn_subset`, or taken from statistics already computed there). The grid is
the same for every method (61 points by default) plus the path's own knots, so the pivots of a
chain are always among the points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.bn import DEFAULT_BN_EXAMPLES, bn_subset, has_batchnorm, recompute_bn
from modeconn.data import Dataset
from modeconn.formats import match_t
from modeconn.metrics import barriers, jsd_from_log_probs
from modeconn.paths import Path, PointSet, as_state, as_vector
from modeconn.progress import progress_bar
from modeconn.types import Energy, StateDict

__all__ = ["PathEvaluation", "evaluate_path", "evaluate_energy_path", "evaluation_grid", "predict"]


@dataclass(frozen=True)
class PathEvaluation:
    """Per-t metrics and per-path summaries. Losses are mean cross-entropy (NLL) in nats."""

    ts: list[float]
    train_loss: list[float]
    train_acc: list[float]
    test_loss: list[float]
    test_acc: list[float]
    loss_barrier: dict[str, float]  # on train loss: {"mean", "max", "peak", ...}
    error_barrier: dict[str, float]  # on test error
    test_loss_barrier: dict[str, float]
    weight_length: float  # sum of |w(t_i+1) - w(t_i)| over the grid
    prediction_length: float  # sum of sqrt(mean JSD) between consecutive points, train inputs

    @property
    def worst_test_error(self) -> float:
        return 1.0 - min(self.test_acc)

    def to_json(self) -> dict:
        return {**asdict(self), "worst_test_error": self.worst_test_error}


def evaluation_grid(path: Path, points: int = 61) -> list[float]:
    """``points`` evenly spaced t values plus the path's knots, sorted and de-duplicated."""
    if isinstance(path, PointSet):
        return [float(k) for k in path.knots()]
    if points < 2:
        raise ValueError(f"points must be >= 2 (t=0 and t=1), got {points}")
    grid = {round(float(t), 9) for t in torch.linspace(0, 1, points, dtype=torch.float64)}
    grid.update(round(float(k), 9) for k in path.knots())
    return sorted(grid)


@torch.no_grad()
def predict(
    model: nn.Module, state: StateDict, inputs: Tensor, *, batch_size: int = 256, device=None
) -> Tensor:
    """Log-probabilities ``(N, C)`` of the network with ``state`` in eval mode.

    Batches of 256: on the CPU a 28x28 CNN ran twice as fast as in batches of 1024, whose
    activations no longer fit the cache (and no slower on 8x8 digits).
    """
    was_training = model.training
    model.eval()
    try:
        outs = [
            F.log_softmax(
                functional_call(model, state, (inputs[i : i + batch_size].to(device),)), -1
            )
            for i in range(0, len(inputs), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs).cpu()


def evaluate_path(
    model: nn.Module,
    path: Path,
    data: Dataset,
    *,
    points: int = 61,
    ts: list[float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    bn_examples: int | None = DEFAULT_BN_EXAMPLES,
    buffers: Mapping[float, StateDict] | None = None,
) -> PathEvaluation:
    """Train/test loss and accuracy at every t of the grid, with BN recomputed at each t.

    BatchNorm statistics come from ``bn_examples`` seeded training inputs (``None`` or 0: all
    of them; see :func:`modeconn.bn.bn_subset`), except at the t values of ``buffers``:
    statistics already computed there from the same inputs (an artifact's served t values).
    Losses and accuracies are always on the whole train and test sets.
    """
    device = torch.device(device or "cpu")
    model.to(device)
    ts = evaluation_grid(path, points) if ts is None else [float(t) for t in ts]
    x_train = data.x_train.to(device)
    x_test = data.x_test.to(device)
    bn = has_batchnorm(model)
    x_bn = bn_subset(x_train, bn_examples)  # (min(N, bn_examples), *input_shape)
    known = dict(buffers or {})
    rows: dict[str, list[float]] = {
        k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc")
    }
    weight_length = 0.0
    prediction_length = 0.0
    prev_params: StateDict | None = None
    prev_log_probs: Tensor | None = None
    with progress_bar(len(ts), "evaluate path", enabled=progress) as bar:
        for t in ts:
            params = {k: v.to(device) for k, v in as_state(path.at(t)).items()}
            state = {**params, **_bn_stats(model, params, x_bn, t, known, device)} if bn else params
            lp_train = predict(model, state, x_train, device=device)
            lp_test = predict(model, state, x_test, device=device)
            rows["train_loss"].append(float(F.nll_loss(lp_train, data.y_train)))
            rows["train_acc"].append(float((lp_train.argmax(-1) == data.y_train).float().mean()))
            rows["test_loss"].append(float(F.nll_loss(lp_test, data.y_test)))
            rows["test_acc"].append(float((lp_test.argmax(-1) == data.y_test).float().mean()))
            if prev_params is not None and prev_log_probs is not None:  # set together
                weight_length += _distance(params, prev_params)
                prediction_length += math.sqrt(
                    float(jsd_from_log_probs(lp_train, prev_log_probs).mean())
                )
            prev_params, prev_log_probs = params, lp_train
            bar.advance(1, t=t, train_loss=rows["train_loss"][-1])
    return PathEvaluation(
        ts=ts,
        **rows,
        loss_barrier=barriers(rows["train_loss"], ts=ts),
        error_barrier=barriers([1 - a for a in rows["test_acc"]], ts=ts),
        test_loss_barrier=barriers(rows["test_loss"], ts=ts),
        weight_length=weight_length,
        prediction_length=prediction_length,
    )


def _bn_stats(
    model: nn.Module,
    params: StateDict,
    inputs: Tensor,
    t: float,
    known: Mapping[float, StateDict],
    device: torch.device,
) -> StateDict:
    """BatchNorm statistics at ``t``: the ones in ``known`` for that t, else recomputed."""
    near = match_t(t, known)
    if near is not None:
        return {k: v.to(device) for k, v in known[near].items()}
    return recompute_bn(model, params, inputs, device=device)


def _distance(a: StateDict, b: StateDict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


@torch.no_grad()
def evaluate_energy_path(energy: Energy, path: Path, *, points: int = 61) -> dict:
    """Energy along a path of 1-D vectors: values per t, barriers, mean and length."""
    ts = evaluation_grid(path, points)
    ws = [as_vector(path.at(t)) for t in ts]
    values = [float(energy(w)) for w in ws]
    length = sum(float((ws[i + 1] - ws[i]).norm()) for i in range(len(ws) - 1))
    return {
        "ts": ts,
        "loss": values,
        "barrier": barriers(values, ts=ts),
        "mean_loss": sum(values) / len(values),
        "weight_length": length,
    }
