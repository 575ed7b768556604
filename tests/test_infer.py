"""Permutation specs inferred from the graph: each operation family on a tiny network of its own,
proven by the float64 permutation check, with what must stay unpermuted left so and reported;
a deliberately wrong spec fails the check; export is the fallback when fx cannot trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.models.infer import SpecInferenceError, infer_spec
from modeconn.models.spec import apply_permutation, random_permutation, spec_from_json, spec_to_json
from modeconn.models.verify import SpecCheckError, check_permutation_invariance, perturb_state

IMAGE = (3, 8, 8)


def _prove(model: nn.Module, shape=IMAGE, **kwargs):
    """Infer, then prove on perturbed weights; returns the inferred spec."""
    torch.manual_seed(0)
    x = torch.randn(6, *shape)
    inferred = infer_spec(model, x[:2], **kwargs)
    state = perturb_state(model, x)
    assert check_permutation_invariance(model, inferred.spec, x, state=state) < 1e-9
    return inferred


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.bn(self.b(F.relu(self.a(x))))  # the add joins stem's and b's outputs
        return self.head(x.mean((2, 3)))


def test_residual_add_joins_groups_and_ends_are_never_permuted():
    spec = _prove(Residual()).spec
    assert spec["stem.weight"][0] == spec["b.weight"][0] == spec["bn.running_var"][0]
    assert spec["a.weight"][0] != spec["stem.weight"][0]
    assert spec["a.weight"][1] == spec["stem.weight"][0]
    assert spec["stem.weight"][1] is None  # the network's input
    assert spec["head.weight"][0] is None and spec["head.bias"] == (None,)  # its output
    assert spec["bn.num_batches_tracked"] == ()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)  # (N, 10, 8, 8): two groups side by side
        x = F.max_pool2d(F.relu(self.bn(x)), 2)  # (N, 10, 4, 4)
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))  # channel-major flatten


def test_concatenation_and_flatten_give_segmented_axes():
    spec = _prove(Concat()).spec
    ga, gb = spec["a.weight"][0], spec["b.weight"][0]
    assert spec["bn.weight"] == (((ga, 4, 1), (gb, 6, 1)),)
    # Flattening (10, 4, 4) keeps 16 consecutive inputs per channel.
    assert spec["fc.weight"][1] == ((ga, 4, 16), (gb, 6, 16))
    assert spec["head.weight"][1] == spec["fc.weight"][0]


class DepthwiseSE(nn.Module):
    def __init__(self, groups: int = 1, norm_groups: int = 1):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, multiplier 2
        self.norm = nn.GroupNorm(norm_groups, 16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=groups)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.norm(self.dw(F.relu(self.expand(x)))))
        scale = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = x * scale  # squeeze-and-excitation: joins se_expand's outputs with x's channels
        return self.head(self.grouped(x).mean((2, 3)))


def test_depthwise_conv_and_squeeze_excitation_share_the_channels():
    inferred = _prove(DepthwiseSE())
    spec = inferred.spec
    g = spec["expand.weight"][0]
    assert spec["dw.weight"][0] == ((g, 8, 2),)  # each input channel's two outputs move with it
    assert spec["se_expand.weight"][0] == spec["norm.weight"][0] == ((g, 8, 2),)
    assert spec["grouped.weight"][1] == ((g, 8, 2),)
    assert inferred.frozen == []


def test_grouped_conv_and_group_norm_leave_their_inputs_unpermuted_and_say_why():
    inferred = _prove(DepthwiseSE(groups=2))
    spec = inferred.spec
    assert spec["expand.weight"][0] is None
    first, second = spec["grouped.weight"][0]
    assert first[1:] == second[1:] == (4, 1) and first[0] != second[0]  # within each group
    assert spec["head.weight"][1] == spec["grouped.weight"][0]
    assert "grouped convolution grouped (groups=2) ties its inputs" in " ".join(inferred.frozen)

    inferred = _prove(DepthwiseSE(norm_groups=4))
    assert inferred.spec["expand.weight"][0] is None
    assert "GroupNorm norm (4 groups of 4 channels)" in " ".join(inferred.frozen)


class Attention(nn.Module):
    def __init__(self, d: int = 12, heads: int = 3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.pos = nn.Parameter(torch.randn(1, 4, d))
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.embed(x) + self.pos  # (N, 4, d): the stream
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x[:, 0])


def test_attention_is_permuted_within_heads():
    inferred = _prove(Attention(), shape=(4, 5))
    spec = inferred.spec
    stream = spec["embed.weight"][0]
    assert spec["pos"] == (None, None, stream)
    assert spec["attn.in_proj_weight"][1] == stream == spec["attn.out_proj.weight"][0]
    qkv = spec["attn.in_proj_weight"][0]
    assert len(qkv) == 9 and all(count == 4 for _, count, _ in qkv)  # 3 heads each of q, k, v
    assert [g for g, _, _ in qkv[:3]] == [g for g, _, _ in qkv[3:6]]  # q and k move alike
    assert spec["attn.out_proj.weight"][1] == qkv[6:]
    assert inferred.frozen == []


class ChannelsLast(nn.Module):
    """ConvNeXt-style: LayerNorm and Linear on channels-last, a per-channel layer scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        y = self.fc(F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.ln.weight, self.ln.bias))
        x = x + self.scale * y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_channels_last_layer_norm_and_layer_scale():
    spec = _prove(ChannelsLast()).spec
    g = spec["conv.weight"][0]
    assert (
        spec["ln.weight"] == (g,)
        and spec["fc.weight"] == (g, g)
        and spec["scale"] == (g, None, None)
    )


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cumsum(F.relu(self.a(x)), dim=1)  # depends on the order of the units
        return self.head(F.relu(self.b(x)))


def test_unknown_operation_is_left_unpermuted_or_refused_when_strict():
    inferred = _prove(Mystery(), shape=(6,))
    assert inferred.spec["a.weight"][0] is None
    assert inferred.spec["b.weight"][0] is not None  # after the unknown op, units are free again
    assert any("cumsum" in line for line in inferred.frozen)
    with pytest.raises(SpecInferenceError, match="cumsum"):
        infer_spec(Mystery(), torch.randn(2, 6), strict=True)


class ShapeBranch(nn.Module):
    """fx cannot trace a branch on an input's shape; torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.head(F.relu(self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))))


def test_export_is_the_fallback_when_fx_cannot_trace():
    inferred = _prove(ShapeBranch())
    assert inferred.tracer == "export"
    assert inferred.spec["bn.running_mean"] == (inferred.spec["conv.weight"][0],)
    assert inferred.spec["head.weight"] == (None, inferred.spec["fc.weight"][0])


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_network_is_refused_in_one_line():
    with pytest.raises(SpecInferenceError, match="cannot trace DataBranch") as info:
        infer_spec(DataBranch(), torch.randn(2, 4))
    assert "--spec" in str(info.value)


@pytest.mark.parametrize("model", [Residual(), Concat(), DepthwiseSE()], ids=type)
def test_a_wrong_spec_fails_the_check(model):
    """Forget one consumer of a group: the check must see the outputs change."""
    x = torch.randn(6, *IMAGE)
    spec = infer_spec(model, x[:2]).spec
    state = perturb_state(model, x)
    consumer = next(k for k, axes in spec.items() if len(axes) >= 2 and axes[1] is not None)
    broken = {**spec, consumer: (spec[consumer][0], None, *spec[consumer][2:])}
    with pytest.raises(SpecCheckError, match="changes the network's outputs"):
        check_permutation_invariance(model, broken, x, state=state)


def test_spec_json_round_trip_and_errors():
    spec = infer_spec(Concat(), torch.randn(2, *IMAGE)).spec
    assert spec_from_json(spec_to_json(spec)) == spec
    assert spec_from_json({"spec": spec_to_json(spec)}) == spec
    with pytest.raises(ValueError, match="fc.weight"):
        spec_from_json({"fc.weight": [[["g", 0, 1]], None]})
    with pytest.raises(ValueError, match="JSON object"):
        spec_from_json(["not", "a", "spec"])


def test_segmented_permutation_moves_blocks():
    state = {"w": torch.arange(12.0).reshape(1, 12)}
    spec = {"w": (None, (("a", 2, 3), (None, 2, 1), ("b", 2, 2)))}
    perms = {"a": torch.tensor([1, 0]), "b": torch.tensor([1, 0])}
    out = apply_permutation(state, spec, perms)["w"][0].tolist()
    assert out == [3, 4, 5, 0, 1, 2, 6, 7, 10, 11, 8, 9]
    assert set(random_permutation(spec, state)) == {"a", "b"}
