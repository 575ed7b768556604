"""A chain of nodes shared out across ranks: each rank owns a contiguous block of the interior.

NEB/AutoNEB pivots (:mod:`modeconn.fit.neb`) and geodesic nodes (:mod:`modeconn.fit.geodesic`)
interact only with their neighbours along the chain, so under ``torchrun`` each rank keeps and
updates only its block of the interior nodes and asks its peers for the few rows it needs:
the nodes (or their predictions) next to its block, now and then a node from further away.
No rank ever holds the whole chain on its device.

Rows are numbered along the chain: ``0`` is the start, ``size - 1`` the end (both fixed and
known to every rank), ``1 .. size - 2`` the interior, shared out by
:func:`modeconn.distributed.blocks` (contiguous, in rank order, sizes differing by at most
one; a rank may own none when there are fewer interior nodes than ranks).

Every exchange here is *planned identically on every rank*: who wants which rows is a pure
function of numbers every rank has (the chain's size, its global per-segment scalars), so no
rank has to ask before it is sent something, and every send meets its receive. Values are
only copied, never combined, so what a rank receives is bitwise what its owner holds; the sums
used to gather scalars add each value to zeros only, which is exact.

In one process (no group) every function here reduces to local indexing: no copies of the
whole chain, and the fitters' arithmetic is the same as before sharding existed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from modeconn import distributed

__all__ = [
    "Shard",
    "Wants",
    "fetch_rows",
    "halo_wants",
    "gather_rows",
    "assemble",
    "assemble_together",
    "agree",
    "any_rank",
]

#: Rows wanted by each rank, indexed by rank: chain row numbers.
Wants = Sequence[Sequence[int]]


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s block of the interior of a chain of ``size`` rows (endpoints included).

    ``lo:hi`` are the chain rows it owns (``hi == lo`` when it owns none); its *band* is rows
    ``lo - 1 .. hi``: its block plus one neighbour on each side, the rows an update of the
    block reads.
    """

    size: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"a chain has at least its two endpoints, got size {self.size}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    @classmethod
    def of(cls, size: int) -> Shard:
        """This process's block of a chain of ``size`` rows (all of it without a group)."""
        return cls(size, distributed.rank(), distributed.world_size())

    @property
    def interior(self) -> int:
        return self.size - 2

    @functools.cached_property
    def bounds(self) -> list[tuple[int, int]]:
        """Chain rows ``(lo, hi)`` owned by each rank."""
        return [(lo + 1, hi + 1) for lo, hi in distributed.blocks(self.interior, self.world)]

    @property
    def lo(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def hi(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def count(self) -> int:
        """How many interior rows this rank owns."""
        return self.hi - self.lo

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def owner(self, row: int) -> int | None:
        """The rank owning chain row ``row``; None for the endpoints (every rank has them)."""
        if row <= 0 or row >= self.size - 1:
            return None
        for rank, (lo, hi) in enumerate(self.bounds):
            if lo <= row < hi:
                return rank
        raise ValueError(f"row {row} is outside a chain of {self.size} rows")

    def take(self, whole: Tensor) -> Tensor:
        """This rank's block of ``whole``, a tensor over the interior ``(size - 2, ...)`` (saved
        nodes, optimiser moments)."""
        if whole.dim() == 0 or len(whole) != self.interior:
            raise ValueError(
                f"expected a tensor over the {self.interior} interior rows, got shape "
                f"{tuple(whole.shape)}"
            )
        return whole[self.lo - 1 : self.hi - 1]

    def on(self, rank: int) -> Shard:
        """The same chain seen from ``rank`` (to plan what a peer wants)."""
        return Shard(self.size, rank, self.world)

    def edge_segment(self) -> bool:
        """Whether this rank accounts for the chain's last segment (or pair of neighbours):
        the one that owns the last interior row, or rank 0 of a chain without interior. Every
        rank accounts for the segments to the left of its rows, so together the ranks count
        each of the ``size - 1`` segments once."""
        if self.interior == 0:
            return self.rank == 0
        return self.count > 0 and self.hi == self.size - 1


def _run(ops: list[dist.P2POp]) -> None:
    """Start every send and receive, then wait for all of them.

    nccl needs them in one group (a lone send waits for its receive, and two ranks sending to
    each other first would deadlock); gloo runs each asynchronously, and grouping them there
    only adds cost (~0.7 ms against ~0.4 ms for a pair of one-row messages on two CPU cores).
    """
    if not ops:
        return
    if dist.get_backend() == "nccl":
        works = dist.batch_isend_irecv(ops)
    else:
        works = [op.op(op.tensor, op.peer) for op in ops]
    for work in works:
        if work is not None:
            work.wait()


def fetch_rows(shard: Shard, owns: Sequence[Tensor], wants: Wants) -> list[Tensor]:
    """Interior rows ``wants[shard.rank]`` of each of ``owns``, in that order, in one exchange.

    Each of ``owns`` is this rank's block ``(count, ...)`` of a tensor over the chain's rows
    (positions, their losses, their predictions). Every rank calls this with the same
    ``wants`` (the rows wanted by each rank): each sends every peer the rows of its blocks that
    the peer wants, and receives what it wants from their owners, all sends and receives
    started together. No endpoints: every rank has those.
    """
    mine = list(wants[shard.rank])
    ops, received = [], []
    for own in owns:
        got: dict[int, Tensor] = {
            row: own[row - shard.lo] for row in mine if shard.lo <= row < shard.hi
        }
        for peer, (lo, hi) in enumerate(shard.bounds):
            if peer == shard.rank:
                continue
            sent = sorted({row for row in wants[peer] if shard.lo <= row < shard.hi})
            if sent:
                index = torch.tensor([r - shard.lo for r in sent], device=own.device)
                ops.append(dist.P2POp(dist.isend, own.index_select(0, index), peer))
            rows = sorted({row for row in mine if lo <= row < hi})
            if rows:
                buffer = own.new_empty((len(rows), *own.shape[1:]))
                ops.append(dist.P2POp(dist.irecv, buffer, peer))
                got.update({row: buffer[k] for k, row in enumerate(rows)})
        missing = [row for row in mine if row not in got]
        if missing:
            raise ValueError(f"rows {missing[:5]} are not interior rows of a chain of {shard.size}")
        received.append(got)
    _run(ops)
    out = []
    for own, got in zip(owns, received):
        rows = own.new_empty((len(mine), *own.shape[1:]))
        for k, row in enumerate(mine):
            rows[k] = got[row]
        out.append(rows)
    return out


def halo_wants(shard: Shard) -> list[list[int]]:
    """For every rank, the interior rows of its band that it does not own: its neighbours."""
    wants = []
    for rank in range(shard.world):
        view = shard.on(rank)
        wants.append([r for r in (view.lo - 1, view.hi) if 0 < r < shard.size - 1])
    return wants


def gather_rows(
    shard: Shard, own: Tensor, *, dst: int | None = None, device: torch.device | None = None
) -> Tensor | None:
    """The whole interior ``(size - 2, ...)`` from every rank's block ``own``.

    On every rank (``dst=None``) or on rank ``dst`` only (the others get None). One block
    travels at a time, so the device holds at most one peer's block besides its own; the
    result is assembled on ``device`` (default ``own``'s: pass the CPU to keep a chain larger
    than the device off it).
    """
    device = own.device if device is None else torch.device(device)
    if not shard.sharded:
        return own.to(device)
    keep = dst is None or shard.rank == dst
    out = own.new_empty((shard.interior, *own.shape[1:]), device=device) if keep else None
    for peer, (lo, hi) in enumerate(shard.bounds):
        if hi == lo:
            continue
        mine = peer == shard.rank
        block = own.contiguous() if mine else own.new_empty((hi - lo, *own.shape[1:]))
        if dst is None:
            dist.broadcast(block, src=peer)
        elif peer != dst and shard.rank in (peer, dst):
            _run([dist.P2POp(dist.isend if shard.rank == peer else dist.irecv, block,
                             dst if shard.rank == peer else peer)])  # fmt: skip
        if out is not None:
            out[lo - 1 : hi - 1] = block
    return out


def assemble(shard: Shard, own: Tensor, start: int, total: int) -> Tensor:
    """Per-item values from every rank, ``(total, ...)``: this rank's ``own`` sit at
    ``start:start + len(own)``.

    Each item must come from exactly one rank. Sharded, the ranks sum zero-filled copies:
    each entry adds a value to zeros only, which is exact. In one process ``own`` must cover
    all ``total`` items and is returned as it is.
    """
    return assemble_together(shard, [(own, start, total)])[0]


def assemble_together(shard: Shard, parts: Sequence[tuple[Tensor, int, int]]) -> list[Tensor]:
    """:func:`assemble` of several ``(own, start, total)`` parts in one exchange.

    Parts of different dtypes travel as float64 (exact for every smaller float) and come back
    in their own dtype.
    """
    if not shard.sharded:
        for own, start, total in parts:
            if start != 0 or len(own) != total:
                raise ValueError(f"one process must supply all {total} values, got {len(own)}")
        return [own for own, _, _ in parts]
    dtypes = {own.dtype for own, _, _ in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    shapes = [(total, *own.shape[1:]) for own, _, total in parts]
    sizes = [math.prod(shape) for shape in shapes]
    flat = parts[0][0].new_zeros(sum(sizes), dtype=dtype)
    for (own, start, _), shape, piece in zip(parts, shapes, flat.split(sizes)):
        piece.view(shape)[start : start + len(own)] = own
    distributed.all_reduce_sum(flat)
    return [
        piece.view(shape).to(own.dtype)
        for (own, _, _), shape, piece in zip(parts, shapes, flat.split(sizes))
    ]


def agree(what: str, value: object) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same JSON-able ``value``.

    Ranks launched with different options would exchange mismatched rows or wait forever on a
    collective the others never reach: check once, before the fit.
    """
    if not distributed.active():
        return
    text = json.dumps(value, sort_keys=True, default=str).encode()
    code = int.from_bytes(hashlib.sha256(text).digest()[:7], "big")  # exact in int64
    codes = torch.tensor([code, -code], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(codes, op=dist.ReduceOp.MAX)
    if int(codes[0]) != -int(codes[1]):
        raise ValueError(
            f"the {distributed.world_size()} ranks disagree on {what}: launch every rank with "
            "the same command, options and files"
        )


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if not distributed.active():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _collective_device() -> torch.device:
    """Where a small tensor must live for a collective: nccl reduces only on the GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
