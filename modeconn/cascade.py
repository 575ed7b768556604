"""Confidence cascades over the members of a path ensemble: easy inputs leave early.

The members of a K-point ensemble along a low-loss path run one at a time, in
:func:`cascade_order` (the point nearest the path's middle first, then points spread along t,
each as far in t from those already run as possible). After each member, every input still in
the cascade is tested by the :class:`StopRule` on the running mean of the probabilities so far;
those that pass leave with that mean, the rest go on to the next member. An input that passes
no test gets all K members: the plain ensemble. Wang et al. ("Wisdom of Committees", ICLR 2022)
show such cascades reach the full ensemble's accuracy at a fraction of its cost.

Rules (``threshold`` is the rule's parameter):

* ``confidence``: the running mean's largest probability is at least ``threshold`` (0..1).
* ``agree``: the first ``threshold`` members (an integer >= 2) all predict the same class.

Per input the cascade reports the members used and the usual uncertainty, over the members
that ran: predictive entropy, mutual information and disagreement (as in
:mod:`modeconn.ensemble`). NumPy only: the HTTP service runs it on its ONNX graphs, the library
on torch's outputs, the threshold sweep on stored probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

__all__ = [
    "RULES",
    "Rule",
    "StopRule",
    "CascadeResult",
    "cascade_order",
    "run_cascade",
    "replay_cascade",
]

#: The stop rules, by name.
Rule = Literal["confidence", "agree"]
RULES: tuple[str, ...] = get_args(Rule)
_EPS = 1e-12


@dataclass(frozen=True)
class StopRule:
    """When an input leaves the cascade: ``rule`` and its ``threshold`` (see the module doc)."""

    rule: Rule = "confidence"
    threshold: float = 0.95

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown cascade rule {self.rule!r}; expected one of {RULES}")
        if self.rule == "confidence" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"the confidence rule's threshold is a probability in [0, 1], got {self.threshold}"
            )
        if self.rule == "agree" and (self.threshold < 2 or self.threshold != int(self.threshold)):
            raise ValueError(
                "the agree rule's threshold is the number of members that must agree, an "
                f"integer >= 2, got {self.threshold}"
            )

    def done(self, mean: np.ndarray, votes: np.ndarray, ran: int) -> np.ndarray:
        """Which inputs stop after ``ran`` members: ``mean`` (n, C) running mean probabilities,
        ``votes`` (n, C) how many members so far predicted each class."""
        if self.rule == "confidence":
            return mean.max(axis=1) >= self.threshold
        if ran < self.threshold:
            return np.zeros(len(mean), dtype=bool)
        return votes.max(axis=1) == ran  # every member so far agrees

    def describe(self) -> str:
        if self.rule == "confidence":
            return f"confidence >= {self.threshold:g}"
        return f"the first {int(self.threshold)} members agree"


@dataclass
class CascadeResult:
    """Per input: mean probabilities over the members run, how many ran, and uncertainty."""

    probs: np.ndarray  # (n, C)
    members_used: np.ndarray  # (n,) int
    entropy: np.ndarray  # (n,)
    mutual_information: np.ndarray  # (n,)
    disagreement: np.ndarray  # (n,)

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def mean_cost(self) -> float:
        """Members run per input, on average: the cost in single-model units."""
        return float(self.members_used.mean()) if len(self.members_used) else 0.0


def cascade_order(ts: Sequence[float]) -> list[int]:
    """Indices of ``ts`` in the order a cascade runs them: the t nearest 0.5 first, then each
    time the t farthest from all chosen so far (ties: the smaller t)."""
    values = [float(t) for t in ts]
    if not values:
        return []
    # distances rounded, so that ties in exact arithmetic are ties here too
    order = [min(range(len(values)), key=lambda i: (round(abs(values[i] - 0.5), 9), values[i]))]
    while len(order) < len(values):
        rest = [i for i in range(len(values)) if i not in order]
        gap = {i: round(min(abs(values[i] - values[j]) for j in order), 9) for i in rest}
        order.append(max(rest, key=lambda i: (gap[i], -values[i])))
    return order


def run_cascade(
    members: Sequence[Callable[[np.ndarray], np.ndarray]],
    inputs: np.ndarray,
    rule: StopRule,
) -> CascadeResult:
    """Run ``members`` (already in cascade order) on ``inputs`` until ``rule`` stops each input.

    A member maps a batch of inputs (m, ...) to probabilities (m, C); it only ever sees the
    inputs still in the cascade.
    """
    if not members:
        raise ValueError("a cascade needs at least one member")
    n = len(inputs)
    active = np.arange(n)
    total: np.ndarray | None = None  # (n, C) sum of probabilities
    votes: np.ndarray | None = None  # (n, C) argmax counts
    entropy_sum = np.zeros(n)
    used = np.zeros(n, dtype=np.int64)
    for ran, member in enumerate(members, start=1):
        probs = np.asarray(member(inputs[active]), dtype=np.float64)  # (m, C)
        if probs.shape[0] != len(active):
            raise ValueError(
                f"cascade member {ran} returned {probs.shape[0]} rows for {len(active)} inputs"
            )
        if total is None or votes is None:
            total = np.zeros((n, probs.shape[1]))
            votes = np.zeros((n, probs.shape[1]), dtype=np.int64)
        total[active] += probs
        votes[active, probs.argmax(axis=1)] += 1
        entropy_sum[active] += _entropy(probs)
        used[active] = ran
        stop = rule.done(total[active] / ran, votes[active], ran)
        active = active[~stop]
        if len(active) == 0:
            break
    assert total is not None and votes is not None
    mean = total / np.maximum(used, 1)[:, None]
    entropy = _entropy(mean)
    pairs = used * (used - 1)
    differ = used**2 - (votes**2).sum(axis=1)  # ordered pairs of members whose labels differ
    return CascadeResult(
        probs=mean,
        members_used=used,
        entropy=entropy,
        mutual_information=np.maximum(entropy - entropy_sum / np.maximum(used, 1), 0.0),
        disagreement=np.where(pairs > 0, differ / np.maximum(pairs, 1), 0.0),
    )


def replay_cascade(member_probs: np.ndarray, rule: StopRule) -> CascadeResult:
    """The cascade of ``rule`` on stored outputs: ``member_probs`` (K, n, C), in cascade order.

    Gives exactly what :func:`run_cascade` gives on the members that produced them, at no
    model cost: how a threshold sweep is made.
    """
    member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim != 3:
        raise ValueError(f"member probabilities must be (K, n, C), got {member_probs.shape}")
    members = [lambda idx, p=p: p[idx] for p in member_probs]
    return run_cascade(members, np.arange(member_probs.shape[1]), rule)


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, _EPS, 1.0))).sum(axis=1)
