"""Weight matching (Git Re-Basin, Ainsworth et al. 2022): recovers planted permutations on every
architecture, permutes BN statistics, never lowers its objective, fails loudly on a wrong spec,
and agrees with a slow, independent re-implementation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modeconn.matching import AlignmentResult, align_models, matching_keys, weight_matching
from modeconn.models import apply_permutation, create_model, random_permutation
from modeconn.models.infer import infer_spec

SHAPE = (1, 8, 8)  # digits
ARCHS = {
    "mlp": ("mlp", {"width": 64}),
    "cnn": ("cnn", {"channels": (8, 16), "norm": "bn"}),
    "resnet20-bn": ("resnet20", {"norm": "bn", "width": 1}),
    "resnet20-ln": ("resnet20", {"norm": "ln", "width": 1}),
}


def _model(arch: str, seed: int) -> nn.Module:
    """Random init, random norm affines and non-trivial BN running statistics, in eval mode."""
    name, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = create_model(name, SHAPE, 10, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.5
        model.train()
        for _ in range(3):
            model(torch.randn(32, *SHAPE, generator=gen))
    return model.eval()


def _spec(model: nn.Module, shape: tuple[int, ...] = SHAPE):
    return infer_spec(model, torch.zeros(2, *shape)).spec


def _plant(model: nn.Module, seed: int = 1, noise: float = 1e-3):
    """B = a random permutation of A, plus noise (relative 1e-3) on the parameters."""
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    spec = _spec(model)
    gen = torch.Generator().manual_seed(seed)
    planted = random_permutation(spec, state_a, gen)
    state_b = apply_permutation(state_a, spec, planted)
    params = {name for name, _ in model.named_parameters()}
    for key in params:
        value = state_b[key]
        state_b[key] = value + noise * value.std() * torch.randn(value.shape, generator=gen)
    return state_a, state_b, planted


@pytest.mark.parametrize("arch", list(ARCHS))
def test_recovers_planted_permutation(arch):
    model = _model(arch, seed=0)
    state_a, state_b, planted = _plant(model)
    probe = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(2))
    result = align_models(model, state_a, state_b, probe)
    assert isinstance(result, AlignmentResult)

    # B = A[p] along each axis, so the aligning permutation is exactly p's inverse.
    assert set(result.perms) == set(planted)
    for group, p in planted.items():
        assert torch.equal(result.perms[group], torch.argsort(p)), group
    for key, value in state_a.items():
        if value.is_floating_point():
            torch.testing.assert_close(result.state[key], value, atol=1e-2 * value.std(), rtol=0)
        if "running_" in key:
            # No noise on the buffers: BN statistics come back exactly, so they were permuted.
            assert torch.equal(result.state[key], value), key
            assert not torch.equal(state_b[key], value), key

    # The objective never decreases, and the last sweep is the one that found no gain.
    assert len(result.objective) == result.sweeps + 1
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(result.objective, result.objective[1:]))
    assert result.objective[-1] > result.objective[0]
    assert result.objective[-1] == pytest.approx(result.objective[-2])
    assert result.lsa_calls > 0 and result.seconds >= result.lsa_seconds >= 0


def test_identity_and_logging(caplog):
    model = _model("cnn", seed=0)
    state = model.state_dict()
    with caplog.at_level(logging.INFO, logger="modeconn.matching"):
        result = weight_matching(_spec(model), state, state)
    assert result.sweeps == 1
    for p in result.perms.values():
        assert torch.equal(p, torch.arange(len(p)))
    assert "sweep 1" in caplog.text


def test_seed_is_deterministic():
    a, b = _model("mlp", 0), _model("mlp", 1)
    spec = _spec(a)
    r1 = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    r2 = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    assert r1.objective == r2.objective
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)


def test_running_stats_are_not_matched():
    """Scrambling B's BN statistics must not change which permutation is found."""
    model = _model("cnn", seed=0)
    state_a, state_b, _ = _plant(model)
    scrambled = {
        k: (torch.rand_like(v) if "running_" in k and v.is_floating_point() else v)
        for k, v in state_b.items()
    }
    spec = _spec(model)
    r1 = weight_matching(spec, state_a, state_b)
    r2 = weight_matching(spec, state_a, scrambled)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)
    assert r1.objective == r2.objective


def test_wrong_spec_fails_loudly():
    model = _model("mlp", seed=0)
    state_a, state_b, _ = _plant(model)
    spec = _spec(model)
    # Group P_layers.0 permutes layer 0's outputs but not layer 1's inputs: not a symmetry.
    broken = {**spec, "layers.1.weight": (spec["layers.1.weight"][0], None)}
    probe = torch.randn(32, *SHAPE)
    with pytest.raises(RuntimeError, match="changes the network's outputs"):
        align_models(model, state_a, state_b, probe, spec=broken)


def test_bad_inputs_raise_value_error():
    a, b = _model("mlp", 0), create_model("mlp", SHAPE, 10, width=32)
    spec = _spec(a)
    with pytest.raises(ValueError, match="shape"):
        weight_matching(spec, a.state_dict(), b.state_dict())
    with pytest.raises(ValueError, match="head.bias"):
        weight_matching(
            {k: v for k, v in spec.items() if k != "head.bias"}, a.state_dict(), a.state_dict()
        )


# --- an independent, slow reference: plain loops over units, no shared helpers --------------


def _reference_weight_matching(layer_weights_a, layer_weights_b, max_iter=100, seed=0):
    """Weight matching for an MLP given as lists of (W, b) per layer, written from the paper.

    Hidden layer l has permutation P_l; W_l's rows are P_l and its columns P_{l-1}. The visiting
    order replays weight_matching's documented order (groups sorted by name, one torch.randperm
    draw per sweep from a generator seeded with ``seed``).
    """
    num_hidden = len(layer_weights_a) - 1
    names = sorted(f"P_layers.{i}" for i in range(num_hidden))
    widths = [len(layer_weights_a[i][1]) for i in range(num_hidden)]
    perms = [list(range(w)) for w in widths]
    wa = [(w.double().tolist(), b.double().tolist()) for w, b in layer_weights_a]
    wb = [(w.double().tolist(), b.double().tolist()) for w, b in layer_weights_b]

    def permuted_b(layer):
        """Layer ``layer`` of B with the current row/column permutations, as nested lists."""
        w, b = wb[layer]
        rows = perms[layer] if layer < num_hidden else list(range(len(w)))
        cols = perms[layer - 1] if layer > 0 else list(range(len(w[0])))
        return [[w[r][c] for c in cols] for r in rows], [b[r] for r in rows]

    def objective():
        total = 0.0
        for layer in range(num_hidden + 1):
            w, b = permuted_b(layer)
            for i in range(len(w)):
                total += sum(x * y for x, y in zip(wa[layer][0][i], w[i])) + wa[layer][1][i] * b[i]
        return total

    gen = torch.Generator().manual_seed(seed)
    history = [objective()]
    for _ in range(max_iter):
        improved = False
        for index in torch.randperm(num_hidden, generator=gen).tolist():
            layer = int(names[index].split(".")[1])
            n = widths[layer]
            cost = [[0.0] * n for _ in range(n)]
            # Rows of this layer's weight and bias, with its input permutation applied to B.
            w_a, b_a = wa[layer]
            w, b = wb[layer]
            cols = perms[layer - 1] if layer > 0 else list(range(len(w[0])))
            for i in range(n):
                for j in range(n):
                    cost[i][j] += sum(w_a[i][c] * w[j][cc] for c, cc in enumerate(cols))
                    cost[i][j] += b_a[i] * b[j]
            # Columns of the next layer's weight, with its output permutation applied to B.
            w_a, _ = wa[layer + 1]
            w, _ = wb[layer + 1]
            rows = perms[layer + 1] if layer + 1 < num_hidden else list(range(len(w)))
            for i in range(n):
                for j in range(n):
                    cost[i][j] += sum(w_a[r][i] * w[rr][j] for r, rr in enumerate(rows))
            c = np.array(cost)
            _, new = linear_sum_assignment(c, maximize=True)
            old_value = sum(c[i][perms[layer][i]] for i in range(n))
            new_value = sum(c[i][new[i]] for i in range(n))
            if new_value > old_value + 1e-10 * max(1.0, abs(old_value)):
                perms[layer] = [int(k) for k in new]
                improved = True
        history.append(objective())
        if not improved:
            break
    return perms, history


def test_matches_slow_reference():
    torch.manual_seed(0)
    a = create_model("mlp", (12,), 5, depth=3, width=10)
    torch.manual_seed(1)
    b = create_model("mlp", (12,), 5, depth=3, width=10)
    layers = lambda m: [(layer.weight, layer.bias) for layer in [*m.layers, m.head]]
    ref_perms, ref_objective = _reference_weight_matching(layers(a), layers(b), seed=4)
    result = weight_matching(_spec(a, (12,)), a.state_dict(), b.state_dict(), seed=4)
    assert result.objective == pytest.approx(ref_objective, rel=1e-9)
    assert result.objective[-1] > result.objective[0]
    for layer, perm in enumerate(ref_perms):
        assert result.perms[f"P_layers.{layer}"].tolist() == perm


# --- the fast paths give what the plain algorithm gives ---------------------------------------


def _direct_objective(state_a, state_b_permuted, keys) -> float:
    return sum(
        float(torch.vdot(state_a[k].double().reshape(-1), state_b_permuted[k].double().reshape(-1)))
        for k in keys
    )


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet20-bn"])
def test_tracked_objective_is_the_objective(arch):
    """The objective is tracked from the accepted gains, not recomputed: it must still be
    sum_k <A_k, pi(B)_k> (the CNN's flatten makes segments, the ResNet joins groups)."""
    a, b = _model(arch, 0).state_dict(), _model(arch, 1).state_dict()
    result = weight_matching(_spec(_model(arch, 0)), a, b)
    keys = matching_keys(a)
    assert result.sweeps > 1
    assert result.objective[0] == pytest.approx(_direct_objective(a, b, keys), rel=1e-12)
    assert result.objective[-1] == pytest.approx(_direct_objective(a, result.state, keys), rel=1e-9)


@pytest.mark.parametrize("arch", ["mlp", "resnet20-bn", "resnet20-ln"])
def test_matches_the_plain_reference(arch):
    """Same permutations as the benchmark's plain transcription of the paper's algorithm, which
    solves every group in every sweep (the library skips groups whose inputs did not move)."""
    from benchmarks.bench_align import reference_weight_matching

    a, b = _model(arch, 0).state_dict(), _model(arch, 1).state_dict()
    spec = _spec(_model(arch, 0))
    result = weight_matching(spec, a, b, seed=2)
    reference = reference_weight_matching(spec, a, b, seed=2)
    assert set(result.perms) == set(reference)
    for group, perm in reference.items():
        assert result.perms[group].tolist() == perm.tolist(), group
    assert result.lsa_calls <= result.sweeps * len(reference)


@pytest.mark.parametrize("arch", ["cnn", "resnet20-bn"])
@pytest.mark.parametrize("path", ["torch", "big"])
def test_every_cost_path_finds_the_same_permutations(arch, path, monkeypatch):
    """On the CPU small networks gather with numpy; elsewhere (CUDA) with torch, taken here by
    declining numpy. Networks above _FLOAT64_ELEMENTS are matched term by term in float32."""
    import modeconn.matching as matching

    model = _model(arch, seed=0)
    state_a, state_b, planted = _plant(model)
    spec = _spec(model)
    default = weight_matching(spec, state_a, state_b)
    if path == "torch":
        monkeypatch.setattr(matching, "_on_host", lambda *tensors: False)
    else:
        monkeypatch.setattr(matching, "_FLOAT64_ELEMENTS", 0)
    other = weight_matching(spec, state_a, state_b)
    for group, p in planted.items():
        assert torch.equal(default.perms[group], torch.argsort(p)), group
        assert torch.equal(other.perms[group], torch.argsort(p)), group
    assert other.objective == pytest.approx(
        default.objective, rel=1e-12 if path == "torch" else 1e-5
    )


def test_group_on_two_axes_of_one_tensor():
    """A group that permutes both axes of a tensor makes the objective quadratic in it: the
    objective is then recomputed after each sweep instead of tracked."""
    gen = torch.Generator().manual_seed(0)
    spec = {"w": ("P", "P"), "v": ("P", None)}
    state_a = {"w": torch.randn(6, 6, generator=gen), "v": torch.randn(6, 3, generator=gen)}
    state_b = apply_permutation(state_a, spec, {"P": torch.randperm(6, generator=gen)})
    state_b = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in state_b.items()}
    result = weight_matching(spec, state_a, state_b)
    permuted = apply_permutation(state_b, spec, result.perms)
    assert result.objective[-1] == pytest.approx(
        _direct_objective(state_a, permuted, ["w", "v"]), rel=1e-12
    )


# --- the command's barrier report ------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_files(tmp_path_factory) -> tuple[str, str]:
    """Two untrained digits CNNs with BatchNorm, saved as endpoints (the report needs no training)."""
    from modeconn.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("bn_files")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("cnn", SHAPE, 10, channels=[8, 16], norm="bn")
        save_checkpoint(folder / f"cnn_{seed}.safetensors", model, data="digits", seed=seed)
        files.append(str(folder / f"cnn_{seed}.safetensors"))
    return files[0], files[1]


def _align_cli(capsys, files, tmp_path, *extra: str) -> tuple[int, list[str], str]:
    from modeconn.cli import main

    code = main(["align", *files, "--out", str(tmp_path / "b.safetensors"), *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_align_report_is_quick_by_default_and_says_what_it_measured(bn_files, tmp_path, capsys):
    code, lines, _ = _align_cli(capsys, bn_files, tmp_path)
    assert code == 0
    (said,) = [line for line in lines if "report on each" in line]
    assert said.startswith("quick report") and "t = 0, 0.25, 0.5, 0.75, 1" in said
    assert "BN statistics (recomputed at each t) and train loss from 512 seeded of 1437" in said
    assert "test error on all 360 test inputs" in said and "--report full" in said
    barriers = [line for line in lines if "barrier" in line]
    assert [line.split(":")[0].split()[-1] for line in barriers] == ["before", "after"]

    code, lines, _ = _align_cli(capsys, bn_files, tmp_path, "--report", "full", "--points", "3")
    assert code == 0
    (said,) = [line for line in lines if "report on each" in line]
    assert said.startswith("full report") and "t = 0, 0.5, 1" in said
    assert "from all 1437 training inputs" in said
    assert len([line for line in lines if "barrier" in line]) == 2

    for extra in (["--report", "none"], ["--points", "0"]):
        code, lines, _ = _align_cli(capsys, bn_files, tmp_path, *extra)
        assert code == 0 and not [
            line for line in lines if "barrier" in line or "report on each" in line
        ]

    code, _, err = _align_cli(capsys, bn_files, tmp_path, "--points", "1")
    assert code == 2 and "--points must be 0 (no report) or >= 2" in err
