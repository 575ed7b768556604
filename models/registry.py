"""The model registry: a dict of constructors plus ``register_model`` / ``create_model``.

Every registered constructor has the signature
``fn(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module`` and returns a
module with a ``permutation_spec()`` method (see :mod:`models.spec`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_entry"]

ModelFn = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFn] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator that adds a constructor under ``name``; a second model with that name raises."""

    def decorator(fn: ModelFn) -> ModelFn:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch axis) and ``num_classes``.

    The returned module carries ``model.modeconn_config``: the name, input shape, number of
    classes and keyword arguments it was built with.
    """
    fn = model_entry(name)
    try:
        model = fn(tuple(input_shape), int(num_classes), **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for model {name!r}: {err}") from err
    # The model describes itself, so that an artifact can rebuild it (timm's pretrained_cfg).
    model.modeconn_config = {
        "name": name,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "kwargs": dict(kwargs),
    }
    return model
