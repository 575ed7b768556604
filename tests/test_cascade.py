"""Cascades of path-ensemble members: order, stopping rules, and the full cascade is the ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeconn.cascade import StopRule, cascade_order, replay_cascade, run_cascade
from modeconn.ensemble import ensemble_statistics


def _member_probs(k: int = 5, n: int = 200, c: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, n, c)) * 3 + rng.normal(size=(k, n, c))  # members mostly agree
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def test_the_middle_runs_first_then_points_spread_along_t():
    ts = [0.0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0]
    order = cascade_order(ts)
    assert sorted(order) == list(range(8))
    assert order == [3, 7, 0, 5, 1, 2, 4, 6]  # 3/7 (nearest 0.5, the smaller of a tie), the far end
    assert cascade_order([0.2, 0.9]) == [0, 1] and cascade_order([]) == []


def test_a_cascade_that_never_stops_is_the_plain_ensemble():
    probs = _member_probs()
    result = replay_cascade(probs, StopRule("confidence", 1.0))
    assert (result.members_used == len(probs)).all() and result.mean_cost == len(probs)
    mean, uncertainty = _reference(probs)
    np.testing.assert_allclose(result.probs, mean, atol=1e-6)
    np.testing.assert_allclose(result.entropy, uncertainty[:, 0], atol=1e-5)
    np.testing.assert_allclose(result.mutual_information, uncertainty[:, 1], atol=1e-5)
    np.testing.assert_allclose(result.disagreement, uncertainty[:, 2], atol=1e-6)


def _reference(probs: np.ndarray):
    log_probs = torch.from_numpy(np.log(probs)).float()  # (K, n, C)
    mean_probs, _, uncertainty = ensemble_statistics(log_probs)
    return mean_probs.numpy(), uncertainty.numpy()


def test_each_input_leaves_with_the_mean_of_the_members_it_ran():
    probs = _member_probs(k=4, n=300)
    result = replay_cascade(probs, StopRule("confidence", 0.8))
    assert 1 < result.mean_cost < 4
    for m in range(1, 5):
        rows = np.flatnonzero(result.members_used == m)
        if not len(rows):
            continue
        np.testing.assert_allclose(result.probs[rows], probs[:m, rows].mean(axis=0), atol=1e-9)
        mean, uncertainty = _reference(probs[:m, rows])
        np.testing.assert_allclose(result.mutual_information[rows], uncertainty[:, 1], atol=1e-5)
        np.testing.assert_allclose(result.disagreement[rows], uncertainty[:, 2], atol=1e-6)
        running = [probs[:j, rows].mean(axis=0).max(axis=1) for j in range(1, m + 1)]
        assert (running[-1] >= 0.8).all() or m == 4  # it stopped because the rule held...
        for early in running[:-1]:
            assert (early < 0.8).all()  # ...and not before


def test_the_agree_rule_stops_when_the_first_members_agree():
    probs = _member_probs(k=5)
    result = replay_cascade(probs, StopRule("agree", 2))
    labels = probs.argmax(axis=2)  # (K, n)
    agree = labels[0] == labels[1]
    assert (result.members_used[agree] == 2).all()
    assert (result.members_used[~agree] > 2).all()


def test_a_lower_threshold_costs_less():
    probs = _member_probs(k=8, n=500)
    costs = [
        replay_cascade(probs, StopRule("confidence", th)).mean_cost
        for th in (0.0, 0.7, 0.9, 0.99, 1.0)
    ]
    assert costs[0] == 1.0 and costs[-1] == 8.0
    assert costs == sorted(costs)


def test_members_see_only_the_inputs_still_running():
    probs = _member_probs(k=3, n=50)
    seen: list[int] = []

    def member(k):
        def run(idx):
            seen.append(len(idx))
            return probs[k][idx]

        return run

    result = run_cascade([member(k) for k in range(3)], np.arange(50), StopRule("confidence", 0.9))
    assert seen[0] == 50 and seen == sorted(seen, reverse=True)
    assert sum(seen) == result.members_used.sum()


@pytest.mark.parametrize(
    "rule, threshold, message",
    [
        ("confidence", 1.5, "a probability in"),
        ("agree", 1, "an integer >= 2"),
        ("agree", 2.5, "an integer >= 2"),
        ("vote", 0.5, "unknown cascade rule"),
    ],
)
def test_bad_rules_are_refused(rule, threshold, message):
    with pytest.raises(ValueError, match=message):
        StopRule(rule, threshold)  # type: ignore[arg-type]
