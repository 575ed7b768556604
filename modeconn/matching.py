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
from typing import TypeAlias

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.models.spec import (
    AxisEntry,
    PermutationSpec,
    apply_permutation,
    axis_index,
    axis_segments,
    check_spec,
    group_sizes,
)
from modeconn.types import StateDict

__all__ = ["AlignmentResult", "align", "weight_matching", "align_models", "matching_keys"]

logger = logging.getLogger(__name__)

#: Leaf names of buffers that describe activations, not weights: permuted, never matched.
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

# Networks with up to this many matched elements are matched in float64 (exact enough that ties
# between equally good assignments are ties), laid out once per group (_StackedCost: A and B in
# every group they enter, about five float64 copies of the matched tensors, 320 MB at most);
# bigger ones in the tensors' own dtype, which is 2-3x faster on a CPU and makes no copy of any
# tensor (_TermCost). Each term's (n, n) product is summed in float64 either way.
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
        x, y = a[key], _permute_others(spec, key, b[key], None, perms)
        if dtype == torch.float64 and _on_host(x, y):  # one thread, no float64 copies
            total += float(
                np.einsum("i,i->", x.numpy().ravel(), y.numpy().ravel(), dtype=np.float64)
            )
        else:
            total += float(torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)))
    return total


#: Floating dtypes numpy shares memory with (not bfloat16).
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)

#: One gather of B's other axes: ``(position in the laid-out tensor, spec entry, axis size)``.
_Gather: TypeAlias = tuple[int, AxisEntry, int]


@dataclass(frozen=True)
class _StackedCost:
    """One group's cost for a network matched in float64: laid out once, one product a solve.

    Every term of A and B is copied once into the layout ``(*gathered, *others, inner, count)``
    (the axes B's permutations gather first, the group's blocks last) and flattened to
    ``(m, n)``; the terms are stacked into ``a`` and ``b``, ``(M, n)``. Before a solve only the
    rows of ``b`` whose tensor has a gathered axis are rewritten, gathered into them from
    ``sources`` (a gather along a leading axis copies long contiguous runs), and
    ``C = a.T @ b`` is a single ``(n, M) @ (M, n)`` product.
    """

    a: Tensor  # (M, n)
    b: Tensor  # (M, n)
    sources: tuple[tuple[Tensor, Tensor, tuple[_Gather, ...]], ...]  # (B term, rows of b, gathers)
    depends: frozenset[str]  # the groups the gathers use

    def __call__(self, perms: Mapping[str, Tensor]) -> Tensor:
        for source, out, gathers in self.sources:
            indices = []
            for position, entry, size in gathers:
                index = axis_index(entry, size, perms, source.device)
                assert index is not None  # every gathered entry names a group in perms
                indices.append((position, index))
            _gather_into(out, source, indices)
        return self.a.T @ self.b  # (n, M) @ (M, n) -> (n, n)


@dataclass(frozen=True)
class _TermCost:
    """One group's cost for a big network: each term cast and laid out on the fly.

    ``terms[i]`` is ``(term, A view, B view, gathers)``, the views being the term's segment with
    its axis first, ``(count * inner, *other axes)``: no copy of a tensor is kept. Each product
    is taken in ``dtype`` (float32 for float32 weights) and summed in float64.
    """

    terms: tuple[tuple[_Term, Tensor, Tensor, tuple[_Gather, ...]], ...]
    dtype: torch.dtype
    depends: frozenset[str]

    def __call__(self, perms: Mapping[str, Tensor]) -> Tensor:
        cost = None
        for term, a, b, gathers in self.terms:
            for position, entry, size in gathers:
                index = axis_index(entry, size, perms, b.device)
                assert index is not None
                b = b.index_select(position, index)  # B's other axes aligned with A's
            rows_a = a.reshape(term.count, -1).to(self.dtype)  # (n, m)
            rows_b = b.reshape(term.count, -1).to(self.dtype)  # (n, m)
            product = rows_a @ rows_b.T  # (n, n)
            cost = product.to(torch.float64) if cost is None else cost.add_(product)
        assert cost is not None  # a group is only solved when it has terms
        return cost


def _gathered_axes(spec: PermutationSpec, term: _Term) -> list[int]:
    """The axes of the term's tensor, other than its own, that some group permutes."""
    return [ax for ax, e in enumerate(spec[term.key]) if ax != term.axis and _names(e)]


def _laid_out(x: Tensor, term: _Term, gathered: list[int]) -> Tensor:
    """A view of the term's segment of ``x`` as ``(*gathered, *others, inner, count)``."""
    shape = list(x.shape)
    others = [ax for ax in range(len(shape)) if ax != term.axis and ax not in gathered]
    split = shape[: term.axis] + [term.count, term.inner] + shape[term.axis + 1 :]
    where = [ax if ax < term.axis else ax + 1 for ax in range(len(shape))]  # axes after split
    order = [where[ax] for ax in gathered + others] + [term.axis + 1, term.axis]
    x = x.narrow(term.axis, term.offset, term.count * term.inner).reshape(split)
    return x.permute(order)


def _on_host(*tensors: Tensor) -> bool:
    """Whether to copy and gather ``tensors`` with numpy: on the CPU, in a dtype numpy shares.

    numpy copies on one thread; torch opens a parallel region for any copy over 32k elements,
    which on a busy machine waits milliseconds for a second core to copy what takes microseconds
    (the cost of most of a solve on a shared 2-core machine).
    """
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS for t in tensors)


def _copy_into(out: Tensor, x: Tensor) -> None:
    """``out[...] = x``, cast to ``out``'s dtype."""
    if _on_host(out, x):
        np.copyto(out.numpy(), x.numpy())
    else:
        out.copy_(x)


def _gather_into(out: Tensor, source: Tensor, indices: list[tuple[int, Tensor]]) -> None:
    """``out[...] = source`` gathered by ``index`` along ``axis``, for each ``(axis, index)``."""
    if _on_host(out, source):
        x = source.numpy()
        for i, (axis, index) in enumerate(indices):
            # mode="clip" (the indices are valid) lets take write into `out` unbuffered.
            into = out.numpy() if i + 1 == len(indices) else None
            x = np.take(x, index.numpy(), axis, into, "clip")
        return
    x = source
    for axis, index in indices[:-1]:
        x = x.index_select(axis, index)
    axis, index = indices[-1]
    torch.index_select(x, axis, index, out=out)  # the last gather writes straight into `out`


def _stacked_cost(
    spec: PermutationSpec,
    terms: list[_Term],
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    dtype: torch.dtype,
) -> _StackedCost:
    n = terms[0].count
    views = []
    for term in terms:
        gathered = _gathered_axes(spec, term)
        entries, shape = spec[term.key], a[term.key].shape
        gathers = tuple((i, entries[ax], shape[ax]) for i, ax in enumerate(gathered))
        views.append(
            (
                _laid_out(a[term.key], term, gathered),
                _laid_out(b[term.key], term, gathered),
                gathers,
            )
        )
    rows = sum(view_a.numel() // n for view_a, _, _ in views)
    device = views[0][0].device
    stacked_a = torch.empty(rows, n, dtype=dtype, device=device)  # (M, n)
    stacked_b = torch.empty(rows, n, dtype=dtype, device=device)  # (M, n)
    sources, row = [], 0
    for view_a, view_b, gathers in views:
        block = slice(row, row + view_a.numel() // n)
        row = block.stop
        # One copy per tensor, casting on the way: straight into the stacked rows.
        _copy_into(stacked_a[block].view(view_a.shape), view_a)
        out = stacked_b[block].view(view_b.shape)
        if gathers:  # rows that change with the other groups: rewritten before each solve
            source = torch.empty(view_b.shape, dtype=dtype, device=device)
            _copy_into(source, view_b)
            sources.append((source, out, gathers))
        else:
            _copy_into(out, view_b)
    return _StackedCost(
        a=stacked_a,
        b=stacked_b,
        sources=tuple(sources),
        depends=frozenset(h for _, _, gs in sources for _, e, _ in gs for h in _names(e)),
    )


def _term_cost(
    spec: PermutationSpec,
    terms: list[_Term],
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    dtype: torch.dtype,
) -> _TermCost:
    prepared = []
    for term in terms:
        gathered = _gathered_axes(spec, term)
        entries, shape = spec[term.key], a[term.key].shape
        # movedim(axis, 0) keeps the other axes in order, behind the moved one.
        gathers = tuple(
            (ax + 1 if ax < term.axis else ax, entries[ax], shape[ax]) for ax in gathered
        )
        a_view, b_view = (
            x[term.key]
            .narrow(term.axis, term.offset, term.count * term.inner)
            .movedim(term.axis, 0)
            for x in (a, b)
        )
        prepared.append((term, a_view, b_view, gathers))
    depends = frozenset(h for *_, gs in prepared for _, e, _ in gs for h in _names(e))
    return _TermCost(tuple(prepared), dtype, depends)


def _names(entry: AxisEntry) -> set[str]:
    """The groups an axis entry names."""
    if entry is None:
        return set()
    if isinstance(entry, str):
        return {entry}
    return {g for g, _, _ in entry if g is not None}


def _nonlinear_groups(spec: PermutationSpec, keys: Iterable[str]) -> set[str]:
    """Groups that permute two axes of one tensor: their objective is not linear in them."""
    found: set[str] = set()
    for key in keys:
        seen: set[str] = set()
        for entry in spec[key]:
            names = _names(entry)
            found |= seen & names
            seen |= names
    return found


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
    with no gain, or after ``max_iter`` sweeps. A group is not solved again while none of the
    groups its cost gathers B by has moved since its last solve (the cost, and so the
    assignment, would be the same), so ``lsa_calls`` may be below ``sweeps x groups``; the
    permutations are those of the plain algorithm.

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

    # Precision of the costs (see _FLOAT64_ELEMENTS). A small network is copied once, cast to
    # float64 and laid out per group (_StackedCost), so that a solve is a few gathers and one
    # product; a big one is used as it is, each term cast and laid out on the fly (_TermCost),
    # so that the only full copy of a state made is the permuted result.
    small = sum(state_a[k].numel() for k in keys) <= _FLOAT64_ELEMENTS
    first = state_a[keys[0]].dtype if keys else torch.float32
    dtype = torch.float64 if small else torch.promote_types(first, torch.float32)
    a = {k: state_a[k].detach().to(device) for k in keys}
    b = {k: state_b[k].detach().to(device) for k in keys}
    terms = _prepare_terms(spec, keys, state_a, sizes)
    groups = sorted(g for g in sizes if terms[g])
    costs = {
        g: _stacked_cost(spec, terms[g], a, b, dtype)
        if small
        else _term_cost(spec, terms[g], a, b, dtype)
        for g in groups
    }
    perms = {g: torch.arange(sizes[g], device=device) for g in sorted(sizes)}
    current = {g: np.arange(sizes[g]) for g in groups}  # perms[g] on the host, for the gains

    # When every group enters each tensor through one axis, the objective is linear in each
    # group and changes by exactly the accepted gain of its assignment: it is tracked from the
    # cost matrices. Otherwise it is recomputed after every sweep.
    incremental = not _nonlinear_groups(spec, keys)
    # A group's cost depends only on the groups its terms gather B by. When none of them has
    # moved since the group was last solved, its cost, and so its assignment, would come out
    # the same: the solve is skipped (typically half the last sweep, and more on chains).
    moved = dict.fromkeys(groups, -1)  # step at which each permutation last changed
    solved: dict[str, int] = {}  # step at which each group was last solved
    generator = torch.Generator().manual_seed(seed)
    objective = [_objective(spec, a, b, {}, dtype)]  # identity: nothing to gather
    logger.info("weight matching: %d groups, identity objective %.6g", len(groups), objective[0])
    lsa_seconds, lsa_calls, sweeps, converged, step = 0.0, 0, 0, False, 0
    for sweep in range(max_iter):
        improved, value = False, objective[-1]
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            step += 1
            last = solved.get(group)
            if last is not None and all(moved[h] < last for h in costs[group].depends):
                continue
            solved[group] = step
            c = costs[group](perms).cpu().numpy()  # (n, n) float64
            tic = time.perf_counter()
            _, cols = linear_sum_assignment(c, maximize=True)
            lsa_seconds += time.perf_counter() - tic
            lsa_calls += 1
            rows = np.arange(len(cols))
            old = float(c[rows, current[group]].sum())
            new = float(c[rows, cols].sum())
            if new > old + _REL_TOL * max(1.0, abs(old)):
                perms[group] = torch.as_tensor(cols, dtype=torch.long, device=device)
                current[group] = cols
                moved[group] = step
                value += new - old
                improved = True
        sweeps = sweep + 1
        objective.append(value if incremental else _objective(spec, a, b, perms, dtype))
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
    from modeconn.models.infer import infer_spec
    from modeconn.models.verify import check_permutation_invariance

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
