"""Request bodies, parsed off the event loop: every API's input spec (:func:`off_loop`).

BentoML parses a request body on the event loop: a 62 MB JSON body of nested lists held it for
seconds, and every other request, ``/readyz`` included, waited. Here:

* a small body (<= :data:`INLINE_BYTES`) is parsed inline, as BentoML would;
* a larger one in a worker thread, one at a time per worker, with the decoder of
  :mod:`service.decoder`, whose calls into C are short: a thread is not enough by itself, since
  ``json.loads`` or pydantic's parser would hold the GIL for the whole document. The cyclic
  garbage collector is paused meanwhile (see below);
* a multipart upload is fed to starlette's parser in small chunks, with a turn for the event
  loop between them, and the rest (pydantic, the temporary file) runs in a thread.

No input spec here ever fetches a URL or opens a file named by the client: an upload field must
be a file part (BentoML's own multipart parsing downloads a text field that holds a URL), and
its file name is never used as given.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
from collections.abc import Callable
from typing import Any, LiteralString, cast

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from .decoder import JSONError, parse_json, release
from .errors import clip

__all__ = ["INLINE_BYTES", "off_loop", "parses_off_loop"]

#: Bodies up to this size are parsed on the event loop (a thread hop costs more).
INLINE_BYTES = 1 << 16

# One large body is parsed at a time in each worker: several would share the one core the GIL
# allows, and each holds a few hundred MB of Python objects while it is parsed.
_BIG_BODIES = anyio.CapacityLimiter(1)

# ---------------------------------------------------------------------------------------------
# Millions of lists: the cyclic garbage collector, and freeing them
#
# A 60 MB body of nested lists is a million lists or more. Built with the collector running,
# its full collections walk all of them, each in one pass that holds the GIL (measured: stalls
# of a second); freed with one `del`, they go in one recursive pass too (0.4 s for 14 million).
# So the collector is paused while a large body is parsed and validated, what survives is then
# frozen (moved out of the collector's sight, `gc.freeze`: re-enabled, the collector would
# otherwise walk them all at its next pass), and lists are freed by `release`, a bounded number
# at a time.

_collector = threading.Lock()


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection inside; the objects alive at the end are frozen (thawed
    by the next large body: cycles among them wait until then)."""
    with _collector:
        enabled = gc.isenabled()
        gc.unfreeze()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            if enabled:
                gc.enable()


# ---------------------------------------------------------------------------------------------
# Input specs


def _invalid(
    title: str, kind: LiteralString, message: str, loc: tuple[str | int, ...] = ()
) -> ValidationError:
    """A pydantic ValidationError of one problem (BentoML answers it with a 400)."""
    error = PydanticCustomError(kind, "{message}", {"message": message})
    details = [InitErrorDetails(type=error, loc=loc, input=None)]
    return ValidationError.from_exception_data(title, details)


def _json_model(cls: type[BaseModel], body: bytes) -> BaseModel:
    try:
        data = parse_json(body)
    except JSONError as err:
        raise _invalid(cls.__name__, "json_invalid", f"Invalid JSON: {err}") from None
    try:
        return cls.model_validate(data)
    except ValidationError:
        release(data)  # here, a step at a time, not with the error, in one go
        raise


def _large_json_model(cls: type[BaseModel], body: bytes) -> BaseModel:
    """``_json_model`` for a large body (in a worker thread): the collector paused meanwhile.
    The lists the model keeps are freed by ``release`` once the request is answered."""
    with _collector_paused():
        return _json_model(cls, body)


async def _form_model(cls: type[BaseModel], request: Request, files: list[str]) -> BaseModel:
    """The model of a multipart form: file fields must be file parts, text fields are read as
    JSON when they parse (``k=2``), as text otherwise (``path=paths/bezier``), as BentoML
    does."""
    body = await request.body()  # already read (and size-checked) by the RequestGate

    async def chunks():
        for start in range(0, len(body), INLINE_BYTES):
            yield body[start : start + INLINE_BYTES]
            await anyio.sleep(0)  # a turn for the event loop between chunks

    try:
        form = await MultiPartParser(request.headers, chunks()).parse()
    except Exception as err:  # starlette's MultiPartException, and python-multipart's own
        raise _invalid(
            cls.__name__,
            "multipart_invalid",
            f"malformed multipart/form-data body ({clip(str(err), quote=False)})",
        ) from None
    data: dict[str, Any] = {}
    try:
        for name in form:
            values = form.getlist(name)
            if name in files:
                texts = [v for v in values if not isinstance(v, UploadFile)]
                if texts:
                    raise _invalid(
                        cls.__name__,
                        "file_required",
                        f"must be a file part (curl -F {name}=@digit.png), got a text field "
                        f"{clip(texts[0])}: the service never fetches a URL or opens a file "
                        "named by the client",
                        (name,),
                    )
                for value in values:
                    if isinstance(value, UploadFile):
                        value.filename = _safe_filename(value.filename)
                data[name] = values[0]
                continue
            value = values[0]
            if name not in cls.model_fields:
                continue  # not a parameter: ignored, as BentoML does
            if isinstance(value, UploadFile):
                raise _invalid(
                    cls.__name__,
                    "text_required",
                    f"must be a text field (curl -F {name}=...), got a file part",
                    (name,),
                )
            try:
                data[name] = json.loads(value)
            except (ValueError, RecursionError):
                data[name] = value
        return await anyio.to_thread.run_sync(cls.model_validate, data)
    finally:
        await form.close()


def _safe_filename(name: str | None) -> str | None:
    """An upload's file name as BentoML may use it (the suffix of a temporary file): its
    extension only, short and plain."""
    if not name:
        return name
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    suffix = "".join(c for c in suffix if c.isascii() and c.isalnum())[:16]
    return f"upload.{suffix}" if suffix else "upload"


def off_loop(spec: type[BaseModel]) -> type[BaseModel]:
    """``spec`` (an input spec BentoML inferred) with its body parsed by this module: JSON in
    bounded steps, large bodies in a worker thread, multipart forms chunk by chunk; never a URL
    fetched nor a client-named file opened."""
    files = list(getattr(spec, "multipart_fields", []))

    async def from_http_request(cls: type[BaseModel], request: Request, serde: object) -> BaseModel:
        if files:
            return await _form_model(cls, request, files)
        body = await request.body()
        if len(body) <= INLINE_BYTES:
            return _json_model(cls, body)
        return await anyio.to_thread.run_sync(_large_json_model, cls, body, limiter=_BIG_BODIES)

    namespace = {
        "__module__": spec.__module__,
        "__doc__": spec.__doc__,
        "from_http_request": classmethod(from_http_request),
    }
    return cast(type[BaseModel], type(spec.__name__, (spec,), namespace))


def parses_off_loop(spec: type) -> bool:
    """Whether ``spec`` parses its body with this module (see ``off_loop``)."""
    method: Callable | None = getattr(spec, "from_http_request", None)
    return getattr(method, "__qualname__", "").startswith("off_loop.")
