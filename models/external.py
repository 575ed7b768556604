"""Architectures named from outside the registry: ``torchvision:NAME``, ``timm:NAME`` and
``module.path:Callable``.

:func:`models.create_model` sends every name with a colon here:

* ``torchvision:NAME`` — a builder of ``torchvision.models.list_models(module=torchvision.models)``
  called with ``weights=None, num_classes=...``, or a public ``nn.Module`` class of
  ``torchvision.models`` such as ``VisionTransformer`` (given ``num_classes`` if it takes one);
* ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, num_classes=...)``; timm is an
  optional extra (``pip install -e '.[timm]'``);
* ``module.path:Callable`` — imports ``module.path`` and calls ``Callable(**kwargs)``, adding
  ``num_classes`` when the callable accepts it and ``input_shape`` when it names that
  parameter (the registry's own signature). Importing the module runs its code, like any
  import: name only modules you trust. The module must be importable (installed, or its folder
  on ``PYTHONPATH``), and it is imported again whenever an artifact rebuilds the model.

Keyword arguments are passed through unchanged; nothing here downloads weights.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import warnings
from collections.abc import Callable

from torch import nn

__all__ = ["EXTERNAL_FORMS", "is_external", "build_external"]

#: How to name a model outside the registry, for help texts and error messages.
EXTERNAL_FORMS = "torchvision:NAME, timm:NAME or module.path:Callable"

_TIMM_INSTALL = "pip install -e '.[timm]'"
_TORCHVISION_LIST = "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'"
_TIMM_LIST = "python -c 'import timm; print(timm.list_models())'"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_external(name: str) -> bool:
    """Whether ``name`` points outside the registry (it has a colon; registered names have none)."""
    return ":" in name


def build_external(
    name: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict
) -> object:
    """Build the model ``name`` (``torchvision:NAME``, ``timm:NAME`` or ``module.path:Callable``).

    A user's callable may return anything: the caller checks that it is an ``nn.Module``.
    A ``TypeError`` from the constructor (a bad keyword argument) is left to the caller, which
    reports it with the model's name.
    """
    prefix, _, target = name.partition(":")
    if not target:
        raise ValueError(f"model {name!r} names nothing after the colon; use {EXTERNAL_FORMS}")
    if prefix == "torchvision":
        return _torchvision(target, num_classes, kwargs)
    if prefix == "timm":
        return _timm(target, num_classes, kwargs)
    return _user(name, prefix, target, input_shape, num_classes, kwargs)


def _torchvision(target: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    _refuse_weights(f"torchvision:{target}", kwargs, ("weights",))
    builders = tvm.list_models(module=tvm)
    classes = [
        n
        for n in dir(tvm)
        if not n.startswith("_")
        and isinstance(getattr(tvm, n), type)
        and issubclass(getattr(tvm, n), nn.Module)
    ]
    if target in builders:
        fn = tvm.get_model_builder(target)
        extra = {"weights": None, "num_classes": num_classes}
    elif target in classes:
        fn = getattr(tvm, target)
        extra = _accepted(fn, num_classes=num_classes)
    else:
        raise _unknown("torchvision", target, builders + classes, _TORCHVISION_LIST)
    with warnings.catch_warnings():
        # googlenet and inception_v3 warn that their default initialisation will change in a
        # later torchvision; the one they use now is the documented one, so nothing is wrong.
        warnings.filterwarnings(
            "ignore", message="The default weight initialization", category=FutureWarning
        )
        return fn(**extra, **kwargs)


def _timm(target: str, num_classes: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError(
            f"model timm:{target} needs timm, an optional extra; install it with: {_TIMM_INSTALL}"
        ) from err
    _refuse_weights(f"timm:{target}", kwargs, ("pretrained", "checkpoint_path"))
    if not timm.is_model(target):
        raise _unknown("timm", target, timm.list_models(), _TIMM_LIST)
    return timm.create_model(target, pretrained=False, num_classes=num_classes, **kwargs)


def _user(
    name: str,
    module_name: str,
    attr: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    kwargs: dict,
) -> object:  # whatever the user's callable returns; create_model checks it
    if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(attr)):
        raise ValueError(
            f"model {name!r} is not a registered name and not one of {EXTERNAL_FORMS} "
            "(module.path and Callable must be Python names, e.g. mypkg.nets:TinyNet)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"model {name!r}: cannot import {module_name!r} ({err}); install it, or put the "
            "folder that holds it on PYTHONPATH (e.g. PYTHONPATH=. modeconn ...)"
        ) from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"model {name!r}: {module_name} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"model {name!r}: {module_name}.{attr} is a {type(obj).__name__}, not a class or "
            "function that builds an nn.Module"
        )
    return obj(**_accepted(obj, num_classes=num_classes, input_shape=input_shape), **kwargs)


def _accepted(
    fn: Callable, *, num_classes: int, input_shape: tuple[int, ...] | None = None
) -> dict:
    """The keyword arguments ``fn`` accepts among ``num_classes`` and ``input_shape``.

    ``num_classes`` goes to any callable that names it or takes ``**kwargs``; ``input_shape``
    only to one that names it, since ``**kwargs`` are often forwarded to layers that would
    refuse it.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some built-in callables have no signature
        return {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out: dict = {}
    if "num_classes" in named or takes_any:
        out["num_classes"] = num_classes
    if input_shape is not None and "input_shape" in named:
        out["input_shape"] = tuple(input_shape)
    return out


def _refuse_weights(name: str, kwargs: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in kwargs:
            raise ValueError(
                f"model {name} is built without pretrained weights (got {key}={kwargs[key]!r}); "
                "drop that argument and give the trained weights as a checkpoint file"
            )


def _unknown(kind: str, target: str, choices: list[str], how_to_list: str) -> ValueError:
    close = difflib.get_close_matches(target, choices, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    return ValueError(
        f"unknown {kind} model {target!r} ({hint}); list them all with: {how_to_list}"
    )
