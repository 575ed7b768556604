"""Git Re-Basin weight matching: permute network B's hidden units onto network A's.

Ainsworth, Hayase & Srinivasa 2022, "Git Re-Basin: Merging Models modulo Permutation
Symmetries" (arXiv 2209.04836), Algorithm 1 ("weight matching"). Two networks trained
independently compute the same family of functions up to a renaming of hidden units; choosing
the renaming of B that best correlates its weights with A's removes most of the loss barrier on
the straight line between them, which is why every path in this library starts from aligned
endpoints.

The objective is ``sum_k <A_k, pi(B)_k>`` over the weight tensors ``k``. It is maximised by
coordinate ascent over the permutation groups of a :data:`models.spec.PermutationSpec` (inferred
from the network's graph by :mod:`models.infer` unless given): with
every other group fixed, the objective is linear in one group's permutation matrix, so one
linear assignment problem (``scipy.optimize.linear_sum_assignment``) solves that group exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.types import StateDict
from models.spec import (
    PermutationSpec,
    apply_permutation,
    axis_index,
    axis_segments,
    check_spec,
    group_sizes,
)

__all__ = ["AlignmentResult", "align", "weight_matching", "align_models", "matching_keys"]

logger = logging.getLogger(__name__)

#: Leaf names of buffers that describe activations, not weights: permuted, never matched.
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

# Networks with up to this many matched elements are matched in float64 (exact enough that ties
# between equally good assignments are ties); bigger ones in the tensors' own dtype, which is 2-3x
# faster on a CPU and makes no float64 copy of any tensor. Each term's (n, n) product is summed in
# float64 either way.
_FLOAT64_ELEMENTS = 8_000_000

# A sweep counts as a gain only above this relative improvement of one group's objective; it
# absorbs float64 summation noise so ties between equally good assignments never cycle.
_REL_TOL = 1e-10


@dataclass(frozen=True)
class AlignmentResult:
    """What :func:`weight_matching` found.

    ``perms[g]`` is a LongTensor ``p`` with ``aligned = B[p]`` along every axis of group ``g``;
    ``state`` is the full permuted state dict of B (BatchNorm running statistics included);
    ``objective`` holds ``sum_k <A_k, pi(B)_k>`` for the identity and after each sweep.
    ``lsa_seconds``/``lsa_calls`` time the linear assignment solves (for benchmarks);
    ``converged`` is False when ``max_iter`` sweeps ran out before a sweep without gain.
    """

    perms: dict[str, Tensor]
    state: StateDict
    objective: list[float]
    sweeps: int
    seconds: float
    lsa_seconds: float = 0.0
    lsa_calls: int = 0
    converged: bool = True


@dataclass(frozen=True)
class _Term:
    """One permuted segment of one matched tensor: the (key, axis, segment) a group touches."""

    key: str
    axis: int
    offset: int  # first element of the segment along `axis`
    count: int  # the group's size: blocks in the segment
    inner: int  # elements per block


def matching_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys used for matching by default: floating tensors other than BN running statistics."""
    return [
        key
        for key, value in state.items()
        if value.is_floating_point() and key.rsplit(".", 1)[-1] not in _RUNNING_STATS
    ]


def _check_pair(
    spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]
):
    check_spec(spec, state_a)
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise ValueError(f"state_a and state_b have different keys: {diff[:5]}")
    for key, value in state_a.items():
        if state_b[key].shape != value.shape:
            raise ValueError(
                f"{key!r} has shape {tuple(value.shape)} in state_a "
                f"but {tuple(state_b[key].shape)} in state_b"
            )


def _prepare_terms(
    spec: PermutationSpec, keys: Iterable[str], state: Mapping[str, Tensor], groups: Iterable[str]
) -> dict[str, list[_Term]]:
    terms: dict[str, list[_Term]] = {group: [] for group in groups}
    for key in keys:
        shape = state[key].shape
        for axis, entry in enumerate(spec[key]):
            offset = 0
            for group, count, inner in axis_segments(entry, shape[axis]):
                if group is not None:
                    terms[group].append(_Term(key, axis, offset, count, inner))
                offset += count * inner
    return terms


def _segment_rows(x: Tensor, term: _Term, dtype: torch.dtype) -> Tensor:
    """The term's segment of ``x`` as rows, one per block: ``(count, m)``."""
    x = x.narrow(term.axis, term.offset, term.count * term.inner).movedim(term.axis, 0)
    return x.reshape(term.count, -1).to(dtype)


def _permute_others(
    spec: PermutationSpec, key: str, x: Tensor, skip: int | None, perms: Mapping[str, Tensor]
) -> Tensor:
    """``x`` with every axis but ``skip`` permuted by the current ``perms``."""
    for axis, entry in enumerate(spec[key]):
        if axis == skip:
            continue
        index = axis_index(entry, x.shape[axis], perms, x.device)
        if index is not None:
            x = x.index_select(axis, index)
    return x


def _objective(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    perms,
    dtype: torch.dtype,
) -> float:
    """``sum_k <A_k, pi(B)_k>``, one tensor at a time (no copy of the whole state)."""
    total = 0.0
    for key in a:
        permuted = _permute_others(spec, key, b[key], None, perms)
        total += float(torch.vdot(a[key].reshape(-1).to(dtype), permuted.reshape(-1).to(dtype)))
    return total


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    keys: Iterable[str] | None = None,
) -> AlignmentResult:
    """Permute ``state_b`` onto ``state_a`` by weight matching (Ainsworth et al. 2022, Alg. 1).

    Starts from identity permutations. Each sweep visits the groups (sorted by name) in the
    order ``torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed))`` (one
    generator for the whole run, one draw per sweep). For group ``P`` the ``n x n`` cost
    ``C = sum_w A_w @ B_w.T`` runs over every matched tensor with an axis in ``P``: ``A_w`` is
    A's tensor with P's axis first, flattened; ``B_w`` is B's with every *other* axis's current
    permutation applied, P's axis first, flattened. ``linear_sum_assignment(C, maximize=True)``
    gives P's new permutation, kept when it improves on the current one. Stops after a sweep
    with no gain, or after ``max_iter`` sweeps.

    Args:
        spec: permutation spec covering every key of the state dicts (e.g. ``models.infer_spec(model, x).spec``).
        state_a, state_b: state dicts with the same keys and shapes.
        max_iter: at most this many sweeps.
        seed: seeds the order in which groups are visited.
        device: where the cost matrices are computed (default: the device of ``state_a``).
        keys: the tensors that are matched; default :func:`matching_keys` (parameters, not BN
            running statistics). Every key of ``state_b`` is permuted either way.

    Returns:
        :class:`AlignmentResult`; ``perms`` and ``state`` live on ``state_b``'s device.
    """
    start = time.perf_counter()
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    _check_pair(spec, state_a, state_b)
    sizes = group_sizes(spec, state_a)
    keys = matching_keys(state_a) if keys is None else list(keys)
    unknown = [k for k in keys if k not in state_a]
    if unknown:
        raise ValueError(f"keys to match are not in the state dicts: {unknown[:5]}")
    if device is None:
        device = next(iter(state_a.values())).device if state_a else torch.device("cpu")
    device = torch.device(device)

    # The matched tensors stay as they are; each cost term is cast on the fly, so the only full
    # copy of a state made is the permuted result.
    a = {k: state_a[k].detach().to(device) for k in keys}
    b = {k: state_b[k].detach().to(device) for k in keys}
    terms = _prepare_terms(spec, keys, state_a, sizes)
    groups = sorted(g for g in sizes if terms[g])
    perms = {g: torch.arange(sizes[g], device=device) for g in sorted(sizes)}

    generator = torch.Generator().manual_seed(seed)
    # Precision of the costs (see _FLOAT64_ELEMENTS): float64 unless the network is big.
    dtype = torch.float64
    if sum(a[k].numel() for k in keys) > _FLOAT64_ELEMENTS:
        dtype = torch.promote_types(next(iter(a.values())).dtype, torch.float32)
    objective = [_objective(spec, a, b, perms, dtype)]
    logger.info("weight matching: %d groups, identity objective %.6g", len(groups), objective[0])
    lsa_seconds, lsa_calls, sweeps, converged = 0.0, 0, 0, False
    for sweep in range(max_iter):
        improved = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            n = sizes[group]
            cost = torch.zeros(n, n, dtype=torch.float64, device=device)  # (n, n)
            for term in terms[group]:
                b_other = _permute_others(spec, term.key, b[term.key], term.axis, perms)
                # (n, m) @ (m, n) -> (n, n): A's blocks against B's, other axes aligned.
                rows_a = _segment_rows(a[term.key], term, dtype)
                product = rows_a @ _segment_rows(b_other, term, dtype).T
                cost += product.to(torch.float64)
            c = cost.cpu().numpy()
            tic = time.perf_counter()
            _, cols = linear_sum_assignment(c, maximize=True)
            lsa_seconds += time.perf_counter() - tic
            lsa_calls += 1
            current = perms[group].cpu().numpy()
            old = float(c[np.arange(n), current].sum())
            new = float(c[np.arange(n), cols].sum())
            if new > old + _REL_TOL * max(1.0, abs(old)):
                perms[group] = torch.as_tensor(cols, dtype=torch.long, device=device)
                improved = True
        sweeps = sweep + 1
        objective.append(_objective(spec, a, b, perms, dtype))
        logger.info(
            "weight matching sweep %d: objective %.6g (gain %.3g)",
            sweeps,
            objective[-1],
            objective[-1] - objective[-2],
        )
        if not improved:
            converged = True
            break
    if not converged:
        logger.warning(
            "weight matching stopped after max_iter=%d sweeps without converging", sweeps
        )

    out_device = next(iter(state_b.values())).device if state_b else torch.device("cpu")
    perms = {g: p.to(out_device) for g, p in perms.items()}
    state = apply_permutation(state_b, spec, perms)
    return AlignmentResult(
        perms=perms,
        state=state,
        objective=objective,
        sweeps=sweeps,
        seconds=time.perf_counter() - start,
        lsa_seconds=lsa_seconds,
        lsa_calls=lsa_calls,
        converged=converged,
    )


def align_models(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    probe_inputs: Tensor,
    *,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
    atol: float = 1e-4,
) -> AlignmentResult:
    """Weight-match ``state_b`` onto ``state_a``, with a spec proven on the network first.

    ``spec`` defaults to the one inferred from ``model``'s graph (:func:`models.infer.infer_spec`).
    Either way it is proven before use: a random permutation of A must leave the outputs on
    ``probe_inputs`` unchanged (:func:`models.verify.check_permutation_invariance`, float64).
    After matching, B and the permuted B are compared the same way (float32, relative ``atol``);
    a ``RuntimeError`` quoting the difference is raised otherwise. Only parameters are matched;
    every key, BatchNorm running statistics included, is permuted. The module is left as it was.
    """
    from models.infer import infer_spec
    from models.verify import check_permutation_invariance

    device = next(iter(state_b.values())).device
    x = probe_inputs.to(device)
    if spec is None:
        spec = infer_spec(model, x[:2]).spec
    check_spec(spec, state_a)
    check_permutation_invariance(model, spec, x[:32], state=state_a, seed=seed)
    params = [name for name, _ in model.named_parameters()]
    result = weight_matching(
        spec,
        state_a,
        state_b,
        max_iter=max_iter,
        seed=seed,
        keys=[k for k in params if k in state_a],
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = functional_call(model, dict(state_b), (x,))
            after = functional_call(model, result.state, (x,))
    finally:
        model.train(was_training)
    scale = max(1.0, float(before.abs().max()))
    diff = float((after - before).abs().max()) / scale
    if not diff <= atol:
        raise RuntimeError(
            f"permuted B computes a different function: max |f(pi(B)) - f(B)| / {scale:.3g} = "
            f"{diff:.3g} > atol={atol:g} on {len(x)} probe inputs; the permutation spec is "
            "probably wrong (a group applied to a layer's output but not to its consumers)"
        )
    logger.info("alignment verified on %d probe inputs: relative max diff %.3g", len(x), diff)
    return result


def align(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    inputs: Tensor | None = None,
    *,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> AlignmentResult:
    """Permute ``state_b``'s hidden units onto ``state_a``'s (Git Re-Basin weight matching).

    Works on any ``nn.Module``: the permutation spec is inferred from the traced graph unless
    ``spec`` is given, and proven on the network before use. ``inputs`` is a batch the model
    accepts (real data is best); it may be omitted for models built by ``models.create_model``,
    which record their input shape (random inputs are used then). Returns an
    :class:`AlignmentResult` whose ``state`` is B permuted, computing the same function as B.
    """
    if inputs is None:
        config = getattr(model, "modeconn_config", None)
        if config is None:
            raise ValueError(
                f"align({type(model).__name__}, ...) needs inputs=: a batch the model accepts "
                "(e.g. 64 training inputs), to trace the network and prove its permutation spec"
            )
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(64, *config["input_shape"], generator=generator)
    return align_models(model, state_a, state_b, inputs, spec=spec, max_iter=max_iter, seed=seed)
