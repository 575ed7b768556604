"""Client errors of the HTTP service: user values quoted short, and one body for every 4xx.

Two rules, each kept in one place:

* a value the client sent is never echoed whole, in a body or a log line: :func:`clip` quotes
  it, cut to :data:`ECHO_LIMIT` characters with an ellipsis (a 20 MB ``path`` gives a 404 of a
  few hundred bytes, not of 20 MB);
* every 4xx answer has the body of :class:`ErrorResponse`, whoever wrote it (this service,
  BentoML's validation, starlette's router): :func:`error_body` rewrites the others into it,
  and :class:`service.gate.RequestGate` applies it to every 4xx response. The OpenAPI document
  names it for every 4xx (:mod:`service.openapi`).
"""

from __future__ import annotations

import json
import math
import re
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "REFUSED",
    "RequestError",
    "ECHO_LIMIT",
    "MESSAGE_LIMIT",
    "ErrorDetail",
    "ErrorResponse",
    "clip",
    "describe_loc",
    "error_body",
]

#: The status of an answer that needs a refused graph or path: the server cannot serve it
#: until its bundle is rebuilt (not the client's fault, and not a crash).
REFUSED = 503


class RequestError(Exception):
    """A request the service cannot answer: HTTP ``status`` and a message saying why."""

    def __init__(self, status: int, message: str, expected: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.expected = expected or {}


#: The longest quotation of a client's value in an error message or a log line.
ECHO_LIMIT = 80
#: The longest error message (a safety net: messages quote user values through ``clip``).
MESSAGE_LIMIT = 2000
_ELLIPSIS = "…"
# BentoML's summary of a pydantic ValidationError: "1 validation error for PredictRequest".
_PYDANTIC_SUMMARY = re.compile(r"\d+ validation errors? for \S+")
# pydantic's words for a body that is not an object name an internal class: say what it is.
_NOT_AN_OBJECT = re.compile(r"a valid dictionary or instance of \w+")


class ErrorDetail(BaseModel):
    """One problem found in a request body (a pydantic error, without the input)."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    loc: list[str | int] = Field(description="where: field names and list indices")
    msg: str = Field(description="what was wrong")
    type: str = Field(description="the kind of problem, e.g. 'missing', 'value_error'")


class ErrorResponse(BaseModel):
    """The body of every 4xx answer of this service."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    error: str = Field(description="what was wrong and what was expected")
    expected: dict = Field(default_factory=dict, description="valid values, where useful")
    detail: list[ErrorDetail] = Field(
        default_factory=list,
        description="a body that failed validation: each problem found, with where it is",
    )


def clip(value: object, limit: int = ECHO_LIMIT, *, quote: bool = True) -> str:
    """``value`` as it may appear in an error message or a log line, at most ``limit`` chars.

    Strings are quoted with ``repr`` (``quote=False``: as they are), so control characters and
    lone surrogates come out escaped; other values as ``repr``; anything longer is cut and ends
    with an ellipsis. Never formats more of ``value`` than it keeps: a 20 MB string or a
    4,000-digit integer costs no more than a short one.
    """
    if isinstance(value, str):
        head = value[: limit + 1]  # never all of a 20 MB string
        text = repr(head) if quote else head
        cut = len(value) > limit or len(text) > limit
    else:
        text = _short_repr(value, limit)
        cut = len(text) > limit
    if cut:
        text = text[: max(limit - 1, 0)] + _ELLIPSIS
    # Escapes anything UTF-8 cannot carry (a lone surrogate in an unquoted string).
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_repr(value: object, limit: int) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 3 * limit:  # repr of a huge int is slow, or refused (> 4300)
            return repr(value)
        digits = math.floor(value.bit_length() * math.log10(2)) + 1
        return f"<an integer of {digits} digits>"
    if isinstance(value, list | tuple):
        items: list[str] = []
        size = 2
        for item in value:
            items.append(_short_repr(item, limit))
            size += len(items[-1]) + 2
            if size > limit:
                break
        text = ", ".join(items)
        return f"[{text}]" if isinstance(value, list) else f"({text})"
    if isinstance(value, str):
        return clip(value, limit)
    try:
        return repr(value)[: limit + 1]
    except ValueError:  # e.g. an int inside, beyond Python's conversion limit
        return f"<{type(value).__name__}>"


def describe_loc(loc: list[str | int] | tuple[str | int, ...]) -> str:
    """A pydantic error location as text: ``["root", 1, "k"]`` -> ``"[1].k"``."""
    parts = list(loc[1:] if loc and loc[0] == "root" else loc)
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{clip(p, quote=False)}" for p in parts)
    return text.lstrip(".")


def error_body(status: int, body: bytes, content_type: str) -> dict[str, Any]:
    """The :class:`ErrorResponse` of a 4xx answer whose body was ``body``.

    Our own bodies pass through (messages clipped); BentoML's validation body (``{"error":
    "1 validation error for X", "detail": [...]}``) gets the first problem as its message and
    keeps the list; BentoML's other 4xx body (a one-element list) and plain text (starlette's
    "Not Found") become the message.
    """
    data: Any = None
    if "json" in content_type.lower():
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not (isinstance(data, dict) and isinstance(data.get("error"), str)):
        text = body.decode("utf-8", "replace").strip()
        phrase = _phrase(status)
        message = phrase if not text or text == phrase else f"{phrase}: {text}"
        return ErrorResponse(error=clip(message, MESSAGE_LIMIT, quote=False)).model_dump()
    details = _details(data.get("detail"))
    message = data["error"]
    if details and _PYDANTIC_SUMMARY.fullmatch(message):
        first = details[0]
        where = describe_loc(first.loc)
        what = first.msg.removeprefix("Value error, ")  # pydantic's prefix for our ValueErrors
        message = f"{where}: {what}" if where else what
        if len(details) > 1:
            message += f" (and {len(details) - 1} more problems, see detail)"
    elif isinstance(data.get("detail"), str):
        message = f"{message}: {data['detail']}"
    expected = data.get("expected")
    return ErrorResponse(
        error=clip(message, MESSAGE_LIMIT, quote=False),
        expected=expected if isinstance(expected, dict) else {},
        detail=details,
    ).model_dump()


def _details(raw: Any) -> list[ErrorDetail]:
    if not isinstance(raw, list):
        return []
    details = []
    for item in raw[:20]:  # pydantic lists every bad element; the first few say enough
        if not isinstance(item, dict):
            continue
        loc = item.get("loc")
        loc = loc if isinstance(loc, list) else []
        details.append(
            ErrorDetail(
                loc=[p if isinstance(p, int) else clip(str(p), quote=False) for p in loc],
                msg=clip(
                    _NOT_AN_OBJECT.sub("an object", str(item.get("msg", ""))),
                    MESSAGE_LIMIT,
                    quote=False,
                ),
                type=clip(str(item.get("type", "")), quote=False),
            )
        )
    return details


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
