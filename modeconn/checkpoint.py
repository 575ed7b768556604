"""Endpoint checkpoints: a safetensors state dict that describes itself.

The metadata names the model and its kwargs, the data set, the seed and the final metrics, so
every later command needs only the file. User ``.pt`` files are read with
``torch.load(weights_only=True)`` and need ``--model`` to be given (they do not describe
themselves); nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeconn.io import load_tensors, save_tensors
from modeconn.types import StateDict

__all__ = ["Checkpoint", "ModelSpec", "save_checkpoint", "load_checkpoint", "model_spec_of"]


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild an architecture from the registry."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    kwargs: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        from models import create_model

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
            _load_strict(model, self.state, self.path_name)
        return model


def _load_strict(model: nn.Module, state: StateDict, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[:3]
        raise ValueError(
            f"{source or 'state dict'} does not fit model {type(model).__name__}: "
            + " ".join(line.strip() for line in first)
        ) from err


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
    """Load an endpoint written by ``modeconn train`` (or a ``.pt`` state dict with ``model``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth"):
        if model is None:
            raise ValueError(
                f"{path} is a plain PyTorch file: give the model it belongs to (--model)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad or unsafe file
            raise ValueError(
                f"cannot read {path} as a tensors-only PyTorch state dict: {err}"
            ) from err
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"{path} does not hold a state dict of tensors")
        return Checkpoint(state=state, model=model, meta={"file": str(path)})
    state, meta = load_tensors(path, what="checkpoint")
    if model is None:
        if "model" not in meta:
            raise ValueError(
                f"{path} has no modeconn model description; it was not written by "
                "`modeconn train` (give --model for a plain state dict)"
            )
        model = ModelSpec.from_json(meta["model"])
    return Checkpoint(state=state, model=model, meta={**meta, "file": str(path)})
