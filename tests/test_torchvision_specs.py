"""The smallest torchvision classification builder of every family: its spec is inferred and
proven (random weights, perturbed so that nothing is trivially symmetric), and what stays in
place is what the family's structure forces (benchmarks/spec_coverage.py covers all 80)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from modeconn.models.infer import infer_spec
from modeconn.models.verify import check_permutation_invariance, perturb_state

# builder -> (input side, what may stay in place: a fragment of every frozen line, or None)
FAMILIES = {
    "alexnet": (64, None),
    "convnext_tiny": (32, None),
    "densenet121": (32, None),
    "efficientnet_b0": (32, None),
    "efficientnet_v2_s": (32, None),
    "googlenet": (32, None),
    "inception_v3": (160, None),
    "maxvit_t": (224, "splits a permuted axis"),  # q, k, v cut out of one projection
    "mnasnet0_5": (32, None),
    "mobilenet_v2": (32, None),
    "mobilenet_v3_small": (32, None),
    "regnet_x_400mf": (32, "grouped convolution"),
    "regnet_y_400mf": (32, "grouped convolution"),
    "resnet18": (32, None),
    "resnext50_32x4d": (32, "grouped convolution"),
    "shufflenet_v2_x0_5": (32, "split"),  # channel split and shuffle
    "squeezenet1_0": (64, None),
    "swin_t": (224, None),
    "swin_v2_t": (224, "_get_relative_position_bias"),  # per-head bias MLP: heads stay in place
    "vgg11": (32, None),
    "vit_b_32": (224, None),
    "wide_resnet50_2": (32, None),
}
FAST = {
    "densenet121",
    "efficientnet_b0",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
}


def _case(name):
    marks = [] if name in FAST else [pytest.mark.slow]
    return pytest.param(name, *FAMILIES[name], id=name, marks=marks)


@pytest.mark.parametrize(("name", "side", "frozen"), [_case(n) for n in FAMILIES])
def test_smallest_of_each_family_is_inferred_and_proven(name, side, frozen):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception initialisation notices
        model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    inferred = infer_spec(model, x[:2])
    assert inferred.tracer == "fx"
    state = perturb_state(model, x, scale=0.2)
    assert check_permutation_invariance(model, inferred.spec, x, state=state) < 1e-7
    assert sum(inferred.groups.values()) > 1000  # most hidden units are permutable
    # Only auxiliary heads (training-time outputs of googlenet and inception) go unread.
    assert all("aux" in key.lower() for key in inferred.unused), inferred.unused[:3]
    if frozen is None:
        assert inferred.frozen == []
    else:
        assert inferred.frozen and all(frozen in line for line in inferred.frozen), inferred.frozen
