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
* :func:`main_first`: rank 0 does something (writes a file) while the others wait for it.

Only rank 0 writes artifacts and checkpoints: the other ranks hold the same state (data
parallelism keeps it identical) or send theirs to rank 0 first (sharded nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator

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
    "barrier",
    "main_first",
]

log = logging.getLogger("modeconn")

#: How long a collective may wait for a peer before the group gives up (a dead rank must not
#: hang the others forever).
TIMEOUT = datetime.timedelta(minutes=30)


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
    log.debug("rank %d of %d joined (%s)", rank(), world_size(), backend)
    return True


def teardown() -> None:
    """Leave the process group (every rank must call it; safe without one)."""
    if active():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
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


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """``with main_first() as main:`` rank 0 runs the block (``main`` is True) while the
    others wait at its end; then all go on. One process: just runs the block."""
    try:
        yield is_main()
    finally:
        barrier()
