"""Derive a network's permutation spec from its traced graph.

The network is traced with ``torch.fx`` (``torch.export`` when fx cannot trace it) and run once on
an example input to learn every intermediate shape. Each axis of each intermediate tensor then
gets a *layout*: a tuple of segments ``(var, count, inner)`` (see :mod:`models.spec`), where a
``var`` is a union-find variable standing for "the permutation of these channels". Every layer
that creates new hidden units (Linear, Conv output channels, attention heads) creates a var;
every operation that requires two axes to be permuted alike (a residual add, a consumer's input
axis, a norm's affine) joins their vars; every operation that cannot commute with a permutation
of an axis (the network's inputs and outputs, a reshape that splits channels, an operation this
module does not know) *fixes* the vars it touches, which leaves them unpermuted. At the end each
set of joined vars that holds at least one layer's new units and is not fixed becomes one group.

Unknown operations are handled conservatively (their inputs stay unpermuted, which is always
correct) and reported; ``strict=True`` refuses them instead. The spec this produces is proven on
the network itself by :func:`models.verify.check_permutation_invariance`.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from modeconn.models.spec import AxisEntry, PermutationSpec, Segment, group_sizes

__all__ = ["InferredSpec", "SpecInferenceError", "infer_spec"]

log = logging.getLogger(__name__)

# One axis of an intermediate tensor: segments (var or None, count, inner).
Layout = tuple[tuple[int | None, int, int], ...]


class SpecInferenceError(ValueError):
    """The network cannot be traced, or (``strict=True``) uses an operation not understood."""


@dataclass(frozen=True)
class InferredSpec:
    """What :func:`infer_spec` found.

    ``spec`` covers every key of ``model.state_dict()``; ``groups`` maps each group to its size;
    ``frozen`` lists, one line each, the hidden units left unpermuted and why (network outputs
    are not listed: they are never permuted); ``unused`` names state-dict keys that the traced
    forward pass (eval mode) never reads, left unpermuted; ``tracer`` is "fx" or "export".
    """

    spec: PermutationSpec
    groups: dict[str, int]
    frozen: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    tracer: str = "fx"

    def summary(self) -> str:
        units = sum(self.groups.values())
        text = f"{len(self.groups)} permutation groups ({units} units), traced with {self.tracer}"
        if self.frozen:
            text += f"; {len(self.frozen)} left unpermuted"
        return text


def infer_spec(
    model: nn.Module, example_input: Tensor | Sequence[Tensor], *, strict: bool = False
) -> InferredSpec:
    """The permutation spec of ``model``, derived from its graph (see the module docstring).

    Args:
        model: any ``nn.Module``; traced in eval mode (its mode is restored).
        example_input: a batch the model accepts (only shapes matter), or a tuple of inputs.
        strict: refuse an operation that is not understood, instead of leaving its inputs
            unpermuted.

    Raises:
        SpecInferenceError: the model cannot be traced, or ``strict`` and an unknown operation.
    """
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    was_training = model.training
    model.eval()
    try:
        graph, tracer = _trace(model, inputs)
        builder = _SpecBuilder(model, strict=strict)
        builder.run(graph, tracer)
        return builder.result(tracer)
    finally:
        model.train(was_training)


# -- tracing -------------------------------------------------------------------------------------


def _trace(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule, str]:
    """An fx graph with ``meta["tensor_meta"]`` on every node; fx first, torch.export second."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(graph).propagate(*inputs)
        return graph, "fx"
    except Exception as fx_err:  # fx raises many types for untraceable Python
        fx_reason = _first_line(fx_err)
    try:
        with torch.no_grad():
            program = torch.export.export(model, inputs)
        graph = program.module()
        with torch.no_grad():
            ShapeProp(graph).propagate(*inputs)
        return graph, "export"
    except Exception as export_err:
        raise SpecInferenceError(
            f"cannot trace {type(model).__name__}: torch.fx failed ({fx_reason}) and "
            f"torch.export failed ({_first_line(export_err)}); give a spec file instead (--spec)"
        ) from export_err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# -- the builder ---------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Softmax,
    nn.LogSoftmax,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.leaky_relu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.mish,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.softmax,
    F.log_softmax,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.softmax,
    torch.log_softmax,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
    operator.neg,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "sqrt",
    "rsqrt",
    "abs",
    "neg",
    "clamp",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "to",
    "type_as",
    "sigmoid_",
    "relu_",
    "mul_",
    "add_",
}
_BINARY = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    "add",
    "sub",
    "mul",
    "div",
    "add_",
    "mul_",
}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_RESHAPES = {
    torch.flatten,
    torch.reshape,
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "view_as",
    "reshape_as",
    torch.unsqueeze,
    torch.squeeze,
    "unsqueeze",
    "squeeze",
}
# Functional norms (timm's BatchNormAct2d, GroupNorm variants) share the ATen handlers below.
_FUNCTIONAL_LAYERS = {F.batch_norm: "batch_norm", F.group_norm: "group_norm"}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
}
# Callables whose output carries no channels: shape arithmetic, assertions.
_NON_TENSOR = {operator.getitem, getattr, torch._assert, "size", "dim"}
_STOCHASTIC_DEPTH_NAMES = {"stochastic_depth", "drop_path"}


def _aten_aliases() -> dict[Any, Any]:
    """``torch.export`` graphs call ATen operators: each maps to the key of the same operation
    in the tables above (or to a name handled in :meth:`_SpecBuilder.call`)."""
    aten = torch.ops.aten
    pairs = {
        torch.relu: ["relu", "relu_"],
        F.gelu: ["gelu"],
        F.silu: ["silu", "silu_"],
        torch.sigmoid: ["sigmoid"],
        torch.tanh: ["tanh"],
        F.hardswish: ["hardswish", "hardswish_"],
        F.hardsigmoid: ["hardsigmoid"],
        F.hardtanh: ["hardtanh", "hardtanh_"],
        F.dropout: ["dropout", "alias", "clone", "contiguous", "detach", "_to_copy"],
        torch.softmax: ["softmax", "_softmax"],
        torch.log_softmax: ["log_softmax", "_log_softmax"],
        operator.add: ["add", "add_"],
        operator.sub: ["sub", "sub_"],
        operator.mul: ["mul", "mul_"],
        operator.truediv: ["div", "div_"],
        torch.cat: ["cat", "concat"],
        "view": ["view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze"],
        "permute": ["permute"],
        "transpose": ["transpose"],
        "expand": ["expand"],
        torch.mean: ["mean", "sum", "amax", "amin"],
        F.adaptive_avg_pool2d: [
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "avg_pool1d",
            "avg_pool2d",
            "max_pool1d",
            "max_pool2d",
        ],
        F.layer_norm: ["layer_norm"],
        F.linear: ["linear"],
        torch.matmul: ["matmul"],
        torch.chunk: ["chunk", "split"],
        "conv": ["conv1d", "conv2d", "conv3d"],
        "batch_norm": ["batch_norm", "_native_batch_norm_legit_no_training"],
        "group_norm": ["group_norm"],
    }
    aliases: dict[Any, Any] = {}
    for key, names in pairs.items():
        for name in names:
            packet = getattr(aten, name, None)
            if packet is None:
                continue
            for overload in packet.overloads():
                aliases[getattr(packet, overload)] = key
    return aliases


_ATEN = _aten_aliases()


class _SpecBuilder:
    """Walks the graph once, joining and fixing vars; :meth:`result` turns them into a spec."""

    def __init__(self, model: nn.Module, *, strict: bool):
        self.model = model
        self.strict = strict
        self.state = model.state_dict()
        self.parent: list[int] = []
        self.name: list[str | None] = []  # producer name, None for a parameter placeholder
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}  # root -> first reason
        self.refined: dict[int, Layout] = {}  # root -> its parts, when split (see _refine)
        self.keys: dict[str, list[Layout | None]] = {}  # state key -> layout of each axis
        self.values: dict[fx.Node, Any] = {}  # node -> layouts (tuple of Layout) or a list
        self.context = ""  # the operation being handled, for messages
        self.shape: tuple[int, ...] = ()  # its (first) output shape
        self.read_storage: set[int] = set()  # data pointers of every tensor constant read

    # -- union-find ---------------------------------------------------------------------------

    def _new(self, name: str | None, size: int) -> int:
        self.parent.append(len(self.parent))
        self.name.append(name)
        self.size.append(size)
        return len(self.parent) - 1

    def _find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the older var names the set
        if rb in self.fixed and ra not in self.fixed:
            self.fixed[ra] = self.fixed[rb]
        if rb in self.refined:
            parts = self.refined.pop(rb)
            if ra in self.refined:
                self.unify(self.refined[ra], parts, "a refined channel group")
            else:
                self.refined[ra] = parts

    def expanded(self, layout: Layout) -> Layout:
        """``layout`` with every refined var replaced by its parts (see :meth:`_refine`)."""
        if not any(v is not None and self._find(v) in self.refined for v, _, _ in layout):
            return layout
        out: list[tuple[int | None, int, int]] = []
        for v, c, i in layout:
            parts = self.refined.get(self._find(v)) if v is not None else None
            if parts is None:
                out.append((v, c, i))
            else:  # each of v's c units spans i elements: a part of c_k units spans c_k * i_k
                out.extend(self.expanded(tuple((s, ck, ik * i) for s, ck, ik in parts)))
        return tuple(out)

    def _refine(self, x: Layout, y: Layout, what: str) -> bool:
        """Split the var of a single-var axis ``x`` into parts shaped like ``y``'s segments.

        A permutation of x's units that must match y's is a product of permutations of y's
        parts: e.g. a squeeze-and-excitation scale (one var) multiplying the output of a grouped
        convolution (one var per group), or of a depthwise convolution with a channel
        multiplier (units in blocks). Returns False when ``y`` cannot be matched this way.
        """
        if len(x) != 1:
            return False
        var, _, inner = x[0]
        if var is None:
            return False
        if any(j % inner for _, _, j in y) or _size(y) != _size(x):
            return False
        parts = []
        for u, c, j in y:
            part = self._new(None, c)
            parts.append((part, c, j // inner))
            if u is None:
                self.fix(((part, c, 1),), f"{what} meets an axis that is not permuted")
            else:
                self._union(part, u)
        root = self._find(var)
        if root in self.fixed:
            self.fix(tuple(parts), self.fixed[root])
        self.refined[root] = tuple(parts)
        return True

    def fix(self, layout: Layout | None, reason: str) -> None:
        layout = self.expanded(layout) if layout else layout
        for var, _, _ in layout or ():
            if var is not None:
                root = self._find(var)
                self.fixed.setdefault(root, reason)

    def fix_all(self, value: Any, reason: str) -> None:
        for layout in _layouts_in(value):
            self.fix(layout, reason)

    def producer(self, name: str, size: int) -> Layout:
        return ((self._new(name, size), size, 1),)

    # -- layouts ------------------------------------------------------------------------------

    def unify(self, a: Layout, b: Layout, what: str) -> Layout:
        """Require axes ``a`` and ``b`` to be permuted alike; returns the joint layout."""
        if a == b:
            return a
        a, b = self.expanded(a), self.expanded(b)
        shape_a, shape_b = [(c, i) for _, c, i in a], [(c, i) for _, c, i in b]
        if shape_a != shape_b and (self._refine(a, b, what) or self._refine(b, a, what)):
            a, b = self.expanded(a), self.expanded(b)
        if [(c, i) for _, c, i in a] == [(c, i) for _, c, i in b]:
            for (va, _, _), (vb, _, _) in zip(a, b):
                if va is not None and vb is not None:
                    self._union(va, vb)
                elif va is not None or vb is not None:
                    self.fix(
                        ((va if va is not None else vb, 1, 1),),
                        f"{what} meets an axis that is not permuted",
                    )
            return a  # a var met by an unpermuted segment is fixed, so `a` is right either way
        self.fix(a, f"{what} joins channels grouped differently")
        self.fix(b, f"{what} joins channels grouped differently")
        return _none(_size(a))

    def param(self, key: str) -> list[Layout | None]:
        if key not in self.keys:
            self.keys[key] = [None] * self.state[key].dim()
        return self.keys[key]

    def bind(self, key: str | None, axis: int, layout: Layout, what: str) -> None:
        """Give axis ``axis`` of parameter ``key`` the layout ``layout`` (joining if bound)."""
        if key is None or key not in self.state:
            return
        axes = self.param(key)
        current = axes[axis]
        axes[axis] = layout if current is None else self.unify(current, layout, what)

    def param_layouts(self, key: str) -> tuple[Layout, ...]:
        """Layouts of a parameter used as a plain tensor: placeholders for unbound axes."""
        axes = self.param(key)
        shape = self.state[key].shape
        for axis, layout in enumerate(axes):
            if layout is None:
                axes[axis] = ((self._new(None, int(shape[axis])), int(shape[axis]), 1),)
        return tuple(axes)  # type: ignore[arg-type]

    # -- graph walk ---------------------------------------------------------------------------

    def run(self, graph: Any, tracer: str) -> None:
        modules = dict(graph.named_modules())
        constants = {
            (v.data_ptr(), tuple(v.shape), v.stride()): k
            for k, v in self.state.items()
            if v.numel()
        }
        for node in graph.graph.nodes:
            self.context = _describe(node, modules)
            self.shape = (_meta_shapes(node) or [()])[0]
            if node.op == "placeholder":
                self.values[node] = _none_like(_meta_shapes(node))
            elif node.op == "get_attr":
                # fx reads a buffer as a constant of its own name: find its state key by storage.
                target = str(node.target)
                storage = _storage(graph, target)
                if target in self.state:
                    key = target
                else:
                    key = constants.get(storage) if storage is not None else None
                if storage is not None:
                    self.read_storage.add(storage[0])
                if key is not None:
                    self.values[node] = _Param(key)  # layouts made when first read
                else:  # a constant or non-persistent buffer: never permuted
                    self.values[node] = _none_like(_meta_shapes(node))
            elif node.op == "call_module":
                module = modules[str(node.target)]
                self.values[node] = self.call_module(node, module)
                for key in module.state_dict():  # read by the module: never "unused"
                    self.param(f"{node.target}.{key}")
            elif node.op in ("call_function", "call_method"):
                self.values[node] = self.call(node)
            elif node.op == "output":
                self.fix_all(self._arg(node.args[0]), "network output")

    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            value = self.values.get(a)
            return self.param_layouts(value.key) if isinstance(value, _Param) else value
        if isinstance(a, list | tuple):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return None

    def unknown(self, node: fx.Node, reason: str | None = None) -> Any:
        """Leave every input of ``node`` unpermuted; its output carries no channels."""
        why = reason or f"{self.context} is not understood"
        if self.strict:
            raise SpecInferenceError(f"cannot infer the permutation spec: {why}")
        self.fix_all([self._arg(a) for a in node.args], why)
        self.fix_all([self._arg(a) for a in node.kwargs.values()], why)
        return _none_like(_meta_shapes(node))

    # -- modules ------------------------------------------------------------------------------

    def call_module(self, node: fx.Node, m: nn.Module) -> Any:
        name = str(node.target)
        # Any: the layouts of the first input (None only for a module called by keyword).
        x: Any = self._arg(node.args[0]) if node.args else None
        if isinstance(m, _ELEMENTWISE_MODULES):
            return x
        if isinstance(m, nn.Linear):
            return self.linear(
                x, f"{name}.weight", f"{name}.bias" if m.bias is not None else None, name
            )
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            bias = f"{name}.bias" if m.bias is not None else None
            return self.conv(x, f"{name}.weight", bias, m.groups, name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.channel_norm(x, name, m, axis=1)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(
                x,
                len(m.normalized_shape),
                f"{name}.weight" if m.weight is not None else None,
                f"{name}.bias" if m.bias is not None else None,
                name,
            )
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(x, m.num_groups, m.num_channels, name, m.affine)
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1:
                self.bind(f"{name}.weight", 0, x[1], "PReLU")
            return x
        if isinstance(m, _POOL_MODULES):
            return self.pool(x, node)
        if isinstance(m, nn.Flatten):
            return self.reshape(x, node)
        if isinstance(m, nn.MultiheadAttention):
            return self.attention(node, m, name)
        if any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False)
        ):
            for key in m.state_dict():
                self.param(f"{name}.{key}")  # left unbound: not permuted
        return self.unknown(node)

    def linear(self, x: tuple[Layout, ...], weight: str, bias: str | None, name: str) -> Any:
        out_features, _ = self.state[weight].shape
        out = self.producer(name, int(out_features))
        self.bind(weight, 0, out, f"{name} weight")
        self.bind(weight, 1, x[-1], f"input of {name}")
        self.bind(bias, 0, out, f"{name} bias")
        return (*x[:-1], out)

    def conv(
        self, x: tuple[Layout, ...], weight: str, bias: str | None, groups: int, name: str
    ) -> Any:
        out_channels, in_per_group = (int(d) for d in self.state[weight].shape[:2])
        in_channels = in_per_group * groups
        if groups == 1:
            out = self.producer(name, out_channels)
            self.bind(weight, 1, x[1], f"input of {name}")
        elif in_per_group == 1 and out_channels % in_channels == 0:
            # Depthwise: output channel j reads input channel j // mult only, so output channels
            # follow their input channel (each a block of `mult`).
            mult = out_channels // in_channels
            out = tuple((v, c, i * mult) for v, c, i in x[1])
            self.bind(weight, 1, _none(1), f"{name} weight")
        else:
            # Grouped: each group's inputs are shared by the group's outputs, so the inputs stay
            # in place; the outputs of each group may be permuted within the group.
            self.fix(
                x[1],
                f"grouped convolution {name} (groups={groups}) ties its inputs to their groups",
            )
            per = out_channels // groups
            out = tuple(seg for k in range(groups) for seg in self.producer(f"{name}.g{k}", per))
            self.bind(weight, 1, _none(in_per_group), f"{name} weight")
        self.bind(weight, 0, out, f"{name} weight")
        self.bind(bias, 0, out, f"{name} bias")
        # Convolutions mix spatial positions: spatial axes keep no channels.
        for layout in x[2:]:
            self.fix(layout, f"{self.context} mixes spatial positions")
        return (x[0], out, *(_none(s) for s in self.shape[2:]))

    def channel_norm(self, x: Any, name: str, m: nn.Module, axis: int) -> Any:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if f"{name}.{leaf}" in self.state:
                self.bind(f"{name}.{leaf}", 0, x[axis], f"{name}.{leaf}")
        return x

    def layer_norm(self, x: Any, ndim: int, weight: str | None, bias: str | None, name: str) -> Any:
        # Mean and variance over the normalised axes do not change when they are permuted.
        for key in (weight, bias):
            for j in range(ndim):
                self.bind(key, j, x[len(x) - ndim + j], f"{name} affine")
        return x

    def group_norm(self, x: Any, groups: int, channels: int, name: str, affine: bool) -> Any:
        if groups not in (1, channels):
            self.fix(
                x[1],
                f"GroupNorm {name} ({groups} groups of {channels // groups} "
                "channels) ties channels to their groups",
            )
        if affine:
            self.bind(f"{name}.weight", 0, x[1], f"{name} affine")
            self.bind(f"{name}.bias", 0, x[1], f"{name} affine")
        return x

    def pool(self, x: Any, node: fx.Node) -> Any:
        shape = _meta_shapes(node)[0]
        keep = len(shape) - (len(x) - 2) if len(x) == len(shape) else 2
        for layout in x[keep:]:
            self.fix(layout, f"{self.context} pools over a permuted axis")
        return (*x[:keep], *(_none(s) for s in shape[keep:]))

    def attention(self, node: fx.Node, m: nn.MultiheadAttention, name: str) -> Any:
        """``nn.MultiheadAttention``: see :meth:`attend`."""
        args = [self._arg(a) for a in node.args[:3]]
        args += [self._arg(node.kwargs[k]) for k in ("query", "key", "value") if k in node.kwargs]
        q, k, v = (args + [None, None, None])[:3]
        if q is None or k is None or v is None or m.add_zero_attn:
            return self.unknown(node, f"{self.context}: attention call not understood")
        if m._qkv_same_embed_dim:
            joint = self.unify(self.unify(q[-1], k[-1], name), v[-1], name)
            qk, vo = self.attend(
                joint,
                m.num_heads,
                m.head_dim,
                f"{name}.in_proj_weight",
                f"{name}.in_proj_bias",
                name,
            )
        else:
            qk, vo = self.heads(name, m.num_heads, m.head_dim)
            for proj, inp, out in (("q", q, qk), ("k", k, qk), ("v", v, vo)):
                self.bind(f"{name}.{proj}_proj_weight", 0, out, name)
                self.bind(f"{name}.{proj}_proj_weight", 1, inp[-1], name)
            self.bind(f"{name}.in_proj_bias", 0, qk + qk + vo, name)
        if m.bias_k is not None:
            for key, inner in ((f"{name}.bias_k", qk), (f"{name}.bias_v", vo)):
                self.bind(key, 0, _none(1), name)
                self.bind(key, 1, _none(1), name)
                self.bind(key, 2, inner, name)
        out = self.project(
            vo, f"{name}.out_proj.weight", f"{name}.out_proj.bias", f"{name}.out_proj"
        )
        shapes = _meta_shapes(node)
        return [(*q[:-1], out), _none_like(shapes[1:2]) if len(shapes) > 1 else None]

    def heads(self, name: str, num_heads: int, head_dim: int) -> tuple[Layout, Layout]:
        """Within-head permutations: one group per head for query/key coordinates (their dot
        product is unchanged when both move alike) and one for value/output coordinates.
        (Permuting whole heads would also be exact; within heads gives more freedom.)"""
        qk = tuple(
            seg for i in range(num_heads) for seg in self.producer(f"{name}.qk{i}", head_dim)
        )
        vo = tuple(
            seg for i in range(num_heads) for seg in self.producer(f"{name}.vo{i}", head_dim)
        )
        return qk, vo

    def attend(
        self, x: Layout, num_heads: int, head_dim: int, weight: str, bias: str | None, name: str
    ) -> tuple[Layout, Layout]:
        """A packed ``(3 * heads * head_dim, d)`` q/k/v projection of features ``x``."""
        qk, vo = self.heads(name, num_heads, head_dim)
        self.bind(weight, 0, qk + qk + vo, name)
        self.bind(weight, 1, x, name)
        self.bind(bias, 0, qk + qk + vo, name)
        return qk, vo

    def project(self, x: Layout, weight: str, bias: str | None, name: str) -> Layout:
        out = self.producer(name, int(self.state[weight].shape[0]))
        self.bind(weight, 0, out, name)
        self.bind(weight, 1, x, name)
        self.bind(bias, 0, out, name)
        return out

    def window_attention(self, node: fx.Node) -> Any:
        """torchvision's Swin ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window,
        num_heads, shift, ..., qkv_bias, proj_bias, logit_scale)``: cosine attention (v2)
        normalises q and k per head, which within-head permutations leave unchanged."""
        names = (
            "input",
            "qkv_weight",
            "proj_weight",
            "relative_position_bias",
            "window_size",
            "num_heads",
            "shift_size",
            "attention_dropout",
            "dropout",
            "qkv_bias",
            "proj_bias",
            "logit_scale",
            "training",
        )
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        x = self._arg(args["input"])
        keys = {
            k: self._key(args.get(k))
            for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")
        }
        heads = args.get("num_heads")
        if (
            not _is_layouts(x)
            or keys["qkv_weight"] is None
            or keys["proj_weight"] is None
            or (not isinstance(heads, int))
        ):
            return self.unknown(node)
        name = keys["qkv_weight"].rsplit(".", 2)[0]
        dim = int(self.state[keys["qkv_weight"]].shape[0]) // 3
        _, vo = self.attend(x[-1], heads, dim // heads, keys["qkv_weight"], keys["qkv_bias"], name)
        out = self.project(vo, keys["proj_weight"], keys["proj_bias"], f"{name}.proj")
        # The relative position bias is per head: within-head permutations never touch it.
        self.fix_all(self._arg(args.get("relative_position_bias")), self.context)
        self.fix_all(self._arg(args.get("logit_scale")), self.context)
        return (*x[:-1], out)

    # -- functions and methods ----------------------------------------------------------------

    def call(self, node: fx.Node) -> Any:
        target = node.target
        key = _ATEN.get(target, _FUNCTIONAL_LAYERS.get(target, target))
        name = getattr(target, "__name__", str(target))
        # Handlers that bind parameters themselves run before the arguments are read.
        if key is F.layer_norm:
            return self.functional_layer_norm(node)
        if key is F.linear:
            return self.functional_linear(node)
        if name == "shifted_window_attention":
            return self.window_attention(node)
        if key in ("conv", "batch_norm", "group_norm"):
            return self.aten_layer(node, key)
        args = [self._arg(a) for a in node.args]
        if key in _NON_TENSOR:
            if key is operator.getitem and isinstance(args[0], list):
                return args[0][node.args[1]] if isinstance(node.args[1], int) else None
            if key is operator.getitem and _is_layouts(args[0]):
                return self.getitem(args[0], node)
            return None
        if not any(_layouts_in(args)) and not any(_layouts_in(list(node.kwargs.values()))):
            return _none_like(_meta_shapes(node)) if _meta_shapes(node) else None
        if (
            key in _ELEMENTWISE_FUNCTIONS
            or key in _ELEMENTWISE_METHODS
            or (name in _STOCHASTIC_DEPTH_NAMES)
        ):
            return args[0]
        if key in _BINARY:
            return self.broadcast(node, args)
        if key in _RESHAPES:
            return self.reshape(args[0], node)
        if key == "expand":
            return self.expand(args[0])
        if key in (torch.permute, "permute"):
            # permute(x, 0, 2, 1), permute(x, (0, 2, 1)) or permute(x, dims=...): ints.
            rest: tuple[Any, ...] = node.args[1:]
            dims: Any = rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else rest
            dims = node.kwargs.get("dims", dims)
            return tuple(args[0][int(d) % len(args[0])] for d in dims)
        if key in (torch.transpose, torch.swapaxes, "transpose", "swapaxes"):
            pair: tuple[Any, ...] = node.args[1:3]  # the two dims: ints
            a, b = (int(d) % len(args[0]) for d in pair)
            out = list(args[0])
            out[a], out[b] = out[b], out[a]
            return tuple(out)
        if key in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node)
        if key in _REDUCTIONS:
            return self.reduce(args[0], node)
        if key in _POOL_FUNCTIONS:
            return self.pool(args[0], node)
        if key in (torch.matmul, operator.matmul, "matmul"):
            return self.matmul(node, args)
        if key in (torch.chunk, torch.split, "chunk", "split"):
            return self.split(node, args[0])
        if name == "_patch_merging_pad":
            # torchvision's Swin patch merging: four strided views of x, concatenated on the
            # feature axis, so the features appear four times.
            x = args[0]
            return (*_none_like([self.shape[:-1]]), tuple(x[-1]) * 4)
        return self.unknown(node)

    def broadcast(self, node: fx.Node, args: list[Any]) -> Any:
        out_shape = _meta_shapes(node)[0]
        operands = [a for a in args if _is_layouts(a)]
        result: list[Layout] = [_none(s) for s in out_shape]
        filled = [False] * len(out_shape)
        for layouts in operands:
            offset = len(out_shape) - len(layouts)
            for j, layout in enumerate(layouts):
                axis = offset + j
                if _size(layout) != out_shape[axis]:  # broadcast from size 1
                    self.fix(layout, f"{self.context} broadcasts a permuted axis")
                    continue
                if not filled[axis]:
                    result[axis], filled[axis] = layout, True
                else:
                    result[axis] = self.unify(result[axis], layout, self.context)
        # A plain tensor operand (a constant) has no layout: its axes are not permuted.
        for a in node.args:
            if isinstance(a, fx.Node) and not _is_layouts(self._arg(a)):
                shape = _meta_shapes(a)
                if shape:
                    offset = len(out_shape) - len(shape[0])
                    for j, s in enumerate(shape[0]):
                        if s != 1:
                            self.fix(result[offset + j], f"{self.context} with a constant")
        return tuple(result)

    def cat(self, node: fx.Node) -> Any:
        inputs = cast(Sequence[fx.Node], node.args[0])  # cat(tensors, dim): a list of nodes
        tensors = [self._arg(a) for a in inputs]
        dim: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)  # an int
        if not all(_is_layouts(t) for t in tensors):
            return self.unknown(node)
        dim = int(dim) % len(tensors[0])
        out = list(tensors[0])
        for t in tensors[1:]:
            for j in range(len(out)):
                if j != dim:
                    out[j] = self.unify(out[j], t[j], self.context)
        out[dim] = _simplify(tuple(seg for t in tensors for seg in t[dim]))
        return tuple(out)

    def expand(self, x: Any) -> Any:
        out = list(_none_like([self.shape]))
        offset = len(self.shape) - len(x)
        for j, layout in enumerate(x):
            if _size(layout) == self.shape[offset + j]:
                out[offset + j] = layout
            else:
                self.fix(layout, f"{self.context} expands a permuted axis")
        return tuple(out)

    def reduce(self, x: Any, node: fx.Node) -> Any:
        # Reducing over a permuted axis is invariant to the permutation: nothing to fix.
        shape = _meta_shapes(node)[0]
        # an int, a list of ints, or None (all axes)
        dims: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return ()
        dims = {int(d) % len(x) for d in (dims if isinstance(dims, list | tuple) else [dims])}
        kept = [layout for j, layout in enumerate(x) if j not in dims]
        if len(shape) == len(x):  # keepdim
            return tuple(_none(1) if j in dims else layout for j, layout in enumerate(x))
        return tuple(kept)

    def getitem(self, x: tuple[Layout, ...], node: fx.Node) -> Any:
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) for i in index) or index.count(Ellipsis) > 1:
            return self.unknown(node)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = len(x) - (len(index) - 1 - index.count(None))
            index = index[:at] + (slice(None),) * fill + index[at + 1 :]
        out, axis = [], 0
        for i in index:
            if i is None:
                out.append(_none(1))
                continue
            layout = x[axis]
            if isinstance(i, slice) and i == slice(None):
                out.append(layout)
            else:
                self.fix(layout, f"{self.context} selects part of a permuted axis")
                if isinstance(i, slice):
                    out.append(None)
            axis += 1
        out.extend(x[axis:])
        shape = _meta_shapes(node)[0]
        return tuple(layout if layout is not None else _none(s) for layout, s in zip(out, shape))

    def split(self, node: fx.Node, x: Any) -> Any:
        dim: Any = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)  # an int
        dim = int(dim) % len(x)
        self.fix(x[dim], f"{self.context} splits a permuted axis")
        return [
            tuple(_none(s) if j == dim else layout for j, (layout, s) in enumerate(zip(x, shape)))
            for shape in _meta_shapes(node)
        ]

    def matmul(self, node: fx.Node, args: list[Any]) -> Any:
        a, b = args[0], args[1]
        if not (_is_layouts(a) and _is_layouts(b)) or len(a) < 2 or len(b) < 2:
            return self.unknown(node)
        self.unify(a[-1], b[-2], self.context)  # the contracted axis: invariant
        out = self.broadcast_batch(a[:-2], b[:-2], len(_meta_shapes(node)[0]) - 2)
        return (*out, a[-2], b[-1])

    def broadcast_batch(self, a: tuple, b: tuple, rank: int) -> list[Layout]:
        out: list[Layout] = []
        for j in range(rank):
            la = a[j - rank + len(a)] if j - rank + len(a) >= 0 else None
            lb = b[j - rank + len(b)] if j - rank + len(b) >= 0 else None
            if la is not None and lb is not None and _size(la) == _size(lb):
                out.append(self.unify(la, lb, self.context))
            else:
                self.fix(la, self.context)
                self.fix(lb, self.context)
                out.append(_none(max(_size(la or _none(1)), _size(lb or _none(1)))))
        return out

    def functional_layer_norm(self, node: fx.Node) -> Any:
        x = self._arg(node.args[0])
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        ndim = len(shape) if isinstance(shape, list | tuple) else 1
        keys = [self._key(w) for w in (weight, bias)]
        if any(w is not None and k is None for w, k in zip((weight, bias), keys)):
            return self.unknown(node)
        return self.layer_norm(x, ndim, keys[0], keys[1], self.context)

    def functional_linear(self, node: fx.Node) -> Any:
        x = self._arg(node.args[0])
        weight = self._key(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias = self._key(bias_node)
        if weight is None or (bias_node is not None and bias is None):
            return self.unknown(node)
        return self.linear(x, weight, bias, weight.rsplit(".", 1)[0])

    def aten_layer(self, node: fx.Node, kind: str) -> Any:
        """``aten.convNd(x, w, b, stride, padding, dilation, groups)``, ``aten.batch_norm(x, w,
        b, mean, var, ...)`` and ``aten.group_norm(x, groups, w, b, ...)`` of export graphs."""
        x = self._arg(node.args[0])
        args: list[Any] = list(node.args) + [None] * 7  # nodes, ints and None, by position
        # Keyword arguments of the functional forms, in the positions used below.
        names = {
            "conv": ("weight", "bias"),
            "group_norm": ("num_groups", "weight", "bias"),
            "batch_norm": ("running_mean", "running_var", "weight", "bias"),
        }[kind]
        for j, name in enumerate(names, start=1):
            if name in node.kwargs:
                args[j] = node.kwargs[name]
        if kind == "conv":
            weight, bias = self._key(args[1]), self._key(args[2])
            if weight is None or (args[2] is not None and bias is None):
                return self.unknown(node)
            return self.conv(x, weight, bias, int(args[6] or 1), weight.rsplit(".", 1)[0])
        if kind == "group_norm":
            weight, bias = self._key(args[2]), self._key(args[3])
            channels = self.shape[1]
            name = (weight or bias or self.context).rsplit(".", 1)[0]
            if (args[2] is not None and weight is None) or (args[3] is not None and bias is None):
                return self.unknown(node)
            if int(args[1]) not in (1, channels):
                self.fix(x[1], f"GroupNorm {name} ({args[1]} groups) ties channels to groups")
            for key in (weight, bias):
                self.bind(key, 0, x[1], name)
            return x
        keys = [self._key(a) for a in args[1:5]]
        if any(a is not None and k is None for a, k in zip(args[1:5], keys)):
            return self.unknown(node)
        for key in keys:
            self.bind(key, 0, x[1], self.context)
        if len(_meta_shapes(node)) > 1:  # _native_batch_norm_legit_no_training: (out, ...)
            return [x, *(_none_like([s]) for s in _meta_shapes(node)[1:])]
        return x

    def _key(self, n: Any) -> str | None:
        """The state key a node reads, if it is a parameter that no other op has bound yet."""
        if isinstance(n, fx.Node) and n.op == "get_attr" and str(n.target) in self.state:
            return str(n.target)
        return None

    def reshape(self, x: Any, node: fx.Node) -> Any:
        in_shape = _meta_shapes(node.args[0])[0]
        out_shape = _meta_shapes(node)[0]
        return self.relayout(x, tuple(in_shape), tuple(out_shape))

    def relayout(self, x: tuple[Layout, ...], a: tuple[int, ...], b: tuple[int, ...]) -> Any:
        """Layouts after reshaping ``a`` into ``b`` (row-major), axis blocks of equal product."""
        out: list[Layout] = []
        for ins, outs in _blocks(a, b):
            merged = self.merge([x[i] for i in ins], [a[i] for i in ins])
            out.extend(self.divide(merged, [b[j] for j in outs]))
        return tuple(out)

    def merge(self, layouts: list[Layout], sizes: list[int]) -> Layout:
        """One row-major axis from several: only one of them may carry vars."""
        carrying = [j for j, layout in enumerate(layouts) if _has_var(layout)]
        total = math.prod(sizes)
        if not carrying:
            return _none(total)
        if len(carrying) > 1:
            for layout in layouts:
                self.fix(layout, f"{self.context} merges two permuted axes")
            return _none(total)
        j = carrying[0]
        outer, inner = math.prod(sizes[:j]), math.prod(sizes[j + 1 :])
        block = tuple((v, c, i * inner) for v, c, i in layouts[j])
        return _simplify(block * outer)

    def divide(self, layout: Layout, sizes: list[int]) -> list[Layout]:
        """Split one axis into ``sizes`` (row-major); a permuted axis must land on one of them."""
        if len(sizes) == 1:
            return [layout]
        if not _has_var(layout):
            return [_none(s) for s in sizes]
        if len(layout) == 1:
            var, count, inner = layout[0]
            for q, s in enumerate(sizes):
                rest = math.prod(sizes[q + 1 :])
                if math.prod(sizes[:q]) == 1 and s % count == 0 and s // count * rest == inner:
                    return [
                        ((var, count, s // count),) if k == q else _none(t)
                        for k, t in enumerate(sizes)
                    ]
        self.fix(layout, f"{self.context} splits a permuted axis into {list(sizes)}")
        return [_none(s) for s in sizes]

    def _aliases(self) -> dict[str, str]:
        """Keys the graph never reads that name the same tensor as a key it does read (a module
        shared by two parents appears in the state dict under both names)."""
        owners: dict[tuple, str] = {}
        for key, value in self.state.items():
            if key in self.keys and value.numel():
                owners.setdefault((value.data_ptr(), tuple(value.shape), value.stride()), key)
        return {
            key: owners[(value.data_ptr(), tuple(value.shape), value.stride())]
            for key, value in self.state.items()
            if key not in self.keys
            and value.numel()
            and (value.data_ptr(), tuple(value.shape), value.stride()) in owners
        }

    # -- result -------------------------------------------------------------------------------

    def result(self, tracer: str) -> InferredSpec:
        names: dict[int, str] = {}
        frozen: dict[int, str] = {}
        for v in range(len(self.parent)):
            root = self._find(v)
            if self.name[v] is not None and root not in names:
                names[root] = f"P_{self.name[v]}"
                if root in self.fixed and self.fixed[root] != "network output":
                    frozen[root] = f"{self.name[v]} ({self.size[v]} units): {self.fixed[root]}"

        def group(var: int | None) -> str | None:
            if var is None:
                return None
            root = self._find(var)
            return None if root in self.fixed else names.get(root)

        spec: PermutationSpec = {}
        unused: list[str] = []
        aliases = self._aliases()
        for key, value in self.state.items():
            axes = self.keys.get(key, self.keys.get(aliases.get(key, "")))
            if axes is None:
                read = value.numel() and value.data_ptr() in self.read_storage  # e.g. a view
                if value.dim() > 0 and not key.endswith("num_batches_tracked") and not read:
                    unused.append(key)
                spec[key] = (None,) * value.dim()
                continue
            spec[key] = tuple(
                _entry(tuple((group(v), c, i) for v, c, i in self.expanded(layout)))
                if layout
                else None
                for layout in axes
            )
        groups = group_sizes(spec, self.state)
        result = InferredSpec(spec, groups, list(frozen.values()), unused, tracer)
        for line in result.frozen:
            log.info("left unpermuted: %s", line)
        if unused:
            log.warning(
                "%d state-dict keys are not read by the traced forward pass (eval mode) and stay "
                "unpermuted: %s",
                len(unused),
                ", ".join(unused[:5]),
            )
        return result


def _storage(graph: fx.GraphModule, target: str) -> tuple | None:
    """Where the tensor attribute ``target`` of ``graph`` lives (None if not a tensor)."""
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part, None)
    if not isinstance(value, Tensor) or not value.numel():
        return None
    return (value.data_ptr(), tuple(value.shape), value.stride())


@dataclass(frozen=True)
class _Param:
    """A graph value that is a parameter or buffer, read as ``state[key]``."""

    key: str


# -- small helpers -------------------------------------------------------------------------------


def _none(size: int) -> Layout:
    return ((None, int(size), 1),)


def _size(layout: Layout) -> int:
    return sum(c * i for _, c, i in layout)


def _has_var(layout: Layout | None) -> bool:
    return layout is not None and any(v is not None for v, _, _ in layout)


def _none_like(shapes: Any) -> Any:
    shapes = list(shapes)
    if len(shapes) == 1:
        return tuple(_none(s) for s in shapes[0])
    return [tuple(_none(s) for s in shape) for shape in shapes]


def _is_layouts(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(layout, tuple)
        and layout
        and isinstance(layout[0], tuple)
        and len(layout[0]) == 3
        and isinstance(layout[0][1], int)
        for layout in value
    )


def _layouts_in(value: Any) -> list[Layout]:
    """Every axis layout inside a (nested) argument value."""
    if _is_layouts(value):
        return list(value)
    if isinstance(value, list | tuple):
        return [layout for v in value for layout in _layouts_in(v)]
    if isinstance(value, dict):
        return [layout for v in value.values() for layout in _layouts_in(v)]
    return []


def _simplify(layout: Layout) -> Layout:
    """Merge neighbouring unpermuted segments."""
    out: list[tuple[int | None, int, int]] = []
    for v, c, i in layout:
        if v is None and out and out[-1][0] is None:
            out[-1] = (None, out[-1][1] * out[-1][2] + c * i, 1)
        elif v is None:
            out.append((None, c * i, 1))
        else:
            out.append((v, c, i))
    return tuple(out)


def _entry(segments: tuple[Segment, ...]) -> AxisEntry:
    merged = _simplify(segments)  # type: ignore[arg-type]
    if len(merged) == 1:
        group, _, inner = merged[0]
        if group is None:
            return None
        if inner == 1:
            return group  # type: ignore[return-value]
    return merged  # type: ignore[return-value]


def _meta_shapes(node: Any) -> list[tuple[int, ...]]:
    """Shapes of a node's tensor outputs (a tuple output gives several)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return _shapes_of_values(val)
    if hasattr(meta, "shape"):
        return [tuple(int(d) for d in meta.shape)]
    if isinstance(meta, list | tuple):
        return [tuple(int(d) for d in m.shape) for m in meta if hasattr(m, "shape")]
    return []


def _shapes_of_values(val: Any) -> list[tuple[int, ...]]:
    if isinstance(val, Tensor):
        return [tuple(int(d) for d in val.shape)]
    if isinstance(val, list | tuple):
        return [s for v in val for s in _shapes_of_values(v)]
    return []


def _blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Group axes of shape ``a`` and shape ``b`` into consecutive blocks of equal product."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins, outs, pa, pb = [], [], 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
            ins.append(i - 1)
        if j < len(b):
            pb, j = b[j], j + 1
            outs.append(j - 1)
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
                ins.append(i - 1)
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
                outs.append(j - 1)
            else:
                raise SpecInferenceError(f"cannot match reshape {tuple(a)} -> {tuple(b)}")
        blocks.append((ins, outs))
    return blocks


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    target: Callable | str = node.target  # type: ignore[assignment]
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    kind = "method" if node.op == "call_method" else "function"
    return f"{kind} {name} at {node.name}"
