"""The model registry: a dict of constructors plus ``register_model`` / ``create_model``.

Every registered constructor has the signature
``fn(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module``; the permutation
spec of any model is inferred from its graph (:mod:`models.infer`). ``create_model`` also
builds architectures named from outside the registry — ``torchvision:NAME``, ``timm:NAME`` or
``module.path:Callable`` (see :mod:`models.external`) — and checks that every model runs on
the inputs it is built for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modeconn.models.external import EXTERNAL_FORMS, build_external, is_external

__all__ = ["register_model", "create_model", "list_models", "model_entry"]

ModelFn = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFn] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator that adds a constructor under ``name``; a second model with that name raises."""

    def decorator(fn: ModelFn) -> ModelFn:
        if is_external(name):
            raise ValueError(
                f"cannot register {name!r}: a colon marks a name outside the registry "
                f"({EXTERNAL_FORMS}); choose a name without one"
            )
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
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())} "
            f"(or name one as {EXTERNAL_FORMS})"
        )
    return _REGISTRY[name]


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch axis) and ``num_classes``.

    ``name`` is a registered name (see :func:`list_models`), ``torchvision:NAME``, ``timm:NAME``
    or ``module.path:Callable`` (see :mod:`models.external`). The model must map a batch of
    ``input_shape`` inputs to ``(batch, num_classes)`` logits; one that cannot raises a
    ``ValueError`` here rather than deep inside a later command.

    The returned module carries ``model.modeconn_config``: the name, input shape, number of
    classes and keyword arguments it was built with.
    """
    input_shape = tuple(int(d) for d in input_shape)
    num_classes = int(num_classes)
    try:
        if is_external(name):
            model = build_external(name, input_shape, num_classes, kwargs)
        else:
            model = model_entry(name)(input_shape, num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for model {name!r}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    _check_runs(model, name, input_shape, num_classes)
    # The model describes itself, so that an artifact can rebuild it (timm's pretrained_cfg).
    # Module.__setattr__'s stub allows only Tensor | Module values; any value works at run time.
    model.modeconn_config = {  # pyright: ignore[reportArgumentType]
        "name": name,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "kwargs": dict(kwargs),
    }
    return model


def _check_runs(
    model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """One forward pass on two zero inputs, in eval mode, so that a model that does not fit the
    data fails now with one line. Also materialises lazy layers, so the state dict is complete.
    """
    # Two inputs, not one: a forward that squeezes size-1 axes would hide a batch of one.
    x = torch.zeros(2, *input_shape)  # (2, *input_shape)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # layers raise RuntimeError, ValueError, AssertionError, ...
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ValueError(
            f"model {name} cannot run on inputs of shape {list(input_shape)}: {first}"
        ) from err
    finally:
        for module, training in modes.items():  # put back every module's own mode
            module.training = training
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"model {name} returns a {type(out).__name__} in eval mode, not a tensor of logits; "
            "wrap it in a module whose forward returns the logits"
        )
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(
            f"model {name} maps inputs of shape {list(input_shape)} to outputs of shape "
            f"{list(out.shape[1:])}, not [{num_classes}] (the number of classes); give it "
            f"num_classes={num_classes} or a head of that size"
        )
