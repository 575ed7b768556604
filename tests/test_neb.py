"""NEB and AutoNEB (Draxler et al. 2018): geometry, analytic landscapes, digits MLPs, resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from landscapes import muller_brown, newton_stationary, ring

from modeconn.evaluate import evaluate_energy_path
from modeconn.fit.configs import DEFAULT_CYCLES, AutoNEBConfig, CycleConfig
from modeconn.fit.connect import connect
from modeconn.fit.methods import load_config, make_config
from modeconn.fit.neb import arc_positions, improved_tangents, project_out, respace

F64 = torch.float64


@pytest.fixture(scope="module")
def mb_neb(mb_points):
    """NEB with every default between the two deepest Muller-Brown minima."""
    m_a, m_c, _ = mb_points
    stats: dict = {}
    return connect(muller_brown, m_a, m_c, method="neb", stats=stats), stats


def _peak(energy, path, points: int = 2001) -> float:
    return evaluate_energy_path(energy, path, points=points)["barrier"]["peak"]


# ---------------------------------------------------------------------------------------------
# Geometry


def test_improved_tangent_points_to_the_higher_neighbour_and_blends_at_extrema():
    chain = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]], dtype=F64)
    up = improved_tangents(chain, torch.tensor([0.0, 1.0, 2.0], dtype=F64))
    assert torch.allclose(up, torch.tensor([[0.0, 1.0]], dtype=F64))  # w2 - w1, normalised
    down = improved_tangents(chain, torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    assert torch.allclose(down, torch.tensor([[1.0, 0.0]], dtype=F64))  # w1 - w0
    # A maximum at w1: dV_max = 3 towards w2 (the higher neighbour), dV_min = 1 towards w0.
    peak = improved_tangents(chain, torch.tensor([2.0, 3.0, 0.0], dtype=F64))
    blend = 1.0 * torch.tensor([0.0, 2.0]) + 3.0 * torch.tensor([1.0, 0.0])  # tau+ 1 + tau- 3
    assert torch.allclose(peak[0], (blend / blend.norm()).to(F64))
    low = improved_tangents(chain, torch.tensor([2.0, 0.0, 3.0], dtype=F64))
    blend = 3.0 * torch.tensor([0.0, 2.0]) + 2.0 * torch.tensor([1.0, 0.0])
    assert torch.allclose(low[0], (blend / blend.norm()).to(F64))


def test_projection_removes_the_component_along_the_tangent():
    g = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    tau = torch.randn(5, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    perp = project_out(g, 3.0 * tau)  # scale-free in the tangent
    assert torch.allclose((perp * tau).sum(1), torch.zeros(5, dtype=F64), atol=1e-12)
    assert torch.allclose(project_out(perp, tau), perp)


def test_respace_puts_pivots_at_their_arc_length_shares():
    # An L-shaped polyline of length 2 with bunched pivots.
    chain = torch.tensor([[0, 0], [0.1, 0], [0.2, 0], [1, 0], [1, 1]], dtype=F64)
    even = respace(chain, torch.ones(4, dtype=F64))
    assert torch.allclose(
        even, torch.tensor([[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1]], dtype=F64)
    )
    weighted = respace(chain, torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=F64))  # shares of 8
    assert torch.allclose(weighted[1:4], torch.tensor([[0.25, 0], [0.5, 0], [0.75, 0]], dtype=F64))
    pos = arc_positions(even)
    assert torch.allclose(pos, torch.tensor([0, 0.5, 1.0, 1.5, 2.0], dtype=F64))
    # In place, as the fitter uses it.
    copy = chain.clone()
    respace(copy, torch.ones(4, dtype=F64), out=copy)
    assert torch.allclose(copy, even)


# ---------------------------------------------------------------------------------------------
# The seed's ring


@pytest.mark.parametrize("nodes", [5, 9])
def test_neb_on_the_ring_puts_pivots_on_the_circle(nodes):
    a, b = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64)
    stats: dict = {}
    path = connect(ring, a, b, method="neb", nodes=nodes, stats=stats)
    pivots = path.nodes["w"]  # (N, 2)
    assert torch.allclose(pivots.norm(dim=1), torch.ones(nodes, dtype=F64), atol=1e-8)
    # Evenly spaced on a half circle, the worst point of the chain lies midway between pivots:
    # radius cos(pi / (2(N-1))), loss sin^4(pi / (2(N-1))).
    expected = math.sin(math.pi / (2 * (nodes - 1))) ** 4
    assert _peak(ring, path, 4001) == pytest.approx(expected, rel=1e-6)
    assert stats["gradient_evaluations"] == stats["steps"] * (nodes - 2) == 1500 * (nodes - 2)
    # Knots at normalised arc length: equal chords, uniform knots.
    assert torch.allclose(path.knots(), torch.linspace(0, 1, nodes, dtype=F64), atol=1e-8)


def test_autoneb_on_the_ring_grows_the_chain_along_the_circle():
    a, b = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64)
    stats: dict = {}
    path = connect(ring, a, b, method="autoneb", stats=stats)
    pivots = path.nodes["w"]
    assert path.num_nodes > 9
    assert torch.allclose(pivots.norm(dim=1), torch.ones(path.num_nodes, dtype=F64), atol=1e-6)
    angles = torch.atan2(pivots[:, 1], pivots[:, 0]).abs()  # one half circle: 0 .. pi
    gaps = angles.diff()
    assert bool((gaps > 0).all())
    expected = float((gaps / 2).sin().pow(4).max())  # worst chord midpoint
    assert _peak(ring, path, 4001) == pytest.approx(expected, rel=1e-4)
    assert [c["num_nodes"] for c in stats["cycles"]][0] == 5  # the first cycle: 3 evenly
    assert stats["gradient_evaluations"] == sum(
        c.steps * (n - 2) for c, n in zip(AutoNEBConfig().schedule(100), _nodes(stats))
    )


def _nodes(stats: dict) -> list[int]:
    return [c["num_nodes"] for c in stats["cycles"]]


# ---------------------------------------------------------------------------------------------
# Muller-Brown: the highest point of the path is the saddle


def test_neb_finds_the_muller_brown_saddle(mb_points, mb_neb):
    m_a, m_c, saddle = mb_points
    e_saddle = float(muller_brown(saddle))
    straight = _peak(muller_brown, connect(muller_brown, m_a, m_c, method="linear"))
    assert straight > e_saddle + 10  # the straight line climbs well over the saddle
    path, stats = mb_neb
    assert _peak(muller_brown, path) == pytest.approx(e_saddle, abs=0.1)  # of a 106 barrier
    assert stats["gradient_evaluations"] == 1500 * 7
    # The chain passes through the intermediate minimum (-0.05, 0.47) on the way.
    pivots = path.nodes["w"]
    m_b = newton_stationary(muller_brown, [-0.05, 0.47])
    assert float((pivots - m_b).norm(dim=1).min()) < 0.15


def test_autoneb_finds_the_muller_brown_saddle(mb_points):
    m_a, m_c, saddle = mb_points
    e_saddle = float(muller_brown(saddle))
    stats: dict = {}
    path = connect(muller_brown, m_a, m_c, method="autoneb", stats=stats)
    assert _peak(muller_brown, path) == pytest.approx(e_saddle, abs=0.5)
    assert stats["barrier"] == pytest.approx(e_saddle - 0.5 * (-146.700 - 108.167), abs=0.5)
    # A finer insertion threshold puts pivots right around the saddle.
    fine = connect(muller_brown, m_a, m_c, method="autoneb", insert_threshold=0.02)
    assert _peak(muller_brown, fine) == pytest.approx(e_saddle, abs=0.01)
    pivots = fine.nodes["w"]
    assert float((pivots - saddle).norm(dim=1).min()) < 0.05


@pytest.mark.parametrize("scale", [1e-2, 1e3])
def test_default_step_is_scale_free(mb_points, mb_neb, scale):
    """The same surface times 1e-2 or 1e3 (gradients ~1e-2 .. 1e5): the same path, no tuning."""
    m_a, m_c, saddle = mb_points
    e_saddle = float(muller_brown(saddle))

    def scaled(w):
        return muller_brown(w, scale)

    path = connect(scaled, m_a, m_c, method="neb")
    assert _peak(muller_brown, path) == pytest.approx(e_saddle, abs=0.1)
    assert torch.allclose(path.nodes["w"], mb_neb[0].nodes["w"], atol=1e-4)


def test_a_fixed_sgd_step_diverges_on_the_steep_surface_and_says_so(mb_points):
    m_a, m_c, _ = mb_points
    with pytest.raises(RuntimeError, match="non-finite.*lower the lr"):
        connect(lambda w: muller_brown(w, 1e3), m_a, m_c, method="neb", optimizer="sgd", lr=1e-3)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_schedules_validate_and_the_reference_schedule_ships():
    from importlib import resources

    ref = load_config(resources.files("modeconn") / "configs" / "autoneb_resnet20.yaml")
    cycles = ref.schedule(98)  # CIFAR-10 at batch 512; the file gives every cycle's steps
    assert len(cycles) == 14 and sum(c.steps for c in cycles) == 16_000
    assert {c.optimizer for c in cycles} == {"sgd"} and ref.batch_size == 512
    assert [c.lr for c in cycles] == [0.1] * 6 + [0.01] * 4 + [0.001] * 4
    assert 5 + 2 * 13 == ref.max_nodes == 31
    default = load_config(resources.files("modeconn") / "configs" / "autoneb_default.yaml")
    assert default.cycles == list(DEFAULT_CYCLES) == AutoNEBConfig().cycles
    with pytest.raises(ValueError, match="cycles.0.lr"):
        make_config("autoneb", cycles=[{"steps": 10, "lr": -1}])
    with pytest.raises(ValueError, match="first cycle must insert"):
        make_config("autoneb", cycles=[{"steps": 10, "lr": 0.1, "insert": "none"}])
    with pytest.raises(ValueError, match="stepz"):
        CycleConfig(steps=1, lr=1.0, stepz=3)


# ---------------------------------------------------------------------------------------------
# Digits MLPs


def _mlp_fit(mlp_pair, digits, method, **options):
    from modeconn.checkpoint import load_checkpoint
    from modeconn.evaluate import evaluate_path

    a, b = load_checkpoint(mlp_pair[0]), load_checkpoint(mlp_pair[1])
    model = a.build_model()
    stats: dict = {}
    path = connect(model, a.state, b.state, method, data=digits, stats=stats, **options)
    return path, evaluate_path(model, path, digits, points=31), stats


SMALL_SCHEDULE = [
    {"steps": 100, "lr": 3e-3, "insert": "equal", "insert_count": 3},
    {"steps": 100, "lr": 3e-3},
    {"steps": 100, "lr": 1e-3},
]


def test_autoneb_removes_most_of_the_barrier_between_digits_mlps(mlp_pair, digits):
    _, straight, _ = _mlp_fit(mlp_pair, digits, "linear")
    path, ev, stats = _mlp_fit(mlp_pair, digits, "autoneb", cycles=SMALL_SCHEDULE)
    before, after = straight.loss_barrier["mean"], ev.loss_barrier["mean"]
    assert before > 0.1
    assert after <= 0.2 * before, (before, after, stats["cycles"])
    assert path.num_nodes == stats["num_nodes"] >= 5
    assert stats["gradient_evaluations"] == sum(100 * (n - 2) for n in _nodes(stats))
    # Endpoints are the networks themselves.
    from modeconn.checkpoint import load_checkpoint

    a = load_checkpoint(mlp_pair[0])
    assert all(torch.equal(path.nodes[k][0], a.state[k]) for k in path.nodes)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_connects_with_autoneb_and_neb(mlp_pair, tmp_path, capsys):
    from modeconn.artifact import load_artifact
    from modeconn.cli import main

    config = tmp_path / "short.yaml"
    config.write_text(
        "eval_size: 512\ncycles:\n"
        "  - {steps: 20, lr: 0.003, insert: equal, insert_count: 1}\n"
        "  - {steps: 20, lr: 0.001, insert: highest, insert_count: 2}\n"
    )
    out = tmp_path / "aneb"
    argv = ["--quiet", "connect", *mlp_pair, "--method", "autoneb", "--out", str(out)]
    assert main([*argv, "--config", str(config), "--eval-points", "11"]) == 0
    artifact = load_artifact(out)
    stats = artifact.manifest.fit["stats"]
    assert artifact.manifest.method == "autoneb" and artifact.path.kind == "polychain"
    assert stats["gradient_evaluations"] == 20 * 1 + 20 * (artifact.path.num_nodes - 2)
    assert len(stats["cycles"]) == 2 and "barrier" in stats["cycles"][-1]
    assert json.loads(json.dumps(stats)) == stats  # JSON-able
    out2 = tmp_path / "neb"
    argv = ["--quiet", "connect", *mlp_pair, "--method", "neb", "--out", str(out2)]
    assert main([*argv, "--nodes", "4", "--steps", "10", "--eval-points", "0"]) == 0
    assert load_artifact(out2).path.num_nodes == 4
    capsys.readouterr()

    argv = ["--quiet", "connect", *mlp_pair, "--method", "autoneb", "--out", str(out)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cycles:\n  - {steps: 0, lr: 0.1}\n")
    assert main([*argv, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cycles.0.steps" in err and "greater than 0" in err
    bad.write_text("cycels: []\n")
    assert main([*argv, "--config", str(bad)]) == 2
    assert "cycels" in capsys.readouterr().err
