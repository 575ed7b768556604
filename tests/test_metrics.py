"""Metrics against values computed by hand on tiny inputs."""

import math

import pytest
import torch

from modeconn.metrics import (
    barriers,
    brier,
    classification_metrics,
    disagreement,
    ece,
    jsd_from_log_probs,
    jsd_from_logits,
    reliability,
)


def test_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    # row 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; row 1: 0.25 + 0.25 + 1 = 1.5
    assert brier(probs, labels) == pytest.approx((0.14 + 1.5) / 2)


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.35 (right)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins of width 1/15: 0.9 -> bin 13 (acc 0.5), 0.6 -> bin 8 (acc 1), 0.65 -> bin 9 (acc 1)
    want = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.6) + 1 / 4 * abs(1 - 0.65)
    assert ece(probs, labels) == pytest.approx(want)
    table = reliability(probs, labels)
    assert table["count"][13] == 2 and table["accuracy"][13] == 0.5
    assert sum(table["count"]) == 4


def test_perfectly_calibrated_and_confident_predictions():
    probs = torch.eye(4)
    labels = torch.arange(4)
    assert ece(probs, labels) == pytest.approx(0.0)
    assert brier(probs, labels) == pytest.approx(0.0)
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 1.0 and m["nll"] == pytest.approx(0.0, abs=1e-6)


def test_disagreement_by_hand():
    # 3 members, 2 inputs; input 0: labels (0, 0, 1) -> 4 of 6 ordered pairs differ; input 1: all agree
    member = torch.tensor(
        [[[0.9, 0.1], [0.2, 0.8]], [[0.8, 0.2], [0.1, 0.9]], [[0.3, 0.7], [0.4, 0.6]]]
    )
    assert disagreement(member) == pytest.approx((4 / 6 + 0) / 2)
    assert disagreement(member[:1]) == 0.0


def test_jsd_properties():
    logits_p, logits_q = torch.randn(5, 10), torch.randn(5, 10)
    assert torch.allclose(jsd_from_logits(logits_p, logits_p), torch.zeros(5), atol=1e-7)
    assert torch.allclose(jsd_from_logits(logits_p, logits_q), jsd_from_logits(logits_q, logits_p))
    saturated = jsd_from_logits(torch.tensor([[1e4, -1e4]]), torch.tensor([[-1e4, 1e4]]))
    assert torch.isfinite(saturated).all()
    assert float(saturated) == pytest.approx(math.log(2), rel=1e-5)
    # by hand: p = (1, 0), q = (0.5, 0.5) -> m = (0.75, 0.25)
    p = torch.tensor([1.0, 0.0]).clamp_min(1e-30).log()
    q = torch.tensor([0.5, 0.5]).log()
    want = 0.5 * math.log(1 / 0.75) + 0.5 * (
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    )
    assert float(jsd_from_log_probs(p, q)) == pytest.approx(want, rel=1e-6)


def test_barriers_every_definition():
    b = barriers([0.1, 0.5, 0.3])
    assert b["mean"] == pytest.approx(0.5 - 0.2)
    assert b["max"] == pytest.approx(0.5 - 0.3)
    assert b["linear"] == pytest.approx(0.5 - 0.2)  # the chord at t=0.5 is the mean
    assert b["t_peak_index"] == b["t_linear_index"] == 1
    with pytest.raises(ValueError):
        barriers([1.0])


def test_linear_barrier_ranks_paths_that_tie_on_the_mean_endpoint_barrier():
    # endpoints 1.0 and 0.0: the mean-endpoint barrier is at least 0.5 for every path
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    on_chord = [1.0, 0.75, 0.5, 0.25, 0.0]  # L(t) = 1 - t
    plateau = [1.0, 1.0, 1.0, 0.5, 0.0]  # stays at L(0) until t=0.5, then falls
    a, b = barriers(on_chord, ts=ts), barriers(plateau, ts=ts)
    assert a["mean"] == b["mean"] == pytest.approx(0.5)  # a tie: both at the floor
    assert a["max"] == b["max"] == pytest.approx(0.0)  # another tie
    assert a["linear"] == pytest.approx(0.0)
    assert b["linear"] == pytest.approx(1.0 - 0.5)  # at t=0.5 the chord is 0.5
    assert b["t_linear_index"] == 2


def test_linear_barrier_by_hand_on_uneven_grids_and_dips():
    # an evaluation grid holds a path's knots, so the t are not evenly spaced
    ts = [0.0, 0.1, 0.25, 1.0]
    values = [0.0, 0.3, 0.75, 2.0]
    # chord 2t: excess 0.3 - 0.2 = 0.1 at t=0.1, 0.75 - 0.5 = 0.25 at t=0.25
    b = barriers(values, ts=ts)
    assert b["linear"] == pytest.approx(0.25) and b["t_linear_index"] == 2
    # taken as evenly spaced (t = 0, 1/3, 2/3, 1) the same values lie below the chord
    assert barriers(values)["linear"] == pytest.approx(0.0)
    assert barriers(torch.tensor(values), ts=torch.tensor(ts))["linear"] == pytest.approx(0.25)
    # a path below its chord everywhere: 0 (the endpoints), never negative
    assert barriers([1.0, 0.2, 0.1, 1.0])["linear"] == 0.0
    # the chord joins the first and last values whatever their t (an FGE point set's knots)
    assert barriers([1.0, 3.0, 2.0], ts=[0.2, 0.4, 1.0])["linear"] == pytest.approx(3.0 - 1.25)


@pytest.mark.parametrize(
    ("values", "ts", "message"),
    [
        ([0.0, 1.0, 0.0], [0.0, 1.0], "one t per value"),
        ([0.0, 1.0, 0.0], [0.0, 0.7, 0.5], "increase"),
        ([0.0, 1.0], [0.5, 0.5], "increase"),
        ([[0.0, 1.0], [1.0, 0.0]], None, "1-D"),
    ],
)
def test_barriers_refuse_bad_grids(values, ts, message):
    with pytest.raises(ValueError, match=message):
        barriers(values, ts=ts)
