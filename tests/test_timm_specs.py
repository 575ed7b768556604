"""timm architectures (an optional extra): functional BatchNorm/GroupNorm layers, shared modules
and attention written with reshapes are inferred and proven like torchvision's."""

from __future__ import annotations

import pytest
import torch

from modeconn.models.infer import infer_spec
from modeconn.models.verify import check_permutation_invariance, perturb_state

timm = pytest.importorskip("timm")

# name -> (input side, fragment of a frozen line or None)
CASES = {
    "efficientnet_b0": (32, None),  # BatchNormAct2d calls F.batch_norm
    "regnety_002": (32, "grouped convolution"),
    "poolformer_s12": (32, None),  # GroupNorm(1, C) through F.group_norm
    "coat_tiny": (224, "splits a permuted axis"),  # modules shared by two parents
    "vit_tiny_patch16_224": (224, "splits a permuted axis"),  # q, k, v reshaped out of one Linear
}
SLOW = {"coat_tiny", "vit_tiny_patch16_224"}


@pytest.mark.parametrize(
    ("name", "side", "frozen"),
    [
        pytest.param(n, *CASES[n], id=n, marks=[pytest.mark.slow] if n in SLOW else [])
        for n in CASES
    ],
)
def test_timm_model_is_inferred_and_proven(name, side, frozen):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    inferred = infer_spec(model, x[:2])
    state = perturb_state(model, x, scale=0.2)
    assert check_permutation_invariance(model, inferred.spec, x, state=state) < 1e-7
    assert sum(inferred.groups.values()) > 1000
    if frozen is None:
        assert inferred.frozen == []
    else:
        assert any(frozen in line for line in inferred.frozen), inferred.frozen
