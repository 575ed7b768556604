"""What every fit shares: the resumable fit state, the replayable batch stream, the flat
parameter layout, optimiser state, the straight-line start, and the choice of engine.

Resume contract: a fit interrupted at any step and continued with ``resume`` ends bitwise
identical to an uninterrupted one. Everything random is drawn from generators whose states are
saved; the batch stream is replayed from the start of its epoch (so augmentation draws repeat
exactly); optimisers are torch's, saved through their ``state_dict``.

One file format for every method: a safetensors file of tensors plus JSON metadata
``{"format", "method", "fingerprint", "progress", "stats"}``. The fingerprint holds what must
agree for a state to be resumed (options, parameter layout, a digest of the endpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Literal

import torch
from torch import Tensor, nn

from modeconn import distributed
from modeconn.fit.configs import MethodConfig
from modeconn.fit.objective import Objective
from modeconn.io import load_tensors, save_tensors
from modeconn.types import Batch, StackedStateDict, StateDict

__all__ = [
    "FitContext",
    "FitState",
    "Resumed",
    "FlatLayout",
    "BatchStream",
    "optimizer_tensors",
    "load_optimizer_tensors",
    "straight_interior",
    "resolve_engine",
    "thin",
    "FORMAT",
]

log = logging.getLogger("modeconn")

FORMAT = "modeconn.fit-state/2"
#: Formats written by earlier versions: their states cannot be resumed.
_OLD_FORMATS = {
    "modeconn.curve-fit/1",
    "modeconn.fge-fit/1",
    "modeconn.geodesic-state/1",
    1,  # NEB/AutoNEB
}


@dataclass
class FitContext:
    """What a fitter gets besides its config: progress, resumable state, and a place for stats.

    ``checkpoint``: a file where the fitter saves its state every ``checkpoint_every`` steps
    (None: the method's natural boundary, see each fitter) and, with ``resume``, restarts from.
    Fitters record what they measured (gradient evaluations, loss history, lengths) in
    ``stats``; it ends up in the artifact's manifest.
    """

    progress: bool = False
    checkpoint: FsPath | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 step, got {self.checkpoint_every}")


# ---------------------------------------------------------------------------------------------
# The fit-state file


@dataclass
class Resumed:
    """A saved state: the method's counters, its tensors and the stats so far."""

    progress: dict
    tensors: StateDict
    stats: dict


def digest(*tensors: Tensor) -> str:
    """A short hex digest of the exact values of ``tensors`` (endpoint identity)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FitState:
    """The resumable state of one fit, saved to ``ctx.checkpoint`` (if any).

    ``fingerprint`` is JSON-able; a saved state whose fingerprint differs is refused with the
    differing keys named. ``every`` is the default save interval in steps (None: the fitter
    saves at its own boundaries only).
    """

    def __init__(
        self, ctx: FitContext, method: str, fingerprint: dict, *, every: int | None = None
    ):
        self.ctx = ctx
        self.method = method
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.every = ctx.checkpoint_every if ctx.checkpoint_every is not None else every

    @property
    def enabled(self) -> bool:
        return self.ctx.checkpoint is not None

    def due(self, step: int) -> bool:
        """Whether to save after global step ``step`` (counted from 1)."""
        return self.enabled and self.every is not None and step % self.every == 0

    def resume(self) -> Resumed | None:
        """The saved state when resuming and one exists; ``None`` to start afresh."""
        path = self.ctx.checkpoint
        if not self.ctx.resume or path is None or not path.exists():
            return None
        tensors, meta = load_tensors(path, what="fit state")
        fmt = meta.get("format")
        if fmt in _OLD_FORMATS:
            raise ValueError(
                f"{path} holds a fit state written by an earlier version of modeconn "
                f"(format {fmt!r}); it cannot be resumed: delete it, or run without --resume"
            )
        if fmt != FORMAT:
            raise ValueError(f"{path} is not a modeconn fit state (format {fmt!r})")
        saved = meta.get("fingerprint", {})
        if meta.get("method") != self.method or saved != self.fingerprint:
            raise ValueError(
                f"{path} holds the state of a different {meta.get('method')} fit "
                f"({self._differences(meta.get('method'), saved)}); delete it or run without "
                "--resume"
            )
        log.info("%s: resuming from %s at %s", self.method, path, meta.get("progress"))
        return Resumed(meta.get("progress", {}), tensors, meta.get("stats", {}))

    def _differences(self, method: str | None, saved: dict) -> str:
        """What differs between a saved fingerprint and this fit's, in words."""
        if method != self.method:
            return f"method {method}, this fit is {self.method}"

        def short(value: object) -> str:
            text = repr(value)
            return text if len(text) <= 40 else text[:37] + "..."

        old, new = saved.get("config", {}), self.fingerprint.get("config", {})
        options = [
            f"{key} (saved {short(old.get(key))}, now {short(new.get(key))})"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
        ]
        out = [f"different options: {', '.join(options[:3])}"] if options else []
        out += [f"different {k}" for k in sorted(set(saved) | set(self.fingerprint))
                if k != "config" and saved.get(k) != self.fingerprint.get(k)]  # fmt: skip
        return "; ".join(out) or "different options"

    def save(self, progress: dict, tensors: StateDict, stats: dict | None = None) -> None:
        """Write the state atomically (nothing when the fit has no checkpoint file). In a
        process group only rank 0 writes: every rank must hold the same state (see
        :mod:`modeconn.distributed`), which is why a state resumes under any number of ranks."""
        if self.ctx.checkpoint is None or not distributed.is_main():
            return
        meta = {
            "format": FORMAT,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "progress": progress,
            "stats": stats or {},
        }
        save_tensors(self.ctx.checkpoint, tensors, meta)


def fingerprint(config: MethodConfig, layout: FlatLayout, a: Tensor, b: Tensor | None, *,
                exclude: set[str] | None = None) -> dict:  # fmt: skip
    """What must agree to resume: options (less ``exclude``), parameters and endpoints."""
    ends = (a,) if b is None else (a, b)
    return {
        "config": config.model_dump(exclude=exclude),
        "keys": len(layout.keys),
        "numel": layout.numel,
        "endpoints": digest(*ends),
    }


# ---------------------------------------------------------------------------------------------
# Flat parameters


class FlatLayout:
    """Where each named tensor sits in one flat parameter vector (all of one floating dtype)."""

    def __init__(self, template: StateDict):
        if not template:
            raise ValueError("nothing to fit: the endpoints have no parameters")
        dtypes = {v.dtype for v in template.values()}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"fitting needs parameters of one floating dtype, got {sorted(map(str, dtypes))}"
            )
        self.keys = list(template)
        self.shapes = [tuple(template[k].shape) for k in self.keys]
        self.sizes = [template[k].numel() for k in self.keys]
        self.numel = sum(self.sizes)

    def flatten(self, state: StateDict) -> Tensor:
        """``(N,)``: the tensors of ``state`` in layout order, detached."""
        missing = [k for k in self.keys if k not in state]
        if missing:
            raise ValueError(f"the parameters lack {missing[:5]}")
        return torch.cat([state[k].detach().reshape(-1) for k in self.keys])  # (N,)

    def unflatten(self, flat: Tensor) -> StateDict:
        """Views into ``flat`` ``(..., N)``, keyed and shaped ``(..., *shape)``."""
        lead = flat.shape[:-1]
        parts = flat.split(self.sizes, dim=-1)
        return {k: p.reshape(*lead, *s) for k, p, s in zip(self.keys, parts, self.shapes)}

    def unflatten_stacked(self, flat: Tensor) -> StackedStateDict:
        """``(K, N)`` -> ``{key: (K, *shape)}`` as contiguous copies (a path's nodes)."""
        return {k: v.clone() for k, v in self.unflatten(flat.detach()).items()}

    def tensor_rms(self, diff: Tensor) -> Tensor:
        """``(N,)``: each element replaced by the RMS of its tensor in ``diff`` ``(N,)``."""
        parts = diff.split(self.sizes)
        return torch.cat([p.pow(2).mean().sqrt().expand(len(p)) for p in parts])  # (N,)


def straight_interior(
    layout: FlatLayout,
    a: Tensor,
    b: Tensor,
    knots: Tensor,
    noise: float,
    generator: torch.Generator,
    rows: slice = slice(None),
) -> Tensor:
    """Interior nodes ``(M, N)`` on the line at ``knots`` ``(M,)``, plus seeded noise; only
    the nodes ``rows`` of them when given (a rank's block of a sharded chain).

    The noise has standard deviation ``noise`` times the RMS of ``b - a`` per tensor and is
    drawn on CPU from ``generator``, so a seed gives the same start on every device; it is
    drawn for all M nodes, so a block gets exactly the rows the whole chain would. Without
    it a straight line through the saddle of a symmetric landscape would never bend.
    """
    t = knots[rows].to(device=a.device, dtype=a.dtype)[:, None]  # (m, 1)
    interior = a + t * (b - a)  # (m, N)
    if noise > 0:
        shape = (len(knots), a.numel())
        eps = torch.randn(shape, generator=generator, dtype=a.dtype)[rows]  # (m, N)
        interior = interior + noise * eps.to(a.device) * layout.tensor_rms(b - a)
    return interior


# ---------------------------------------------------------------------------------------------
# The batch stream


class BatchStream:
    """Endless batches of an objective, epoch after epoch, replayable from a saved position.

    The stream owns ``generator``: nothing else may draw from it. Its position is the
    generator's state at the start of the current epoch plus the batches used since, so a
    restored stream replays that epoch's shuffling and augmentation draws exactly.
    """

    def __init__(self, objective: Objective, generator: torch.Generator):
        self.objective = objective
        self.generator = generator
        self.epoch_state = generator.get_state()
        self.used = 0
        self._it: Iterator[Batch | None] | None = None

    def next(self) -> Batch | None:
        while True:
            if self._it is None:
                self.epoch_state = self.generator.get_state()
                self.used = 0
                self._it = iter(self.objective.epoch(self.generator))
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.used += 1
            return batch

    def state(self) -> tuple[StateDict, dict]:
        """``(tensors, progress)`` to save."""
        tensors = {"stream/generator": self.generator.get_state(), "stream/epoch": self.epoch_state}
        return tensors, {"stream_used": self.used if self._it is not None else -1}

    def restore(self, tensors: StateDict, progress: dict) -> None:
        used = int(progress["stream_used"])
        self._it = None
        if used < 0:  # between epochs
            self.generator.set_state(tensors["stream/generator"])
            return
        self.generator.set_state(tensors["stream/epoch"])
        self.epoch_state = tensors["stream/epoch"]
        self._it = iter(self.objective.epoch(self.generator))
        for _ in range(used):
            next(self._it)  # replays the shuffling and augmentation draws exactly
        self.used = used


# ---------------------------------------------------------------------------------------------
# Optimiser state


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> StateDict:
    """The tensors of ``optimizer.state_dict()``'s per-parameter state, keyed by name."""
    out: StateDict = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                out[f"{prefix}/{index}/{key}"] = value
            elif value is not None:
                out[f"{prefix}/{index}/{key}"] = torch.tensor(value)
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: StateDict, prefix: str = "optim"
) -> None:
    """Restore what :func:`optimizer_tensors` saved (hyper-parameters stay the optimiser's)."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        head, _, rest = name.partition("/")
        if head != prefix:
            continue
        index, _, key = rest.partition("/")
        state.setdefault(int(index), {})[key] = value
    if not state:
        return
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# Engines and small helpers


def resolve_engine(engine: str, objective: Objective) -> Literal["vmap", "loop"]:
    """``vmap`` or ``loop``; ``auto`` picks vmap except for convolutional models on CPU.

    Batched convolutions under vmap become grouped convolutions, which on this project's 2-core
    CPU ran on par to ~1.5x slower than a loop over nodes (``benchmarks/bench_neb.py``,
    ``bench_geodesic.py``); matrix products batch well (vmap 2-6x faster for narrow MLPs).
    """
    if engine not in ("auto", "vmap", "loop"):
        raise ValueError(f"unknown engine {engine!r}; expected 'auto', 'vmap' or 'loop'")
    if engine != "auto":
        return engine  # type: ignore[return-value]
    model = objective.model
    if model is None:
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv and objective.device.type == "cpu" else "vmap"


def thin(history: list[float], keep: int = 200) -> list[float]:
    """At most ``keep`` evenly chosen entries (the manifest stays small for long runs)."""
    if len(history) <= keep:
        return history
    idx = torch.linspace(0, len(history) - 1, keep).round().long().tolist()
    return [history[i] for i in idx]
