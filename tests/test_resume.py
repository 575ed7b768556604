"""The resume contract, for every method of the table: a fit interrupted at any step and
continued with ``resume`` ends bitwise identical to an uninterrupted one, with the same
statistics; a state written by a different fit is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modeconn.checkpoint import load_checkpoint
from modeconn.fit.connect import connect
from modeconn.fit.methods import METHODS
from modeconn.io import load_tensors

# Options per method: small budgets, saves every few steps (digits: 11 steps an epoch).
MODEL_CASES = {
    "bezier": dict(epochs=3, nodes=4, seed=2),
    "polychain": dict(epochs=3, nodes=4, seed=2),
    "neb": dict(nodes=5, steps=30),
    "autoneb": dict(
        cycles=[
            {"steps": 12, "lr": 3e-3, "insert": "equal", "insert_count": 2},
            {"steps": 12, "lr": 1e-3, "repeat": 2},
        ],
        engine="loop",
    ),
    "geodesic": dict(
        nodes=5, steps=30, batch_size=64, optimizer="adam", lr=1e-3, schedule="cosine"
    ),
    "geodesic-sgd-momentum": dict(nodes=5, steps=30, batch_size=64, lr=0.2, momentum=0.5),
    "fge": dict(cycles=3, cycle_epochs=1, seed=4),
}
# The same on an energy function (the ring), for the methods that take one.
ENERGY_CASES = {
    "bezier": dict(epochs=6, nodes=4, seed=2),
    "polychain": dict(epochs=6, nodes=4, seed=2),
    "neb": dict(nodes=6, steps=300, engine="loop"),
    "autoneb": dict(
        cycles=[
            {"steps": 60, "lr": 0.01, "insert": "equal", "insert_count": 3},
            {"steps": 60, "lr": 0.003, "repeat": 2},
        ],
        engine="loop",  # every pivot is one call of the energy: interrupt mid-cycle
    ),
    "fge": dict(cycles=3, cycle_epochs=1, lr1=0.01, lr2=1e-4),
}
A_RING = torch.tensor([1.0, 0.0])
B_RING = torch.tensor([-1.0, 0.0])


class _Killed(Exception):
    pass


def _method(case: str) -> str:
    return case.split("-")[0]


def test_every_method_has_a_resume_case():
    fitted = set(METHODS) - {"linear"}  # nothing to resume
    assert {_method(c) for c in MODEL_CASES} == fitted
    assert {_method(c) for c in ENERGY_CASES} == fitted - {"geodesic"}  # needs a model


def _same_paths(resumed, full) -> None:
    assert resumed.nodes.keys() == full.nodes.keys()
    for key, value in full.nodes.items():
        assert torch.equal(resumed.nodes[key], value), key
    assert torch.equal(resumed.knots(), full.knots())


def _same_stats(stats: dict, full: dict) -> None:
    for key in ("gradient_evaluations", "steps", "loss_history", "energy_history", "cycles",
                "length_before", "length_after", "members"):  # fmt: skip
        assert stats.get(key) == full.get(key), key


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_an_interrupted_model_fit_resumes_bitwise(case, mlp_pair, digits, tmp_path):
    method, options = _method(case), MODEL_CASES[case]
    a, b = load_checkpoint(mlp_pair[0]), load_checkpoint(mlp_pair[1])
    end = None if METHODS[method].endpoints == 1 else b.state
    calls = {"n": 0}

    def dies_at_batch_17(x, generator):  # the stream's augmentation hook: the data stops
        calls["n"] += 1
        if calls["n"] == 17:
            raise _Killed
        return x

    def fit(augment, **kwargs):
        data = dataclasses.replace(digits, augment=augment)
        return connect(a.build_model(), a.state, end, method, data=data, **{**options, **kwargs})

    full_stats: dict = {}
    full = fit(lambda x, g: x, stats=full_stats)
    state = tmp_path / "fit-state.safetensors"
    with pytest.raises(_Killed):
        fit(dies_at_batch_17, checkpoint=state, checkpoint_every=5)
    meta = load_tensors(state)[1]
    assert meta["method"] == method and meta["progress"]  # saved before the crash
    stats: dict = {}
    resumed = fit(lambda x, g: x, checkpoint=state, resume=True, checkpoint_every=5, stats=stats)
    _same_paths(resumed, full)
    _same_stats(stats, full_stats)
    with pytest.raises(ValueError, match=f"different {method} fit .*different options: seed"):
        fit(lambda x, g: x, checkpoint=state, resume=True, seed=99)


@pytest.mark.parametrize("case", list(ENERGY_CASES))
def test_an_interrupted_energy_fit_resumes_bitwise(case, tmp_path):
    method, options = _method(case), ENERGY_CASES[case]
    end = None if METHODS[method].endpoints == 1 else B_RING
    calls = {"n": 0}

    def ring(w: torch.Tensor) -> torch.Tensor:
        return (w.pow(2).sum() - 1) ** 2

    def dies_at_call_250(w: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 250:
            raise _Killed
        return ring(w)

    full_stats: dict = {}
    full = connect(ring, A_RING, end, method, stats=full_stats, **options)
    state = tmp_path / "fit-state.safetensors"
    with pytest.raises(_Killed):
        connect(dies_at_call_250, A_RING, end, method, checkpoint=state, checkpoint_every=25,
                **options)  # fmt: skip
    stats: dict = {}
    resumed = connect(ring, A_RING, end, method, checkpoint=state, resume=True, stats=stats,
                      **options)  # fmt: skip
    _same_paths(resumed, full)
    _same_stats(stats, full_stats)
    with pytest.raises(ValueError, match=f"different {method} fit"):
        connect(ring, A_RING.flip(0), end, method, checkpoint=state, resume=True, **options)


def test_a_state_of_another_method_is_refused(tmp_path):
    state = tmp_path / "fit-state.safetensors"
    connect(lambda w: (w.pow(2).sum() - 1) ** 2, A_RING, B_RING, "bezier", epochs=1,
            checkpoint=state)  # fmt: skip
    with pytest.raises(ValueError, match="different bezier fit .method bezier, this fit is neb"):
        connect(lambda w: w.pow(2).sum(), A_RING, B_RING, "neb", checkpoint=state, resume=True)
