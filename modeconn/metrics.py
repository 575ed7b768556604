"""Metrics on predictive distributions, computed from logits or log-probabilities.

Everything works in log space (``log_softmax``, ``logsumexp``) so saturated softmax outputs give
finite values: ``log(softmax(x))`` underflows to ``-inf`` and turns a JSD into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "jsd_from_log_probs",
    "jsd_from_logits",
    "accuracy",
    "nll",
    "brier",
    "ece",
    "reliability",
    "classification_metrics",
    "disagreement",
    "barriers",
]


def jsd_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row, ``0.5 KL(p||m) + 0.5 KL(q||m)``, ``m = (p+q)/2``.

    Inputs ``(..., C)`` log-probabilities; output ``(...)`` in nats, within ``[0, log 2]``.
    """
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # (..., C)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # (...)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def jsd_from_logits(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    return jsd_from_log_probs(F.log_softmax(logits_p, -1), F.log_softmax(logits_q, -1))


def accuracy(log_probs: Tensor, labels: Tensor) -> float:
    return float((log_probs.argmax(-1) == labels).float().mean())


def nll(log_probs: Tensor, labels: Tensor) -> float:
    return float(F.nll_loss(log_probs, labels))


def barriers(
    values: Sequence[float] | Tensor, ts: Sequence[float] | Tensor | None = None
) -> dict[str, float]:
    """Barrier heights of a curve of losses (or errors) sampled along t from 0 to 1.

    ``mean``: ``max_t L(t) - (L(0) + L(1)) / 2`` (Git Re-Basin's definition, Ainsworth et al.
    2023); ``max``: ``max_t L(t) - max(L(0), L(1))`` (height above the worse endpoint);
    ``linear``: ``max_t L(t) - ((1 - t) L(0) + t L(1))``, the height above the chord between the
    endpoint losses (Entezari et al. 2022, *The Role of Permutation Invariance in Linear Mode
    Connectivity of Neural Networks*).

    ``mean`` can never fall below ``|L(1) - L(0)| / 2`` (the peak is at least the worse
    endpoint), so paths that stay near the chord all tie at that floor; ``linear`` is 0 for a
    path on or below the chord and keeps ranking them. ``ts`` are the t of ``values`` (the grid
    need not be uniform: an evaluation grid holds a path's knots too); without them the values
    are taken as evenly spaced. The chord joins the first and the last value.
    """
    v = torch.as_tensor(values, dtype=torch.float64)  # (T,)
    if v.ndim != 1 or v.numel() < 2:
        raise ValueError(
            f"a barrier needs a 1-D curve with the values at t=0 and t=1 at least, got shape "
            f"{tuple(v.shape)}"
        )
    if ts is None:
        t = torch.linspace(0.0, 1.0, v.numel(), dtype=torch.float64)  # (T,)
    else:
        t = torch.as_tensor(ts, dtype=torch.float64)
        if t.shape != v.shape:
            raise ValueError(
                f"ts must give one t per value: {tuple(t.shape)} ts for {v.numel()} values"
            )
        if not bool((t[1:] >= t[:-1]).all()) or not bool(t[-1] > t[0]):
            raise ValueError(f"ts must increase from the first to the last, got {t.tolist()}")
    s = (t - t[0]) / (t[-1] - t[0])  # (T,) position along the chord, 0 .. 1
    chord = (1.0 - s) * v[0] + s * v[-1]  # (T,)
    excess = v - chord  # (T,), 0 at both ends
    peak = float(v.max())
    return {
        "mean": peak - 0.5 * float(v[0] + v[-1]),
        "max": peak - float(torch.maximum(v[0], v[-1])),
        "linear": float(excess.max()),
        "peak": peak,
        "t_peak_index": int(v.argmax()),
        "t_linear_index": int(excess.argmax()),
    }


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over inputs of ``sum_c (p_c - onehot_c)^2`` (the multi-class Brier score, in [0, 2])."""
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)  # (N, C)
    return float((probs - onehot).pow(2).sum(-1).mean())


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin confidence, accuracy and count over ``bins`` equal-width confidence bins in (0, 1]."""
    confidence, predicted = probs.max(-1)  # (N,), (N,)
    correct = (predicted == labels).to(torch.float64)
    confidence = confidence.to(torch.float64)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (N,)
    count = torch.bincount(index, minlength=bins).to(torch.float64)  # (bins,)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    safe = count.clamp_min(1)
    return {
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
        "count": count.tolist(),
    }


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error: ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over 15 bins."""
    table = reliability(probs, labels, bins)
    n = sum(table["count"])
    return float(
        sum(
            c / n * abs(a - p)
            for c, a, p in zip(table["count"], table["accuracy"], table["confidence"])
            if c > 0
        )
    )


def classification_metrics(
    probs: Tensor, labels: Tensor, member_probs: Tensor | None = None
) -> dict[str, float]:
    """Accuracy, NLL, Brier, ECE (15 bins) of ``probs`` (N, C), and with ``member_probs``
    (K, N, C) the members' disagreement: the mean over inputs of the fraction of member pairs
    whose predicted labels differ."""
    log_probs = probs.clamp_min(1e-12).log()
    out = {
        "accuracy": accuracy(log_probs, labels),
        "nll": nll(log_probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
    }
    if member_probs is not None:
        out["disagreement"] = disagreement(member_probs)
    return out


def disagreement(member_probs: Tensor) -> float:
    """Mean over inputs of the fraction of member pairs that predict different labels (0 for K=1)."""
    k = member_probs.shape[0]
    if k < 2:
        return 0.0
    labels = member_probs.argmax(-1)  # (K, N)
    differ = (labels.unsqueeze(0) != labels.unsqueeze(1)).to(torch.float64)  # (K, K, N)
    return float(differ.sum(dim=(0, 1)).mean() / (k * (k - 1)))
