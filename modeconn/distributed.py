"""Several processes, one fit: ``torch.distributed`` as ``torchrun`` launches it.

``torchrun --nproc-per-node N -m modeconn connect ...`` starts N copies of the same command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in their environment.
:func:`setup` joins them into the default process group (gloo for CPU tensors, nccl for CUDA,
chosen from the device) once per process; everything else here is a small, explicit vocabulary
the fitters use:

* :func:`rank`, :func:`world_size`, :func:`is_main`: who am I (0 and 1 without a group, so
  one process needs no special case);
* :func:`block` / :func:`blocks`: the contiguous share of ``n`` items (rows of a batch, nodes
  of a path) that a rank owns; the first ``n % world`` ranks take one more;
* :func:`all_reduce_sum` / :func:`broadcast`: in place, no-ops in one process;
* :func:`shard` / :func:`all_reduce_gradients`: data parallelism (below);
* :func:`main_first`: rank 0 does something (writes a file) while the others wait for it.

Data parallelism, as the curve fits, FGE and endpoint training use it: every rank draws the
same mini-batch (same seed, same stream, same ``t``), keeps its contiguous block of rows
(:func:`shard`), weights its mean loss by its share of the rows, and the gradients are summed
over the ranks (:func:`all_reduce_gradients`, one flat buffer per step). The sum is the
gradient of the full batch's mean loss, so every rank takes the same optimiser step and the
state stays identical everywhere. Only the summation order differs from one process: a fit of
a model without BatchNorm ends within float rounding of the one-process fit. BatchNorm
normalises each rank's block by that block's own statistics (as ``DistributedDataParallel``
does by default), so a BatchNorm model's fit is a different, equally valid, fit.

Only rank 0 writes artifacts and checkpoints: the other ranks hold the same state (data
parallelism keeps it identical) or send theirs to rank 0 first (sharded nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "launched",
    "setup",
    "teardown",
    "active",
    "rank",
    "world_size",
    "is_main",
    "block",
    "blocks",
    "all_reduce_sum",
    "broadcast",
    "shard",
    "all_reduce_gradients",
    "barrier",
    "main_first",
]

log = logging.getLogger("modeconn")

#: How long a collective may wait for a peer before the group gives up (a dead rank must not
#: hang the others forever).
TIMEOUT = datetime.timedelta(minutes=30)
#: How long a :func:`barrier` waits: there the other ranks wait for rank 0's solitary work
#: (evaluating a fitted path, writing the artifact), which may outlast any collective. A rank
#: that dies still ends the wait at once: ``torchrun`` stops the others.
WAIT_TIMEOUT = datetime.timedelta(hours=24)

_Rows = TypeVar("_Rows", bound=tuple[Tensor, ...])

_waiting: dist.ProcessGroup | None = None  # a gloo group for barriers (any backend), in setup


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with peers."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def setup(device: torch.device | str = "cpu") -> bool:
    """Join the process group ``torchrun`` described in the environment, once; True if this
    process now runs with peers. The backend follows ``device``: nccl for CUDA (each rank on
    ``cuda:LOCAL_RANK``), gloo otherwise. Does nothing (False) when not launched with peers."""
    if active():
        return True
    if not launched():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    global _waiting
    # Made by every rank, in the same order; every rank is a member.
    _waiting = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    log.debug("rank %d of %d joined (%s)", rank(), world_size(), backend)
    return True


def teardown() -> None:
    """Leave the process group (every rank must call it; safe without one). A process that
    exits without it makes ``torch.distributed`` warn, or abort (nccl), at exit."""
    global _waiting
    _waiting = None
    if active():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group; 0 without one."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks; 1 without a group."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that writes files and prints reports."""
    return rank() == 0


def blocks(n: int, world: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of each rank's contiguous share of ``n`` items; the first ``n % world``
    ranks take one more, so shares differ by at most one (a rank may get none)."""
    world = world_size() if world is None else world
    if world < 1 or n < 0:
        raise ValueError(f"cannot share {n} items among {world} ranks")
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def block(n: int, who: int | None = None, world: int | None = None) -> slice:
    """This rank's (or rank ``who``'s) share of ``n`` items, as a slice."""
    start, stop = blocks(n, world)[rank() if who is None else who]
    return slice(start, stop)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks, in place (unchanged in one process); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def shard(batch: _Rows) -> tuple[_Rows, float]:
    """This rank's block of rows of a mini-batch ``(inputs, labels, ...)`` and its share of
    the batch (rows kept / rows), the weight of its mean loss.

    Every rank must be given the same batch. Summed over the ranks, ``share * mean loss of
    the block`` is the mean loss of the whole batch, and so are its gradients: blocks may
    differ in size by one row. One process: the batch itself and 1.0.
    """
    rows = len(batch[0])
    world = world_size()
    if world == 1:
        return batch, 1.0
    if rows < world:
        raise ValueError(
            f"a mini-batch of {rows} rows cannot be shared among {world} ranks; use a batch "
            f"size of at least {world} (or fewer processes)"
        )
    rows_here = block(rows)
    share = (rows_here.stop - rows_here.start) / rows
    return cast(_Rows, tuple(t[rows_here] for t in batch)), share


def all_reduce_gradients(parameters: Iterable[Tensor], loss: Tensor) -> Tensor:
    """Sum the ``.grad`` of ``parameters`` and the (share-weighted) ``loss`` over the ranks, in
    one all-reduce of one flat buffer; returns the summed loss, detached.

    One collective per step rather than one per tensor: the per-call latency of gloo and nccl,
    not the bytes, dominates for the small tensors of a network. A parameter without a
    gradient on every rank keeps none (so an optimiser skips it exactly as in one process);
    one with a gradient on some rank gets the sum. One process: nothing to do.
    """
    if not active():
        return loss.detach()
    params = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    held = [float(p.grad is not None) for p in params]  # which gradients this rank has
    flat = torch.cat(  # (N + 1 + P,), in the promoted dtype
        [*(g.reshape(-1) for g in grads), loss.detach().reshape(1), loss.new_tensor(held)]
    )
    all_reduce_sum(flat)
    *sums, total, held_by = flat.split([*(g.numel() for g in grads), 1, len(params)])
    # Counting the ranks that had each gradient costs a device sync: only when one is missing.
    counts = held_by.tolist() if min(held, default=1.0) == 0 else held
    for p, g, count in zip(params, sums, counts):
        p.grad = g.view_as(p).to(p.dtype) if count > 0 else None
    return total.reshape(())


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process); used where the others wait for
    rank 0, so it waits up to :data:`WAIT_TIMEOUT` rather than a collective's :data:`TIMEOUT`."""
    if active():
        dist.barrier(group=_waiting)


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """``with main_first() as main:`` rank 0 runs the block (``main`` is True) while the
    others wait at its end; then all go on. One process: just runs the block."""
    try:
        yield is_main()
    finally:
        barrier()
