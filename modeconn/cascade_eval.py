"""Confidence cascades of a path artifact's members, run on torch, and their threshold sweep.

:mod:`modeconn.cascade` holds the model-free core (order, stopping rules, replay). Here the
members are the artifact's networks at K t values (:func:`modeconn.ensemble.choose_ts`, run in
:func:`modeconn.cascade.cascade_order`), with BatchNorm statistics as the ensemble code has
them (stored for served t, else recomputed on the artifact's subset of the training inputs).

* :func:`run_path_cascade`: the cascade itself; each member runs only on the inputs still in it.
* :func:`cascade_member_probs`: every member's probabilities on a split, once, in cascade order.
* :func:`sweep_cascade`: accuracy, NLL, Brier and ECE against the average cost (members run per
  input, in single-model units) for a list of thresholds, beside the plain ensembles of the
  first 1..K members in cascade order (a plain K-member ensemble costs K).
* :func:`suggest_threshold`: the cheapest threshold within ``tolerance`` of the full K-member
  ensemble (by default: its labels agree with the full ensemble's on all but ``tolerance`` of
  the inputs, so its accuracy is within ``tolerance`` too), chosen on one seeded half of the
  inputs and reported on the other half, so the figure is not measured on the data the
  threshold was chosen on.

Wang et al., "Wisdom of Committees: An Overlooked Approach to Faster and More Accurate Models"
(ICLR 2022) cascade ensembles this way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from modeconn.artifact import PathArtifact
from modeconn.cascade import CascadeResult, StopRule, cascade_order, replay_cascade, run_cascade
from modeconn.data import Dataset
from modeconn.ensemble import Ensemble, choose_ts
from modeconn.merge import as_artifact
from modeconn.metrics import classification_metrics

__all__ = [
    "CascadePoint",
    "Suggestion",
    "CascadeSweep",
    "DEFAULT_THRESHOLDS",
    "default_thresholds",
    "cascade_ensemble",
    "run_path_cascade",
    "cascade_member_probs",
    "sweep_cascade",
    "suggest_threshold",
]

#: The confidence rule's default sweep (the agree rule's: 2..K members).
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def default_thresholds(rule: str, k: int) -> list[float]:
    """The thresholds swept by default: :data:`DEFAULT_THRESHOLDS`, or 2..K for ``agree``."""
    if rule == "agree":
        return [float(n) for n in range(2, max(k, 2) + 1)]
    return list(DEFAULT_THRESHOLDS)


@dataclass(frozen=True)
class CascadePoint:
    """One point of a cost/quality curve: a cascade threshold or a plain K-member ensemble."""

    label: str
    threshold: float | None  # None for a plain ensemble
    k: int
    cost: float  # members run per input, on average
    accuracy: float
    nll: float
    brier: float
    ece: float
    members_used: list[int]  # inputs that left after 1, 2, ..., K members

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Suggestion:
    """The cheapest threshold within ``tolerance`` of the full ensemble's accuracy on the
    ``choose`` half, and what it and the full ensemble give on the other (``report``) half."""

    threshold: float
    rule: str
    by: str  # "agreement" or "accuracy": what had to hold on the choosing half
    tolerance: float
    seed: int
    choose_n: int
    report_n: int
    accuracy: float  # on the report half
    full_accuracy: float  # the K-member ensemble, on the report half
    agreement: float  # share of the report half where its label is the full ensemble's
    cost: float  # on the report half
    choose_accuracy: float
    choose_full_accuracy: float
    choose_cost: float

    @property
    def within(self) -> bool:
        """Whether the held-out accuracy is within ``tolerance`` of the full ensemble's."""
        return self.accuracy >= self.full_accuracy - self.tolerance - 1e-12

    def to_json(self) -> dict:
        return {**asdict(self), "within": self.within}


@dataclass(frozen=True)
class CascadeSweep:
    """A threshold sweep on one split, and the plain ensembles of the first 1..K members."""

    rule: str
    k: int
    ts: tuple[float, ...]  # in cascade order
    cascade: list[CascadePoint]
    plain: list[CascadePoint]
    suggestion: Suggestion | None

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "k": self.k,
            "ts": list(self.ts),
            "plain_members": "the first K members in cascade order",
            "cascade": [p.to_json() for p in self.cascade],
            "plain": [p.to_json() for p in self.plain],
            "suggestion": None if self.suggestion is None else self.suggestion.to_json(),
        }


def cascade_ensemble(
    artifact: PathArtifact | str | os.PathLike,
    k: int,
    *,
    bn_inputs: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Ensemble:
    """The K-member ensemble along the path (t as :func:`choose_ts`), members in cascade order.

    ``bn_inputs``: training inputs to recompute BatchNorm statistics from (the artifact's own
    subset of them is used) where it stores none for a t.
    """
    artifact = as_artifact(artifact)
    ts = choose_ts(artifact.path, k)
    ordered = [ts[i] for i in cascade_order(ts)]
    return Ensemble.from_artifact(artifact, ts=ordered, inputs=bn_inputs, device=device)


def _member_fn(ensemble: Ensemble, i: int, x: Tensor) -> Callable[[np.ndarray], np.ndarray]:
    """Member ``i`` as a cascade callable: indices into ``x`` (m,) -> probabilities (m, C)."""
    member = ensemble.members[i]

    @torch.no_grad()
    def run(idx: np.ndarray) -> np.ndarray:
        out = []
        for begin in range(0, len(idx), 256):
            rows = torch.from_numpy(np.asarray(idx[begin : begin + 256], dtype=np.int64))
            batch = x[rows].to(ensemble.device)  # (B, *input_shape)
            out.append(torch.softmax(member(batch), -1).double().cpu())  # (B, C)
        return torch.cat(out).numpy() if out else np.zeros((0, 0))

    return run


def run_path_cascade(
    artifact: PathArtifact | str | os.PathLike,
    inputs: Tensor,
    k: int = 8,
    rule: StopRule | None = None,
    *,
    bn_inputs: Tensor | None = None,
    device: torch.device | str | None = None,
) -> CascadeResult:
    """Run the cascade of ``rule`` over the K members of ``artifact``'s path on ``inputs``.

    Members run one at a time in cascade order, each only on the inputs still in the cascade.
    Per input: the mean probabilities over the members run, how many ran, entropy, mutual
    information and disagreement (:class:`modeconn.cascade.CascadeResult`).
    """
    rule = rule or StopRule()
    ensemble = cascade_ensemble(artifact, k, bn_inputs=bn_inputs, device=device)
    members = [_member_fn(ensemble, i, inputs) for i in range(ensemble.k)]
    return run_cascade(members, np.arange(len(inputs)), rule)


def cascade_member_probs(
    artifact: PathArtifact | str | os.PathLike,
    data: Dataset,
    k: int = 8,
    *,
    split: str = "test",
    device: torch.device | str | None = None,
) -> tuple[tuple[float, ...], np.ndarray]:
    """Every member's probabilities on ``data``'s ``split``, computed once: the members' t in
    cascade order and ``(K, N, C)`` float64 probabilities in that order."""
    ensemble = cascade_ensemble(artifact, k, bn_inputs=data.x_train, device=device)
    x, _ = data.split(split)
    probs = ensemble.member_log_probs(x).double().exp()  # (K, N, C)
    return ensemble.ts, probs.numpy()


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return classification_metrics(torch.from_numpy(probs), torch.from_numpy(labels))


def _histogram(used: np.ndarray, k: int) -> list[int]:
    return np.bincount(used, minlength=k + 1)[1 : k + 1].tolist()


def _point(label: str, threshold, k: int, probs, used: np.ndarray, labels) -> CascadePoint:
    m = _metrics(probs, labels)
    return CascadePoint(
        label=label,
        threshold=threshold,
        k=k,
        cost=float(used.mean()) if len(used) else 0.0,
        accuracy=m["accuracy"],
        nll=m["nll"],
        brier=m["brier"],
        ece=m["ece"],
        members_used=_histogram(used, k),
    )


def _cascade_points(member_probs, labels, rule: str, thresholds) -> list[CascadePoint]:
    k = member_probs.shape[0]
    points = []
    for th in thresholds:
        stop = StopRule(rule, th)  # type: ignore[arg-type]
        result = replay_cascade(member_probs, stop)
        points.append(
            _point(stop.describe(), float(th), k, result.probs, result.members_used, labels)
        )
    return points


def _check(member_probs: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    member_probs = np.asarray(member_probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if member_probs.ndim != 3 or member_probs.shape[1] != len(labels):
        raise ValueError(
            f"member probabilities must be (K, N, C) for N = {len(labels)} labels, got "
            f"{member_probs.shape}"
        )
    return member_probs, labels


def _check_thresholds(rule: str, thresholds: Sequence[float]) -> list[float]:
    values = [float(th) for th in thresholds]
    if not values:
        raise ValueError("give at least one cascade threshold")
    for th in values:
        StopRule(rule, th)  # type: ignore[arg-type]  # raises on a bad rule or threshold
    return sorted(set(values))


def suggest_threshold(
    member_probs: np.ndarray,
    labels: np.ndarray | Tensor,
    rule: str = "confidence",
    thresholds: Sequence[float] | None = None,
    *,
    tolerance: float = 0.001,
    seed: int = 0,
    by: Literal["agreement", "accuracy"] = "agreement",
) -> Suggestion | None:
    """The cheapest threshold whose accuracy is within ``tolerance`` (0.001: 0.1 point) of the
    full K-member ensemble's, chosen on one seeded half of the inputs and reported on the other.

    ``by="agreement"`` (the default) asks more on the choosing half: the cascade's labels agree
    with the full ensemble's on at least ``1 - tolerance`` of it, which bounds the accuracy gap
    by ``tolerance`` on any labels; a cascade whose errors merely cancel there does not pass.
    ``by="accuracy"``: the accuracy gap alone. Either way the lowest threshold such that it
    *and every higher one* pass: on a few hundred inputs the curve against the threshold is
    noisy, and a lucky low threshold past one that fell short is not trusted. None when even
    the highest threshold fails, or there are < 2 inputs.
    """
    if by not in ("agreement", "accuracy"):
        raise ValueError(f"by must be 'agreement' or 'accuracy', got {by!r}")
    member_probs, labels = _check(member_probs, labels)
    k, n = member_probs.shape[:2]
    values = _check_thresholds(rule, thresholds or default_thresholds(rule, k))
    if n < 2:
        return None
    order = np.random.default_rng(seed).permutation(n)
    choose, report = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
    probs_c, labels_c = member_probs[:, choose], labels[choose]
    full_labels = probs_c.mean(0).argmax(1)  # (n/2,)
    full_choose = float((full_labels == labels_c).mean())
    best: tuple[float, float, float] | None = None  # threshold, accuracy, cost
    for th in reversed(values):
        result = replay_cascade(probs_c, StopRule(rule, th))  # type: ignore[arg-type]
        accuracy = float((result.labels == labels_c).mean())
        if by == "agreement":
            ok = float((result.labels == full_labels).mean()) >= 1.0 - tolerance - 1e-12
        else:
            ok = accuracy >= full_choose - tolerance - 1e-12
        if not ok:
            break
        best = (th, accuracy, result.mean_cost)
    if best is None:
        return None
    threshold, choose_accuracy, choose_cost = best
    probs_r, labels_r = member_probs[:, report], labels[report]
    held = replay_cascade(probs_r, StopRule(rule, threshold))  # type: ignore[arg-type]
    full_r = probs_r.mean(0).argmax(1)
    return Suggestion(
        threshold=threshold,
        rule=rule,
        by=by,
        tolerance=tolerance,
        seed=seed,
        choose_n=len(choose),
        report_n=len(report),
        accuracy=float((held.labels == labels_r).mean()),
        full_accuracy=float((full_r == labels_r).mean()),
        agreement=float((held.labels == full_r).mean()),
        cost=held.mean_cost,
        choose_accuracy=choose_accuracy,
        choose_full_accuracy=full_choose,
        choose_cost=choose_cost,
    )


def sweep_cascade(
    member_probs: np.ndarray,
    labels: np.ndarray | Tensor,
    rule: str = "confidence",
    thresholds: Sequence[float] | None = None,
    *,
    ts: Sequence[float] = (),
    tolerance: float = 0.001,
    seed: int = 0,
    by: Literal["agreement", "accuracy"] = "agreement",
) -> CascadeSweep:
    """The cascade replayed at every threshold on all inputs, the plain ensembles of the first
    1..K members (cascade order), and :func:`suggest_threshold`'s held-out suggestion.

    ``member_probs`` ``(K, N, C)`` are in cascade order (:func:`cascade_member_probs`).
    """
    member_probs, labels = _check(member_probs, labels)
    k = member_probs.shape[0]
    values = _check_thresholds(rule, thresholds or default_thresholds(rule, k))
    cascade = _cascade_points(member_probs, labels, rule, values)
    n = member_probs.shape[1]
    plain = [
        _point(f"plain K={j}", None, k, member_probs[:j].mean(0), np.full(n, j), labels)
        for j in range(1, k + 1)
    ]
    suggestion = suggest_threshold(
        member_probs, labels, rule, values, tolerance=tolerance, seed=seed, by=by
    )
    return CascadeSweep(rule, k, tuple(float(t) for t in ts), cascade, plain, suggestion)
