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
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_serializer,
)
from pydantic import model_validator as _model_validator

from modeconn.cascade import Rule
from modeconn.formats import Precision, ServedCascade, ServedGraph

from .errors import ErrorResponse, clip

__all__ = [
    "Mode",
    "Precision",
    "DEFAULT_MAX_BATCH",
    "MAX_K",
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

Mode = Literal["ensemble", "merged", "point", "cascade"]
DEFAULT_MAX_BATCH = 1024
#: The largest ensemble size a request may name (a bound, so that no k is echoed at length).
MAX_K = 2**31 - 1
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


def _too_many(n: object, limit: int) -> str:
    return (
        f"the batch has {clip(n)} inputs, above the maximum of {limit} "
        "(MODECONN_MAX_BATCH): split it into several requests"
    )


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
    return f"{clip(value, 40)} ({type(value).__name__})"


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
        raise ValueError(_too_many(len(value), limit))
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
    errors: list[tuple[tuple, dict, int]] = []
    _check(value, depth, (), errors)
    if errors:
        loc, first, _ = errors[0]
        count = sum(n for _, _, n in errors)
        got = first.get("input")
        if first["type"] in ("float_type", "float_parsing"):
            expected = "a number"
        elif first["type"] == "list_type":
            expected = "a list (every input must have the same nesting as inputs[0])"
        else:
            expected = "a number or a list of numbers"
        raise ValueError(
            f"{_where(loc)}: expected {expected}, got {_describe(got)} "
            f"({count} bad element{'s' if count > 1 else ''} in all)"
        )
    try:
        array = _convert(value, depth)
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


# Large batches are checked and converted in pieces of at most _STEP numbers: each call into
# pydantic or numpy holds the GIL, and a request parsed in a worker thread must leave the event
# loop (health checks, other requests) a turn every few milliseconds.
_STEP = 1 << 16


def _size(value: Any, depth: int) -> int:
    """How many numbers a nested list ``depth`` deep holds (anything else counts as one)."""
    if not isinstance(value, list):
        return 1
    if depth <= 1:
        return max(len(value), 1)
    return max(sum(_size(x, depth - 1) for x in value), 1)


def _pieces(value: list, depth: int):
    """Consecutive slices ``(start, stop, alone)`` of ``value``'s rows, each of at most _STEP
    numbers; ``alone``: one row above _STEP, to be split itself."""
    if depth == 1:
        yield from ((i, min(i + _STEP, len(value)), False) for i in range(0, len(value), _STEP))
        return
    start, total = 0, 0
    for i, row in enumerate(value):
        size = _size(row, depth - 1)
        if size > _STEP:
            if i > start:
                yield start, i, False
            yield i, i + 1, True
            start, total = i + 1, 0
        elif total + size > _STEP:
            yield start, i, False
            start, total = i, size
        else:
            total += size
    if start < len(value):
        yield start, len(value), False


def _check(value: list, depth: int, loc: tuple, errors: list) -> None:
    """Strict numbers in every piece of ``value``; each failing piece appends ``(location,
    first error, error count)`` to ``errors``."""
    for start, stop, alone in _pieces(value, depth):
        if alone:
            _check(value[start], depth - 1, loc + (start,), errors)
            continue
        try:
            _adapter(depth).validate_python(value[start:stop])
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = tuple(first.get("loc", ()))
            if where and isinstance(where[0], int):
                where = (where[0] + start, *where[1:])
            errors.append((loc + where, first, err.error_count()))


def _convert(value: list, depth: int) -> np.ndarray:
    """``value`` (checked by ``_check``) as a float64 array; ``ValueError`` if it is ragged."""
    parts = [
        _convert(value[start], depth - 1)[None]
        if alone
        else np.asarray(value[start:stop], dtype=np.float64)
        for start, stop, alone in _pieces(value, depth)
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _b64decode(text: str) -> bytes:
    """base64 (strict alphabet, padding only at the end), decoded a bounded piece at a time."""
    step = 1 << 20  # a multiple of 4: the pieces decode to what the whole would
    if len(text) <= step:
        return base64.b64decode(text, validate=True)
    if text.find("=", 0, len(text) - 2) != -1:
        raise ValueError("padding '=' before the end")
    return b"".join(
        base64.b64decode(text[i : i + step], validate=True) for i in range(0, len(text), step)
    )


def parse_b64(text: str, shape: list[int] | None, *, limit: int | None = None) -> np.ndarray:
    """A base64 float32 little-endian batch of ``shape`` as an array (``ValueError`` if not)."""
    limit = max_batch() if limit is None else limit
    if shape is None:
        raise ValueError("inputs_b64 needs shape, the array's shape batch first, e.g. [1, 1, 8, 8]")
    if len(shape) < 2 or len(shape) > _MAX_DEPTH or any(d < 1 for d in shape):
        raise ValueError(
            f"shape {clip(shape)} must be batch first with every size >= 1: (N, *input_shape) or "
            "(N, prod(input_shape))"
        )
    if shape[0] > limit:
        raise ValueError(_too_many(shape[0], limit))
    try:
        data = _b64decode(text)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"inputs_b64 is not valid base64 ({err})") from None
    expected = 4 * math.prod(shape)
    if len(data) != expected:
        raise ValueError(
            f"inputs_b64 holds {len(data)} bytes; shape {clip(shape)} of float32 needs "
            f"{clip(expected)}"
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


def _short_batch(value: Any) -> Any:
    """Refuse a batch above the limit before pydantic copies the list (in one call)."""
    if isinstance(value, list) and len(value) > max_batch():
        raise ValueError(_too_many(len(value), max_batch()))
    return value


def _short_shape(value: Any) -> Any:
    """Refuse a shape longer than any input has before pydantic validates every entry."""
    if isinstance(value, list) and len(value) > _MAX_DEPTH:
        raise ValueError(
            f"shape {clip(value)} must be batch first, at most {_MAX_DEPTH} sizes: "
            "(N, *input_shape) or (N, prod(input_shape))"
        )
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Request):
    """A batch of inputs for one served path: its ensemble of K members or one merged model."""

    path: str = Field(
        description="a served path's name, as GET /paths lists it", examples=["paths/bezier"]
    )
    inputs: Annotated[list[Any] | None, BeforeValidator(_short_batch)] = Field(
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
    shape: Annotated[list[int] | None, BeforeValidator(_short_shape)] = Field(
        None, description="the shape of inputs_b64, batch first, e.g. [64, 3, 32, 32]"
    )
    mode: Mode = Field(
        "ensemble",
        description="'ensemble': K members along the path, softmax averaged; 'merged': the one "
        "network at t; 'point': same as 'merged' (for an FGE point set, the member at t); "
        "'cascade': the path's cascade members one at a time, each input leaving once its "
        "stop rule holds (members_used says how many ran)",
    )
    k: int | None = Field(
        None,
        ge=1,
        le=MAX_K,
        description="ensemble members (default: the largest K built for this path); for a "
        "cascade, the most members it may run (default: all of its members)",
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
    rule: Rule | None = Field(
        None,
        description="cascade: when an input leaves (default: the rule the bundle was built "
        "with, see GET /paths): 'confidence' (the running mean's top probability reaches "
        "threshold) or 'agree' (the first threshold members agree)",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="cascade: the rule's threshold (default: the bundle's)",
        examples=[0.9],
    )
    precision: Precision = Field(
        "fp32",
        description="'int8': the statically quantized copies of the graphs, where the bundle "
        "holds them (modeconn serve-build --int8; see GET /paths)",
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
    k: int | None = Field(
        None, ge=1, le=MAX_K, description="ensemble members (default: largest built)"
    )
    t: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="merged/point: t (default: 0.5)"
    )
    precision: Precision = Field("fp32", description="'fp32', or 'int8' where built")


class PathsRequest(_Request):
    """Listing options (the body may be empty: ``{}``)."""

    path: str | None = Field(None, description="only this path (default: every served path)")


class PredictResponse(BaseModel):
    """Predictions for every input of the batch."""

    path: str = Field(description="the served path")
    mode: Literal["ensemble", "merged", "cascade"]
    k: int = Field(description="members that voted (1 for a merged model; a cascade's most)")
    ts: list[float] = Field(description="t values of the members used")
    precision: Precision = Field("fp32", description="of the graphs that ran")
    labels: list[int] = Field(description="argmax class per input, shape (N,)")
    probabilities: list[list[float]] = Field(description="class probabilities, shape (N, C)")
    entropy: list[float] = Field(description="predictive entropy H[p] per input, nats")
    mutual_information: list[float] | None = Field(
        None, description="ensembles: mean KL(member || mean) per input, nats"
    )
    disagreement: list[float] | None = Field(
        None, description="ensembles: fraction of member pairs whose labels differ, per input"
    )
    members_used: list[int] | None = Field(
        None, description="cascade: how many members ran for each input, shape (N,)"
    )
    stop_rule: str | None = Field(None, description="cascade: the rule that stopped inputs")
    provider: str = Field(description="onnxruntime execution provider that ran the graph")

    @model_serializer(mode="wrap")
    def _cascade_fields_only_for_cascades(self, handler):
        # Absent rather than null outside a cascade: BentoML's client decodes an array field
        # by iterating it, and an answer of another mode would break it on a null.
        data = handler(self)
        for name in _CASCADE_ONLY:
            if data.get(name, 0) is None:
                del data[name]
        return data


_CASCADE_ONLY = ("members_used", "stop_rule")


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
        description="train-loss and test-error barriers along the path (from the manifest): "
        "above the endpoints' mean, above the worse endpoint, and above the chord between them"
    )
    accuracy: dict[str, float | None] = Field(
        description="test accuracy at t=0, t=1, the midpoint and the worst t (from the manifest)"
    )
    alignment: bool = Field(description="whether B was permuted onto A before fitting")
    cascade: ServedCascade | None = Field(
        None, description="mode='cascade': its members' t (in the order they run) and stop rule"
    )
    graphs: list[ServedGraph] = Field(description="the ONNX graphs built for this path")


class PathsResponse(BaseModel):
    """Every served path."""

    paths: list[PathInfo]
    max_batch: int = Field(description="the largest batch a request may carry")
