"""Endpoint checkpoints: a safetensors state dict that describes itself.

The metadata names the model and its kwargs, the data set, the seed and the final metrics, so
every later command needs only the file. Plain state dicts — a ``.safetensors`` file from
elsewhere, or a PyTorch file read with ``torch.load(weights_only=True)`` — need the model to be
given (``--model``); their keys are fitted to it (wrapper prefixes stripped, dropped BatchNorm
counters filled in), and nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeconn.io import load_meta, load_tensors, save_tensors
from modeconn.types import StateDict

__all__ = [
    "Checkpoint",
    "ModelSpec",
    "save_checkpoint",
    "load_checkpoint",
    "stored_model",
    "model_spec_of",
    "fit_state",
    "check_fits",
]

log = logging.getLogger("modeconn")

#: Files read with ``torch.load(weights_only=True)``; anything else is read as safetensors.
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Keys under which trainers save the state dict next to their own state.
_WRAPPERS = ("state_dict", "model")
#: Prefixes that wrappers add to every key: DDP, Lightning, torch.compile.
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: The longest chain of them tried, e.g. ``_orig_mod.module.`` (DDP around a compiled model).
_MAX_CHAIN = 3


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild an architecture by name (see ``models.create_model``)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        from modeconn.models import create_model

        return create_model(self.name, self.input_shape, self.num_classes, **self.kwargs)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "kwargs": self.kwargs,
        }

    @classmethod
    def from_json(cls, obj: dict) -> ModelSpec:
        try:
            return cls(
                name=str(obj["name"]),
                input_shape=tuple(int(d) for d in obj["input_shape"]),
                num_classes=int(obj["num_classes"]),
                kwargs=dict(obj.get("kwargs", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed model description {obj!r}: {err}") from err


def model_spec_of(model: nn.Module) -> ModelSpec:
    """The spec ``models.create_model`` recorded on ``model``."""
    config = getattr(model, "modeconn_config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} was not built by models.create_model, so it cannot be "
            "rebuilt from a file; build it with create_model(name, input_shape, num_classes)"
        )
    return ModelSpec.from_json(config)


@dataclass(frozen=True)
class Checkpoint:
    state: StateDict
    model: ModelSpec
    meta: dict

    @property
    def path_name(self) -> str:
        return self.meta.get("file", "")

    def build_model(self, *, load: bool = True) -> nn.Module:
        model = self.model.build()
        if load:
            check_fits(self.state, model.state_dict(), self.path_name or "state dict", self.model)
            model.load_state_dict(self.state, strict=True)
        return model


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, *, state: StateDict | None = None, **meta
) -> None:
    """Write ``model``'s state dict (or ``state``) with its description, atomically."""
    spec = model_spec_of(model)
    tensors = model.state_dict() if state is None else state
    save_tensors(
        path, tensors, {"format": "modeconn.checkpoint/1", "model": spec.to_json(), **meta}
    )


def load_checkpoint(path: str | os.PathLike, *, model: ModelSpec | None = None) -> Checkpoint:
    """Load an endpoint written by ``modeconn train``, or a plain state dict with ``model``.

    A plain state dict is a ``.safetensors`` file without a modeconn description, or a PyTorch
    file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) read with ``torch.load(weights_only=True)``,
    which may wrap the state dict as ``{"state_dict": ...}`` or ``{"model": ...}``. Its keys are
    fitted to ``model`` (see :func:`fit_state`), so a file saved under DDP, Lightning or
    ``torch.compile`` loads as it is. A file that describes itself needs no ``model``; one that
    describes a different model than ``model`` is refused.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in _TORCH_SUFFIXES:
        state, meta = _read_torch(path), {}
    else:
        state, meta = load_tensors(path, what="checkpoint")
    if "model" in meta:
        stored = ModelSpec.from_json(meta["model"])
        if model is not None and model != stored:
            raise ValueError(
                f"{path} describes its model as {stored.name} {stored.to_json()}, not "
                f"{model.name} {model.to_json()}; it needs no model to be given"
            )
        return Checkpoint(state=state, model=stored, meta={**meta, "file": str(path)})
    if model is None:
        raise ValueError(
            f"{path} is a plain state dict without a modeconn model description: give the model "
            "it belongs to (--model NAME, with --arg KEY=VALUE for its arguments)"
        )
    state = fit_state(state, model.build().state_dict(), str(path), model)
    return Checkpoint(state=state, model=model, meta={**meta, "file": str(path)})


def stored_model(path: str | os.PathLike) -> ModelSpec | None:
    """The model a checkpoint file describes, or ``None`` for a plain state dict.

    Reads only the file's header, so a command can tell the two kinds apart before loading.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in _TORCH_SUFFIXES:
        return None
    meta = load_meta(path, what="checkpoint")
    return ModelSpec.from_json(meta["model"]) if "model" in meta else None


def _read_torch(path: Path) -> StateDict:
    """The state dict in a PyTorch file, unwrapped from a trainer's dict; tensors only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or unsafe file
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True), which reads tensors and "
            f"plain containers only and never unpickles other objects: {first}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if _is_state(obj):
        return dict(obj)
    # Trainers save the weights next to optimiser state, epoch counters and so on.
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict) and _is_state(obj[key]):
            return dict(obj[key])
    keys = ", ".join(map(repr, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
    raise ValueError(
        f"{path} does not hold a state dict of tensors (its keys: {keys}); expected a dict of "
        f"tensors, or one under {' or '.join(map(repr, _WRAPPERS))}"
    )


def _is_state(obj: dict) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def fit_state(state: StateDict, reference: StateDict, source: str, model: ModelSpec) -> StateDict:
    """``state`` with its keys fitted to ``reference`` (a freshly built model's state dict).

    Wrapper prefixes are stripped when that makes more keys match — ``module.`` (DDP),
    ``model.`` (Lightning), ``_orig_mod.`` (``torch.compile``), in any combination — and
    BatchNorm ``num_batches_tracked`` counters that some exporters drop are filled in. What
    still does not fit raises a one-line ``ValueError`` (see :func:`check_fits`).
    """
    state = _strip_prefixes(state, set(reference))
    filled = [
        k
        for k in reference
        if k.endswith(".num_batches_tracked")
        and k not in state
        and k.removesuffix("num_batches_tracked") + "running_mean" in state
    ]
    if filled:
        # The counter only matters for momentum=None (a cumulative average); a fresh one is
        # what the model would hold before training, which keeps the file's statistics as-is.
        log.info("%s: filled in %d BatchNorm num_batches_tracked counters", source, len(filled))
        state = {**state, **{k: reference[k].clone() for k in filled}}
    check_fits(state, reference, source, model)
    return state


def _strip_prefixes(state: StateDict, expected: set[str]) -> StateDict:
    """``state`` under the chain of wrapper prefixes whose removal matches most keys.

    Chains, not single prefixes: ``_orig_mod.module.`` matches nothing until both are gone.
    Among equally good chains the shortest wins, so nothing is stripped that need not be.
    """
    best, best_hits = state, len(expected.intersection(state))
    for chain in itertools.chain.from_iterable(
        itertools.product(_PREFIXES, repeat=n) for n in range(1, _MAX_CHAIN + 1)
    ):
        stripped = state
        for prefix in chain:
            stripped = {k.removeprefix(prefix): v for k, v in stripped.items()}
        hits = len(expected.intersection(stripped))
        # A shorter dict means two keys collided: that prefix was part of real names.
        if hits > best_hits and len(stripped) == len(state):
            best, best_hits = stripped, hits
    return best


def check_fits(state: StateDict, reference: StateDict, source: str, model: ModelSpec) -> None:
    """Refuse, in one line, a state whose keys or shapes differ from ``reference``'s."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(_count_keys(missing, "missing"))
        if unexpected:
            parts.append(_count_keys(unexpected, "unexpected"))
        raise ValueError(f"{source} does not fit {model.name}: {', '.join(parts)}")
    for key, ref in reference.items():
        have = state[key].shape
        if have == ref.shape:
            continue
        hint = ""
        if ref.ndim and ref.shape[0] == model.num_classes and have[1:] == ref.shape[1:]:
            hint = f"; if the file's model predicts {have[0]} classes, give --arg num_classes={have[0]}"
        raise ValueError(
            f"{source} does not fit {model.name}: {key} has shape {list(have)} in the file but "
            f"{list(ref.shape)} in the model{hint}"
        )


def _count_keys(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {what} key{'s' if len(keys) != 1 else ''} ({shown})"
