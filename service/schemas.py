"""Request and response models of the HTTP service (pydantic, with OpenAPI examples).

Structural checks live here, so that a malformed request fails before any model runs: the
``inputs`` of a prediction must be a rectangular nested list of finite numbers (no strings, no
booleans, no NaN/inf, which Python's JSON accepts as ``NaN``/``Infinity``), batch first, with at
least one and at most ``MODECONN_MAX_BATCH`` inputs. What depends on the served paths (does the
path exist, is K built, does the shape fit) is checked by :mod:`service.catalog`.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError
from pydantic import model_validator as _model_validator

from modeconn.formats import ServedGraph

__all__ = [
    "Mode",
    "DEFAULT_MAX_BATCH",
    "max_batch",
    "parse_inputs",
    "parse_b64",
    "PredictRequest",
    "PredictResponse",
    "ExportRequest",
    "PathsRequest",
    "PathInfo",
    "PathsResponse",
    "ErrorResponse",
]

Mode = Literal["ensemble", "merged", "point"]
DEFAULT_MAX_BATCH = 1024
_MAX_DEPTH = 6  # batch axis + up to 5 input axes

_DIGIT_EXAMPLE = [
    [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 13.0, 15.0, 10.0, 15.0, 5.0, 0.0],
    [0.0, 3.0, 15.0, 2.0, 0.0, 11.0, 8.0, 0.0],
    [0.0, 4.0, 12.0, 0.0, 0.0, 8.0, 8.0, 0.0],
    [0.0, 5.0, 8.0, 0.0, 0.0, 9.0, 8.0, 0.0],
    [0.0, 4.0, 11.0, 0.0, 1.0, 12.0, 7.0, 0.0],
    [0.0, 2.0, 14.0, 5.0, 10.0, 12.0, 0.0, 0.0],
    [0.0, 0.0, 6.0, 13.0, 10.0, 0.0, 0.0, 0.0],
]  # a raw digits "0" (values 0..16), shape (8, 8)


def max_batch() -> int:
    """The largest batch a request may carry: ``MODECONN_MAX_BATCH`` (default 1024)."""
    text = os.environ.get("MODECONN_MAX_BATCH", "")
    try:
        value = int(text) if text.strip() else DEFAULT_MAX_BATCH
    except ValueError:
        return DEFAULT_MAX_BATCH
    return value if value >= 1 else DEFAULT_MAX_BATCH


# Strict nested float lists: numbers only (ints allowed), never bools or numeric strings.
_ADAPTERS: dict[int, TypeAdapter] = {}


def _adapter(depth: int) -> TypeAdapter:
    if depth not in _ADAPTERS:
        typ: Any = float
        for _ in range(depth):
            typ = list[typ]
        _ADAPTERS[depth] = TypeAdapter(typ, config=ConfigDict(strict=True))
    return _ADAPTERS[depth]


def _where(loc: tuple) -> str:
    return "inputs" + "".join(f"[{i}]" for i in loc)


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def parse_inputs(value: Any, *, limit: int | None = None) -> np.ndarray:
    """A rectangular nested list of finite numbers, batch first, as a float32 array.

    Raises ``ValueError`` naming the first offending element and what was expected.
    """
    limit = max_batch() if limit is None else limit
    if not isinstance(value, list):
        raise ValueError(f"inputs must be a list (a batch, first axis N), got {_describe(value)}")
    if not value:
        raise ValueError("inputs is empty: send a batch of at least one input, e.g. [[...]]")
    if len(value) > limit:
        raise ValueError(
            f"the batch has {len(value)} inputs, above the maximum of {limit} "
            "(MODECONN_MAX_BATCH): split it into several requests"
        )
    depth, probe = 0, value
    while isinstance(probe, list) and depth <= _MAX_DEPTH:
        depth += 1
        if not probe:
            break
        probe = probe[0]
    if depth < 2:
        raise ValueError(
            "inputs must be batch first, shape (N, *input_shape) or (N, prod(input_shape)): "
            f"a list of inputs, each a list of numbers; got {_describe(value[0])} as inputs[0]"
        )
    if depth > _MAX_DEPTH:
        raise ValueError(f"inputs nest deeper than {_MAX_DEPTH} levels")
    try:
        _adapter(depth).validate_python(value)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        got = first.get("input")
        loc = tuple(first.get("loc", ()))
        if first["type"] in ("float_type", "float_parsing"):
            expected = "a number"
        elif first["type"] == "list_type":
            expected = "a list (every input must have the same nesting as inputs[0])"
        else:
            expected = "a number or a list of numbers"
        raise ValueError(
            f"{_where(loc)}: expected {expected}, got {_describe(got)} "
            f"({err.error_count()} bad element{'s' if err.error_count() > 1 else ''} in all)"
        ) from None
    try:
        array = np.asarray(value, dtype=np.float64)
    except ValueError:
        raise ValueError(_ragged(value)) from None
    if not np.isfinite(array).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(
            f"{_where(where)} is {float(array[where])}: inputs must be finite numbers (no NaN/inf)"
        )
    if np.abs(array).max(initial=0.0) > np.finfo(np.float32).max:
        where = tuple(int(i) for i in np.argwhere(np.abs(array) > np.finfo(np.float32).max)[0])
        raise ValueError(f"{_where(where)} = {array[where]:g} does not fit in float32")
    return array.astype(np.float32)


def parse_b64(text: str, shape: list[int] | None, *, limit: int | None = None) -> np.ndarray:
    """A base64 float32 little-endian batch of ``shape`` as an array (``ValueError`` if not)."""
    limit = max_batch() if limit is None else limit
    if shape is None:
        raise ValueError("inputs_b64 needs shape, the array's shape batch first, e.g. [1, 1, 8, 8]")
    if len(shape) < 2 or len(shape) > _MAX_DEPTH or any(d < 1 for d in shape):
        raise ValueError(
            f"shape {shape} must be batch first with every size >= 1: (N, *input_shape) or "
            "(N, prod(input_shape))"
        )
    if shape[0] > limit:
        raise ValueError(
            f"the batch has {shape[0]} inputs, above the maximum of {limit} "
            "(MODECONN_MAX_BATCH): split it into several requests"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"inputs_b64 is not valid base64 ({err})") from None
    expected = 4 * math.prod(shape)
    if len(data) != expected:
        raise ValueError(
            f"inputs_b64 holds {len(data)} bytes; shape {shape} of float32 needs {expected}"
        )
    array = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(
            f"inputs_b64{list(where)} is {float(array[where])}: inputs must be finite numbers"
        )
    return array


def _ragged(value: list) -> str:
    """Locate the first list whose length differs from its siblings'."""
    stack: list[tuple[tuple, list]] = [((), value)]
    while stack:
        loc, items = stack.pop()
        lists = [x for x in items if isinstance(x, list)]
        if not lists:
            continue
        lengths = [len(x) for x in lists]
        for i, n in enumerate(lengths):
            if n != lengths[0]:
                return (
                    f"inputs are ragged: {_where(loc + (i,))} has {n} elements but "
                    f"{_where(loc + (0,))} has {lengths[0]}; every input must have the same shape"
                )
        stack.extend((loc + (i,), x) for i, x in enumerate(lists))
    return "inputs are ragged: every input must have the same shape"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Request):
    """A batch of inputs for one served path: its ensemble of K members or one merged model."""

    path: str = Field(
        description="a served path's name, as GET /paths lists it", examples=["paths/bezier"]
    )
    inputs: list[Any] | None = Field(
        None,
        description="the batch, first axis N: shape (N, *input_shape) or (N, prod(input_shape)); "
        "finite numbers, preprocessed like the training data (or raw, see `raw`)",
        examples=[[[_DIGIT_EXAMPLE]]],
    )
    inputs_b64: str | None = Field(
        None,
        description="instead of inputs, for large batches: the batch as float32 little-endian "
        "bytes, base64-encoded (numpy: base64.b64encode(x.astype('<f4').tobytes())); needs shape",
    )
    shape: list[int] | None = Field(
        None, description="the shape of inputs_b64, batch first, e.g. [64, 3, 32, 32]"
    )
    mode: Mode = Field(
        "ensemble",
        description="'ensemble': K members along the path, softmax averaged; 'merged': the one "
        "network at t; 'point': same as 'merged' (for an FGE point set, the member at t)",
    )
    k: int | None = Field(
        None,
        ge=1,
        description="ensemble members (default: the largest K built for this path)",
        examples=[4],
    )
    t: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="merged/point: where on the path, in [0, 1] (default: 0.5, or the served "
        "t nearest to it); not used by ensembles",
    )
    raw: bool = Field(
        False,
        description="inputs are raw pixel values in [0, raw_max] (digits: 0..16); the service "
        "normalises them as the training data was",
        examples=[True],
    )

    _array: np.ndarray | None = PrivateAttr(default=None)

    @_model_validator(mode="after")
    def _parse(self) -> PredictRequest:
        if (self.inputs is None) == (self.inputs_b64 is None):
            raise ValueError(
                "give the batch either as inputs (nested lists) or as inputs_b64 with shape"
            )
        if self.inputs is not None:
            if self.shape is not None:
                raise ValueError("shape goes with inputs_b64; inputs carry their own shape")
            self._array = parse_inputs(self.inputs)
        elif self.inputs_b64 is not None:
            self._array = parse_b64(self.inputs_b64, self.shape)
        return self

    @property
    def array(self) -> np.ndarray:
        """The inputs as a float32 array, shape (N, ...) as sent."""
        assert self._array is not None
        return self._array


class ExportRequest(_Request):
    """Which graph to download."""

    path: str = Field(description="a served path's name", examples=["paths/bezier"])
    mode: Mode = Field("ensemble", description="'ensemble', 'merged' or 'point'")
    k: int | None = Field(None, ge=1, description="ensemble members (default: largest built)")
    t: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="merged/point: t (default: 0.5)"
    )


class PathsRequest(_Request):
    """Listing options (the body may be empty: ``{}``)."""

    path: str | None = Field(None, description="only this path (default: every served path)")


class PredictResponse(BaseModel):
    """Predictions for every input of the batch."""

    path: str = Field(description="the served path")
    mode: Literal["ensemble", "merged"]
    k: int = Field(description="members that voted (1 for a merged model)")
    ts: list[float] = Field(description="t values of the members used")
    labels: list[int] = Field(description="argmax class per input, shape (N,)")
    probabilities: list[list[float]] = Field(description="class probabilities, shape (N, C)")
    entropy: list[float] = Field(description="predictive entropy H[p] per input, nats")
    mutual_information: list[float] | None = Field(
        None, description="ensembles: mean KL(member || mean) per input, nats"
    )
    disagreement: list[float] | None = Field(
        None, description="ensembles: fraction of member pairs whose labels differ, per input"
    )
    provider: str = Field(description="onnxruntime execution provider that ran the graph")


class PathInfo(BaseModel):
    """A served path: what it is, what can be asked of it, and how good it was."""

    name: str = Field(description="the name to use in requests", examples=["paths/bezier"])
    method: str = Field(description="how the path was found", examples=["bezier"])
    kind: Literal["path", "points"]
    model: dict = Field(description="architecture: {name, kwargs}")
    input_shape: list[int]
    num_classes: int
    preprocessing: dict = Field(description="how raw inputs become model inputs")
    ks: list[int] = Field(description="ensemble sizes available (mode='ensemble')")
    ensemble_ts: dict[str, list[float]] = Field(description="members' t values per K")
    served_ts: list[float] = Field(description="t values available for mode='merged'")
    barrier: dict[str, float | None] = Field(
        description="train-loss and test-error barriers along the path (from the manifest)"
    )
    accuracy: dict[str, float | None] = Field(
        description="test accuracy at t=0, t=1, the midpoint and the worst t (from the manifest)"
    )
    alignment: bool = Field(description="whether B was permuted onto A before fitting")
    graphs: list[ServedGraph] = Field(description="the ONNX graphs built for this path")


class PathsResponse(BaseModel):
    """Every served path."""

    paths: list[PathInfo]
    max_batch: int = Field(description="the largest batch a request may carry")


class ErrorResponse(BaseModel):
    """Every 4xx answer of this service's own checks."""

    error: str = Field(description="what was wrong and what was expected")
    expected: dict = Field(default_factory=dict, description="valid values, where useful")
