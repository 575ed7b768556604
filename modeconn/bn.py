"""BatchNorm handling for weights that were never trained as they are.

A point ``w(t)`` between two networks needs its own BatchNorm statistics: the endpoints' running
statistics do not describe the activations of an interpolated network, and using them is the
best known trap of mode connectivity (wrong accuracy even at t = 0 once anything moves). We
recompute them with a cumulative average over training batches (``momentum=None``), like
``torch.optim.swa_utils.update_bn``, but functionally: the module is never modified for good.

The statistics are averages, so a few thousand inputs estimate them about as well as the whole
training set: by default they come from a fixed, seeded subset of :data:`DEFAULT_BN_EXAMPLES`
training inputs (:func:`bn_subset`), chosen the same way wherever statistics are recomputed, so
that every consumer of one artifact (evaluation, ensembles, merges, ONNX export) agrees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.types import StateDict

__all__ = [
    "DEFAULT_BN_EXAMPLES",
    "BN_SEED",
    "bn_subset",
    "check_bn_examples",
    "has_batchnorm",
    "batchnorm_buffer_names",
    "batch_stats_mode",
    "recompute_bn",
    "parameter_names",
    "split_state",
]


#: Training inputs BatchNorm statistics are recomputed from by default. Measured on 4,500 28x28
#: digits (a BatchNorm CNN, the straight path between aligned endpoints, 11 points), against the
#: whole training set: 2048 inputs move the test loss by at most 0.003 (0.9 %) and the test
#: accuracy by 0.34 points; 1024 by 0.005 and 0.8 points, 512 by 0.016 and 0.8, 3072 by 0.003 and
#: 0.34. A recomputation costs in proportion to the count (2048: 82 ms against 179 ms for all).
DEFAULT_BN_EXAMPLES = 2048
#: Seed of the generator that draws the subset: fixed, so one data set gives one subset.
BN_SEED = 0


def check_bn_examples(examples: int | None) -> int | None:
    """``examples`` as :func:`bn_subset` takes it: a positive count, or None for all inputs
    (0 also means all)."""
    if examples is None:
        return None
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(
            f"bn_examples must be a positive number of training inputs, or 0/None for all of "
            f"them, got {examples!r}"
        )
    return examples or None


def bn_subset(inputs: Tensor, examples: int | None = DEFAULT_BN_EXAMPLES) -> Tensor:
    """The training inputs BatchNorm statistics are recomputed from: ``examples`` of ``inputs``.

    Drawn without replacement by a generator seeded with :data:`BN_SEED`, so the same inputs
    and count always give the same subset, and kept in the drawn (shuffled) order: batches of
    a training set stored sorted by class then still mix classes, and the average of their
    variances is not biased low. ``None`` or ``0`` (or a count of at least ``len(inputs)``)
    gives ``inputs`` themselves, in their order: what artifacts written before subsets used.
    """
    examples = check_bn_examples(examples)
    if examples is None or examples >= len(inputs):
        return inputs
    generator = torch.Generator().manual_seed(BN_SEED)
    index = torch.randperm(len(inputs), generator=generator)[:examples]  # (examples,)
    return inputs[index.to(inputs.device)]  # (examples, *input_shape)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def batchnorm_buffer_names(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm running statistic (empty for BN-free models)."""
    names = []
    for prefix, bn in _batchnorms(model):
        if bn.track_running_stats:
            stem = f"{prefix}." if prefix else ""
            names += [f"{stem}running_mean", f"{stem}running_var", f"{stem}num_batches_tracked"]
    return names


def parameter_names(model: nn.Module) -> list[str]:
    """Keys of the trainable parameters, in ``state_dict`` order: what path nodes hold."""
    return [name for name, _ in model.named_parameters()]


def split_state(model: nn.Module, state: StateDict) -> tuple[StateDict, StateDict]:
    """Split a full state dict into (parameters, buffers)."""
    names = set(parameter_names(model))
    params = {k: v for k, v in state.items() if k in names}
    buffers = {k: v for k, v in state.items() if k not in names}
    return params, buffers


@contextlib.contextmanager
def batch_stats_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode with BatchNorm normalising by batch statistics only, tracking nothing.

    This is how every fitter runs a model: running statistics at interior points are
    meaningless during fitting, and a BN layer that updates buffers in place cannot be batched
    with ``torch.func.vmap``. Everything is restored on exit.
    """
    saved = []
    for _, bn in _batchnorms(model):
        saved.append(
            (bn, bn.track_running_stats, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        )
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        model.train(was_training)
        for bn, track, mean, var, count in saved:
            bn.track_running_stats = track
            bn.running_mean = mean
            bn.running_var = var
            bn.num_batches_tracked = count


@torch.no_grad()
def recompute_bn(
    model: nn.Module,
    params: StateDict,
    inputs: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> StateDict:
    """BatchNorm running statistics for the network with ``params``, from ``inputs``.

    A cumulative (equal-weight) average over the batches of ``inputs`` (typically the training
    inputs, unaugmented). Returns only the BN buffers; ``{}`` for a model without BatchNorm.
    The module's own buffers, momentum and train/eval mode are left as they were.
    """
    bns = _batchnorms(model)
    if not bns:
        return {}
    device = torch.device(device) if device is not None else inputs.device
    buffers: StateDict = {}
    for prefix, bn in bns:
        stem = f"{prefix}." if prefix else ""
        buffers[f"{stem}running_mean"] = torch.zeros(bn.num_features, device=device)
        buffers[f"{stem}running_var"] = torch.ones(bn.num_features, device=device)
        buffers[f"{stem}num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=device)
    momenta = [bn.momentum for _, bn in bns]
    was_training = model.training
    try:
        for _, bn in bns:
            bn.momentum = None  # cumulative moving average over the batches seen
        model.train()
        # BN's forward updates the buffers we pass in place, so `buffers` accumulates the stats.
        state = {**{k: v.to(device) for k, v in params.items()}, **buffers}
        for begin in range(0, len(inputs), batch_size):
            functional_call(model, state, (inputs[begin : begin + batch_size].to(device),))
    finally:
        model.train(was_training)
        for (_, bn), momentum in zip(bns, momenta):
            bn.momentum = momentum
    return buffers
