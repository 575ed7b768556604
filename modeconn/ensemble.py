"""Ensembles along a path: K points, each with its own BatchNorm statistics, softmax averaged.

Garipov et al. 2018 (arXiv 1802.10026) ensemble networks sampled along a low-loss curve (and
FGE's cyclically collected members); one training budget gives many diverse, accurate members.
A prediction is the mean of the members' softmax. Per input we also report how uncertain the
ensemble is, in nats / fractions:

* ``entropy``: predictive entropy ``H[p̄]`` of the mean distribution (total uncertainty);
* ``mutual_information``: ``mean_k KL(p_k || p̄) = H[p̄] - mean_k H[p_k]`` (the members'
  disagreement in distribution: epistemic uncertainty, 0 for identical members);
* ``disagreement``: the fraction of ordered member pairs ``(i, j), i != j`` whose predicted
  labels differ (0 for K = 1), the per-input version of :func:`modeconn.metrics.disagreement`.

Members are chosen evenly in t (endpoints included; K = 1 is the midpoint), at given t values,
or evenly by arc length in weight space. In torch the members run as a plain loop over K module
copies by default: on CPU it measured faster than ``torch.func.vmap`` over stacked parameters
(``benchmarks/bench_ensemble.py``), which is offered as ``backend="vmap"``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.artifact import PathArtifact
from modeconn.data import Dataset
from modeconn.formats import match_t
from modeconn.merge import BnChoice, as_artifact, merge_at, resolve_bn
from modeconn.metrics import brier, ece
from modeconn.paths import Path, PointSet, stack_nodes
from modeconn.types import StateDict

__all__ = [
    "UNCERTAINTY",
    "Spacing",
    "Ensemble",
    "EnsemblePrediction",
    "choose_ts",
    "arc_length_ts",
    "ensemble_statistics",
    "ensemble_predict",
    "evaluate_ensemble",
]

#: Columns of the per-input uncertainty, in order.
UNCERTAINTY = ("entropy", "mutual_information", "disagreement")

Spacing = Literal["t", "arclength"]
Backend = Literal["loop", "vmap"]


# ---------------------------------------------------------------------------------------------
# Choosing the members


def choose_ts(
    path: Path,
    k: int | None = None,
    *,
    ts: Sequence[float] | None = None,
    spacing: Spacing = "t",
) -> list[float]:
    """The t values of a K-member ensemble on ``path``.

    ``ts`` given: those (validated; ``k`` must then be None or ``len(ts)``). Otherwise ``k``
    points evenly spaced in t with both endpoints (K = 1: the midpoint), or evenly spaced by
    arc length in weight space (``spacing="arclength"``). A point set (FGE) is defined only at
    its members: ``k`` of them, evenly spaced by index.
    """
    if ts is not None:
        values = _check_ts(ts)
        if k is not None and int(k) != len(values):
            raise ValueError(f"k={k} does not match the {len(values)} t values given: {values}")
        if isinstance(path, PointSet):
            knots = [float(x) for x in path.knots()]
            off = [t for t in values if match_t(t, knots) is None]
            if off:
                raise ValueError(
                    f"a point set (FGE ensemble) has members only at t = "
                    f"{[round(x, 4) for x in knots]}, got t={off}"
                )
        return values
    if k is None:
        raise ValueError("give the number of members k or the t values ts")
    k = _check_k(k)
    if spacing not in ("t", "arclength"):
        raise ValueError(f"spacing must be 't' or 'arclength', got {spacing!r}")
    if spacing == "arclength":
        return arc_length_ts(path, k)
    if isinstance(path, PointSet):
        knots = [float(x) for x in path.knots()]
        if k > len(knots):
            raise ValueError(f"k={k}, but this point set (FGE ensemble) has {len(knots)} members")
        if k == 1:
            return [knots[(len(knots) - 1) // 2]]
        index = np.round(np.linspace(0, len(knots) - 1, k)).astype(int)
        return [knots[i] for i in index]
    if k == 1:
        return [0.5]
    return [round(i / (k - 1), 9) for i in range(k)]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be a positive integer (the number of members), got {k}")
    return int(k)


def _check_ts(ts: Sequence[float]) -> list[float]:
    try:
        values = [float(t) for t in ts]
    except (TypeError, ValueError) as err:
        raise TypeError(f"ts must be numbers in [0, 1], got {ts!r}") from err
    if not values:
        raise ValueError("ts is empty: give at least one t value")
    bad = [t for t in values if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"every t must lie in [0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"t values must be distinct, got {values}")
    return values


def arc_length_ts(path: Path, k: int, *, grid: int = 256) -> list[float]:
    """``k`` t values evenly spaced by arc length in weight space (K = 1: the half-way point).

    The length is measured on ``grid`` + 1 evenly spaced t values plus the path's knots, so it
    is exact for polygonal chains and a fine chord approximation for Bezier curves.
    """
    k = _check_k(k)
    if isinstance(path, PointSet):
        raise ValueError("a point set (FGE ensemble) has no path between members: use spacing='t'")
    grid_ts = np.union1d(np.linspace(0.0, 1.0, grid + 1), path.knots().numpy())  # (T,)
    coeffs = path.coefficients(torch.from_numpy(grid_ts))  # (T, K_nodes) float64
    deltas = coeffs[1:] - coeffs[:-1]  # (T-1, K_nodes): w(t_i+1) - w(t_i) = deltas @ nodes
    squared = torch.zeros(len(deltas), dtype=torch.float64)  # (T-1,)
    for value in path.nodes.values():
        if not value.is_floating_point():
            continue
        flat = value.detach().reshape(value.shape[0], -1).to(torch.float64)  # (K_nodes, P)
        squared += (deltas @ flat).pow(2).sum(-1)  # (T-1,)
    cumulative = np.concatenate([[0.0], np.cumsum(squared.sqrt().numpy())])  # (T,)
    total = float(cumulative[-1])
    if total <= 0.0:
        raise ValueError("the path has zero length: arc-length spacing is undefined")
    fractions = np.array([0.5]) if k == 1 else np.linspace(0.0, 1.0, k)
    ts = np.interp(fractions * total, cumulative, grid_ts)
    if k > 1:
        ts[0], ts[-1] = 0.0, 1.0
    return [round(float(t), 9) for t in ts]


# ---------------------------------------------------------------------------------------------
# Combining the members


def ensemble_statistics(member_log_probs: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean distribution and per-input uncertainty from members' log-probabilities.

    ``member_log_probs`` is ``(K, N, C)`` (``dim=0``) or ``(N, K, C)`` (``dim=1``). Returns
    ``p̄`` ``(N, C)`` (the mean of the members' softmax), ``log p̄`` ``(N, C)`` and ``(N, 3)``
    columns :data:`UNCERTAINTY`. ``log p̄`` is floored at ``log(tiny)`` ≈ -87.3 (float32) or
    -708 (float64), where ``p̄`` itself underflows to zero.

    Written with few, cheap ONNX operations: the exported graph runs this very function (with
    ``dim=1``, which needs no transpose), and at batch size 1 every node costs time.
    """
    if dim not in (0, 1) or member_log_probs.dim() != 3:
        raise ValueError(
            f"expected (K, N, C) or (N, K, C) log-probabilities with dim 0 or 1, got shape "
            f"{tuple(member_log_probs.shape)} and dim={dim}"
        )
    lp = member_log_probs.transpose(0, 1) if dim == 0 else member_log_probs  # (N, K, C)
    k = lp.shape[1]
    tiny = torch.finfo(lp.dtype).tiny
    c = lp.shape[2]
    member_probs = lp.exp()  # (N, K, C)
    # The mean over members as one product with a stack of identities: onnxruntime reduces
    # over a middle axis several times slower than it multiplies a small matrix.
    average = torch.eye(c, dtype=lp.dtype, device=lp.device).repeat(k, 1) / k  # (K*C, C)
    mean = member_probs.reshape(-1, k * c) @ average  # (N, C)
    log_mean = mean.clamp_min(tiny).log()  # (N, C)
    # H[p̄] and mean_k H[p_k]; their difference is mean_k KL(p_k || p̄), the mutual information.
    neg_entropy = (mean * log_mean).sum(-1, keepdim=True)  # (N, 1)
    member_neg_entropy = (member_probs * lp).sum(-1).mean(-1, keepdim=True)  # (N, 1)
    mutual_information = (member_neg_entropy - neg_entropy).clamp_min(0.0)  # (N, 1)
    labels = lp.argmax(-1)  # (N, K)
    differ = (labels.unsqueeze(2) != labels.unsqueeze(1)).to(lp.dtype)  # (N, K, K)
    disagreement = differ.sum(dim=(1, 2)).unsqueeze(-1) / max(k * (k - 1), 1)  # (N, 1)
    uncertainty = torch.cat([-neg_entropy, mutual_information, disagreement], dim=-1)  # (N, 3)
    return mean, log_mean, uncertainty


@dataclass(frozen=True)
class EnsemblePrediction:
    """What an ensemble says about N inputs."""

    log_probs: Tensor  # (N, C) log of the mean member probability
    uncertainty: Tensor  # (N, 3) columns UNCERTAINTY
    member_log_probs: Tensor  # (K, N, C)
    ts: tuple[float, ...]

    @property
    def probs(self) -> Tensor:
        return self.log_probs.exp()  # (N, C)

    @property
    def labels(self) -> Tensor:
        return self.log_probs.argmax(-1)  # (N,)

    @property
    def entropy(self) -> Tensor:
        return self.uncertainty[:, 0]

    @property
    def mutual_information(self) -> Tensor:
        return self.uncertainty[:, 1]

    @property
    def disagreement(self) -> Tensor:
        return self.uncertainty[:, 2]


# ---------------------------------------------------------------------------------------------
# The ensemble


class Ensemble:
    """K networks of one architecture at t values along a path, evaluated together.

    ``states`` are full state dicts (parameters and, for BatchNorm, the member's own running
    statistics). Build one from an artifact with :meth:`from_artifact`.
    """

    def __init__(
        self,
        model: nn.Module,
        states: Sequence[StateDict],
        ts: Sequence[float],
        *,
        backend: Backend = "loop",
        device: torch.device | str | None = None,
        bn_sources: Sequence[str] = (),
    ):
        if len(states) != len(ts) or not states:
            raise ValueError(f"need one state per t value, got {len(states)} states for {ts}")
        if backend not in ("loop", "vmap"):
            raise ValueError(f"backend must be 'loop' or 'vmap', got {backend!r}")
        self.ts = tuple(float(t) for t in ts)
        #: Where each member's BatchNorm statistics came from ("stored", "recomputed", "none").
        self.bn_sources = tuple(bn_sources)
        self.backend = backend
        self.device = torch.device(device or "cpu")
        self.members: list[nn.Module] = []
        for state in states:
            member = copy.deepcopy(model)
            member.load_state_dict(state, strict=True)
            self.members.append(member.to(self.device).eval())
        self._base = copy.deepcopy(model).to(self.device).eval()
        self._stacked: StateDict | None = None

    @classmethod
    def from_artifact(
        cls,
        artifact: PathArtifact | str | os.PathLike,
        k: int | None = None,
        *,
        ts: Sequence[float] | None = None,
        spacing: Spacing = "t",
        inputs: Tensor | None = None,
        bn: BnChoice = "auto",
        backend: Backend = "loop",
        device: torch.device | str | None = None,
    ) -> Ensemble:
        """The K-member ensemble along an artifact's path (see :func:`choose_ts`).

        BatchNorm statistics per member follow ``bn`` (:func:`modeconn.merge.resolve_bn`): the
        stored ones for served t values, else recomputed on ``inputs`` (training inputs).
        """
        artifact = as_artifact(artifact)
        chosen = choose_ts(artifact.path, k, ts=ts, spacing=spacing)
        model = artifact.build_model()
        sources = [resolve_bn(artifact, t, inputs=inputs, bn=bn, model=model)[1] for t in chosen]
        states = [merge_at(artifact, t, inputs=inputs, bn=bn, device=device) for t in chosen]
        return cls(model, states, chosen, backend=backend, device=device, bn_sources=sources)

    @property
    def k(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        ts = ", ".join(f"{t:.3g}" for t in self.ts)
        return f"Ensemble(k={self.k}, ts=[{ts}], backend={self.backend!r})"

    @torch.no_grad()
    def member_log_probs(self, inputs: Tensor, *, batch_size: int = 256) -> Tensor:
        """Each member's log-probabilities, ``(K, N, C)`` on the CPU."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = []
        for begin in range(0, len(inputs), batch_size):
            x = inputs[begin : begin + batch_size].to(self.device)  # (B, *input_shape)
            chunks.append(self._forward(x).cpu())  # (K, B, C)
        return torch.cat(chunks, dim=1)

    def _forward(self, x: Tensor) -> Tensor:
        if self.backend == "vmap":
            if self._stacked is None:
                self._stacked = stack_nodes([dict(m.state_dict()) for m in self.members])
            base = self._base

            def one(state: StateDict) -> Tensor:
                return F.log_softmax(functional_call(base, state, (x,)), -1)  # (B, C)

            return torch.func.vmap(one)(self._stacked)  # (K, B, C)
        return torch.stack([F.log_softmax(m(x), -1) for m in self.members])  # (K, B, C)

    def predict(self, inputs: Tensor, *, batch_size: int = 256) -> EnsemblePrediction:
        """Mean of the members' softmax and the per-input uncertainty."""
        member = self.member_log_probs(inputs, batch_size=batch_size)  # (K, N, C)
        _, log_probs, uncertainty = ensemble_statistics(member)
        return EnsemblePrediction(log_probs, uncertainty, member, self.ts)


def ensemble_predict(
    artifact: PathArtifact | str | os.PathLike,
    inputs: Tensor,
    k: int | None = None,
    *,
    ts: Sequence[float] | None = None,
    spacing: Spacing = "t",
    bn_inputs: Tensor | None = None,
    bn: BnChoice = "auto",
    device: torch.device | str | None = None,
) -> EnsemblePrediction:
    """One call: build the ensemble along ``artifact``'s path and predict ``inputs``."""
    ensemble = Ensemble.from_artifact(
        artifact, k, ts=ts, spacing=spacing, inputs=bn_inputs, bn=bn, device=device
    )
    return ensemble.predict(inputs)


def evaluate_ensemble(
    artifact: PathArtifact | str | os.PathLike,
    data: Dataset,
    k: int | None = None,
    *,
    ts: Sequence[float] | None = None,
    spacing: Spacing = "t",
    bn: BnChoice = "auto",
    split: str = "test",
    device: torch.device | str | None = None,
) -> dict:
    """Accuracy, NLL, Brier, ECE, disagreement and mean uncertainty of the ensemble on a split.

    BatchNorm statistics are the stored ones for served t values and are recomputed on
    ``data``'s training inputs otherwise (``bn`` as in :func:`modeconn.merge.resolve_bn`).
    Also reports every member's accuracy and NLL.
    """
    x, y = data.split(split)
    ensemble = Ensemble.from_artifact(
        artifact, k, ts=ts, spacing=spacing, inputs=data.x_train, bn=bn, device=device
    )
    pred = ensemble.predict(x)
    probs = pred.probs  # (N, C)
    member_labels = pred.member_log_probs.argmax(-1)  # (K, N)
    return {
        "k": ensemble.k,
        "ts": list(ensemble.ts),
        "spacing": spacing if ts is None else "given",
        "split": split,
        "accuracy": float((pred.labels == y).float().mean()),
        "nll": float(F.nll_loss(pred.log_probs, y)),
        "brier": brier(probs, y),
        "ece": ece(probs, y),
        "disagreement": float(pred.disagreement.mean()),
        "entropy": float(pred.entropy.mean()),
        "mutual_information": float(pred.mutual_information.mean()),
        "member_accuracy": [float((lab == y).float().mean()) for lab in member_labels],
        "member_nll": [float(F.nll_loss(lp, y)) for lp in pred.member_log_probs],
        "bn": list(ensemble.bn_sources),
    }
