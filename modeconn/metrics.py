"""Metrics on predictive distributions, computed from logits or log-probabilities.

Everything works in log space (``log_softmax``, ``logsumexp``) so saturated softmax outputs give
finite values: ``log(softmax(x))`` underflows to ``-inf`` and turns a JSD into NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "jsd_from_log_probs",
    "jsd_from_logits",
    "accuracy",
    "nll",
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


def barriers(values: list[float] | Tensor) -> dict[str, float]:
    """Barrier heights of a curve of losses (or errors) sampled along t from 0 to 1.

    ``mean``: ``max_t L(t) - (L(0) + L(1)) / 2`` (Git Re-Basin's definition);
    ``max``: ``max_t L(t) - max(L(0), L(1))`` (height above the worse endpoint).
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.numel() < 2:
        raise ValueError(f"a barrier needs the values at t=0 and t=1 at least, got {v.numel()}")
    peak = float(v.max())
    return {
        "mean": peak - 0.5 * float(v[0] + v[-1]),
        "max": peak - float(torch.maximum(v[0], v[-1])),
        "peak": peak,
        "t_peak_index": int(v.argmax()),
    }
