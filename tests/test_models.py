"""Every registered model: builds on digits- and CIFAR-shaped inputs, and the permutation spec
inferred from its graph equals the hand-written reference and is correct (a random permutation of
a state dict leaves eval-mode outputs unchanged)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import modeconn.models as models
from modeconn.models import (
    apply_permutation,
    create_model,
    list_models,
    random_permutation,
    register_model,
)
from modeconn.models.infer import infer_spec
from modeconn.models.spec import check_spec, group_sizes
from tests.reference_specs import canonical, reference_spec

SHAPES = [(1, 8, 8), (3, 32, 32)]
NUM_CLASSES = 10
# Small variants keep the 32x32 cases fast; every registered name is covered.
VARIANTS = {
    "mlp": [{"width": 32}],
    "cnn": [{"channels": (8, 16), "norm": "bn"}, {"channels": (8, 16), "norm": "none"}],
    "resnet20": [{"norm": "bn"}, {"norm": "ln"}],
}


def _cases():
    for name in list_models():
        for kwargs in VARIANTS.get(name, [{}]):
            for shape in SHAPES:
                label = ",".join(f"{k}={v}" for k, v in kwargs.items())
                yield pytest.param(name, kwargs, shape, id=f"{name}[{label}]-{shape}")


def _randomise(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    """Give norm affines and BN running stats non-trivial values, so that a spec that forgets
    to permute any of them fails the invariance test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.5
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape, generator=gen))
    model.eval()


def test_all_architectures_registered():
    assert {"mlp", "cnn", "resnet20"} <= set(list_models())


@pytest.mark.parametrize(("name", "kwargs", "shape"), _cases())
def test_model_builds_and_spec_is_exact(name, kwargs, shape):
    model = create_model(name, shape, NUM_CLASSES, **kwargs)
    out = model.eval()(torch.randn(4, *shape))
    assert out.shape == (4, NUM_CLASSES)
    state = model.state_dict()
    spec = infer_spec(model, torch.randn(2, *shape)).spec
    check_spec(spec, state)
    assert set(spec) == set(state)
    # One source of truth: the graph gives exactly the hand-written spec, up to group names.
    assert canonical(spec) == canonical(reference_spec(model))
    assert model.modeconn_config == {
        "name": name,
        "input_shape": list(shape),
        "num_classes": NUM_CLASSES,
        "kwargs": kwargs,
    }


@pytest.mark.parametrize(("name", "kwargs", "shape"), _cases())
def test_random_permutation_keeps_outputs(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, shape, NUM_CLASSES, **kwargs)
    _randomise(model, shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = infer_spec(model, torch.randn(2, *shape)).spec
    x = torch.randn(16, *shape)
    with torch.no_grad():
        expected = functional_call(model, state, (x,))
        perms = random_permutation(spec, state, torch.Generator().manual_seed(1))
        assert perms, "every model has at least one permutable group"
        permuted = apply_permutation(state, spec, perms)
        got = functional_call(model, permuted, (x,))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The state really moved: otherwise the check above proves nothing.
    moved = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert len(moved) >= len(perms)

    # A broken spec -- one group's output permuted but not its consumers' inputs -- must change
    # the outputs, so this test can fail.
    group = sorted(perms)[0]
    broken = {
        k: tuple(g if (k, i) == _first_axis(spec, group) else None for i, g in enumerate(a))
        for k, a in spec.items()
    }
    with torch.no_grad():
        wrong = functional_call(model, apply_permutation(state, broken, perms), (x,))
    assert not torch.allclose(wrong, expected, atol=1e-4, rtol=1e-4)


def _first_axis(spec, group):
    """(key, axis) of the first weight (ndim >= 2) whose output axis is ``group``."""
    for key, axes in spec.items():
        if len(axes) >= 2 and axes[0] == group:
            return key, 0
    raise AssertionError(f"no weight writes group {group}")


@pytest.mark.parametrize("name", list_models())
def test_functional_call_matches_module(name):
    torch.manual_seed(0)
    model = create_model(name, (1, 8, 8), NUM_CLASSES, **VARIANTS.get(name, [{}])[0])
    _randomise(model, (1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        got = functional_call(model, dict(model.state_dict()), (x,))
        # vmap over two stacked copies of the parameters: no in-place op may break it.
        params = {k: torch.stack([v, v]) for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())
        batched = torch.func.vmap(
            lambda p: functional_call(model, {**p, **buffers}, (x,)), randomness="different"
        )(params)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(batched[1], expected, atol=1e-5, rtol=1e-5)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):

        @register_model("mlp")
        def other(input_shape, num_classes, **kwargs):  # pragma: no cover
            raise AssertionError


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        create_model("nope", (1, 8, 8), 10)
    for name in list_models():
        assert name in str(info.value)


def test_bad_kwargs_raise_value_error():
    with pytest.raises(ValueError, match="mlp"):
        create_model("mlp", (1, 8, 8), 10, depht=3)
    with pytest.raises(ValueError, match="norm"):
        create_model("resnet20", (3, 32, 32), 10, norm="batch")


def test_spec_errors_name_the_key():
    model = create_model("mlp", (1, 8, 8), 10, width=8)
    state = model.state_dict()
    spec = infer_spec(model, torch.randn(2, 1, 8, 8)).spec
    with pytest.raises(ValueError, match="head.bias"):
        check_spec({k: v for k, v in spec.items() if k != "head.bias"}, state)
    with pytest.raises(ValueError, match="ghost"):
        check_spec({**spec, "ghost.weight": ("P_x",)}, state)
    with pytest.raises(ValueError, match="layers.0.weight"):
        check_spec({**spec, "layers.0.weight": ("P_layers.0",)}, state)
    with pytest.raises(ValueError, match="size"):
        group_sizes({**spec, "head.weight": ("P_layers.0", "P_layers.1")}, state)


def test_public_surface():
    assert set(models.__all__) == {
        "create_model",
        "list_models",
        "register_model",
        "PermutationSpec",
        "apply_permutation",
        "random_permutation",
        "infer_spec",
        "InferredSpec",
        "check_permutation_invariance",
    }
