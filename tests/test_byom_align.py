"""Bring your own model: standard torchvision architectures, given as plain state dicts, aligned
through the command line. B is a planted permutation of A plus noise; `modeconn align` must give
A back (permutation recovered), BatchNorm statistics included, with a spec it inferred itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeconn.cli import main
from modeconn.models import create_model
from modeconn.models.infer import infer_spec
from modeconn.models.spec import apply_permutation, random_permutation
from modeconn.models.verify import perturb_state

SHAPE = (3, 32, 32)
CLASSES = 4

VIT = {
    "image_size": 32,
    "patch_size": 4,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 32,
    "mlp_dim": 64,
}
CASES = {
    "resnet18": {},
    "mobilenet_v3_small": {},
    "densenet121": {},
    "VisionTransformer": VIT,
    "vgg11_bn": {},
}
# The fully connected layers of VGG (25088 x 4096 and 4096 x 4096) make one weight-matching
# sweep cost about a teraflop, and DenseNet-121 has 120 groups: run in CI, not in the quick loop.
SLOW = {"vgg11_bn", "densenet121"}


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=80)
    path = tmp_path_factory.mktemp("rgb") / "rgb.npz"
    np.savez(path, x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    return str(path)


def _case(name: str):
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(name, CASES[name], id=name, marks=marks)


@pytest.mark.parametrize(("name", "kwargs"), [_case(n) for n in CASES])
def test_planted_permutation_is_recovered_through_the_cli(name, kwargs, rgb_data, tmp_path):
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", SHAPE, CLASSES, **kwargs)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    state_a = perturb_state(model, x)  # non-trivial BN statistics and norm affines
    spec = infer_spec(model, x[:2]).spec
    perms = random_permutation(spec, state_a, torch.Generator().manual_seed(2))
    state_b = apply_permutation(state_a, spec, perms)
    gen = torch.Generator().manual_seed(3)
    params = {k for k, _ in model.named_parameters()}
    for key in params:  # B = pi(A) + noise on the parameters
        value = state_b[key]
        state_b[key] = value + 1e-3 * value.std() * torch.randn(value.shape, generator=gen)
    # Plain state dicts, B saved the way DistributedDataParallel names its keys.
    torch.save(state_a, tmp_path / "a.pt")
    torch.save({f"module.{k}": v for k, v in state_b.items()}, tmp_path / "b.pt")

    args = [f"--arg={k}={v}" for k, v in kwargs.items()]
    out = tmp_path / "b_aligned.safetensors"
    code = main(
        ["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", f"torchvision:{name}"]
        + args
        + ["--data", f"npz:{rgb_data}", "--out", str(out), "--points", "0"]
    )
    assert code == 0
    aligned = load_file(out)
    assert sum(len(p) for p in perms.values()) > 100  # hidden units really moved
    for key, value in state_a.items():
        if key in params:
            torch.testing.assert_close(aligned[key], value, atol=1e-2 * float(value.std()), rtol=0)
        else:  # buffers carry no noise: BN statistics come back exactly
            assert torch.equal(aligned[key], value), key
    moved = [k for k in params if not torch.allclose(state_b[k], state_a[k], atol=1e-2)]
    assert moved, "B must differ from A before alignment"
