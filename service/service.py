"""The HTTP service: curve ensembles and merged models of path artifacts, over onnxruntime.

    bentoml serve service.service:ModeConnService      # MODECONN_ARTIFACTS=./artifacts

Every artifact with a serving bundle (``modeconn serve-build DIR``) below the models directory
is served under its path relative to it (``paths/bezier``). Endpoints (JSON unless noted):

* ``POST /predict``: a batch for one path, as its K-member ensemble (mean softmax, entropy,
  mutual information, disagreement; Garipov et al. 2018, arXiv 1802.10026) or as the merged
  network at one t; inputs as nested lists, or for large batches as base64 float32 bytes;
* ``POST /predict_batch``: a list of such requests, adaptively batched by BentoML;
* ``POST /predict_image``: one PNG/JPEG upload (multipart), preprocessed as the path's data set;
* ``GET|POST /paths``: what is served, with barrier and accuracy from each manifest;
* ``GET|POST /export``: the ONNX graph of an ensemble or merged model, as a download;
* BentoML's ``/readyz``, ``/livez``, ``/metrics``, and the OpenAPI page at ``/``.

The worker imports no torch: numpy, onnxruntime (:mod:`modeconn.runtime`), pydantic, Pillow.
Bad input is a 4xx whose message says what was expected, never a 500; 4xx tracebacks that
BentoML would log at ERROR are logged as one INFO line.

Settings (environment): ``MODECONN_ARTIFACTS`` (models directory, default ``./artifacts``),
``MODECONN_MODELS`` (BentoML model store tags, comma-separated, from ``modeconn serve-build
--to-store``), ``MODECONN_MAX_BATCH`` (default 1024), ``MODECONN_MAX_BODY_MB`` (default 64),
``MODECONN_DEVICE`` (auto | cuda | cpu), ``MODECONN_ORT_THREADS`` (threads per onnxruntime
operator; default 1 per worker), ``MODECONN_WORKERS`` (worker processes, default 1),
``MODECONN_THREADS`` (concurrent requests per worker, default 4), ``MODECONN_PRELOAD``
(``0``: open graphs on first use).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType
from pydantic import Field, model_validator
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.catalog import Catalog, RequestError
from service.schemas import (
    ErrorResponse,
    ExportRequest,
    PathsRequest,
    PathsResponse,
    PredictRequest,
    PredictResponse,
    max_batch,
)

__all__ = ["ModeConnService", "models_dir"]

log = logging.getLogger("modeconn.service")

JSON_ROUTES = ("/predict", "/predict_batch", "/paths", "/export")
UPLOAD_ROUTES = ("/predict_image",)


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def models_dir() -> Path:
    """The models directory: ``MODECONN_ARTIFACTS``, default ``./artifacts``."""
    return Path(os.environ.get("MODECONN_ARTIFACTS", "") or "artifacts")


def _error(err: RequestError) -> JSONResponse:
    log.info("client error %d: %s", err.status, err.message)
    body = ErrorResponse(error=err.message, expected=err.expected)
    return JSONResponse(body.model_dump(), status_code=err.status)


# ---------------------------------------------------------------------------------------------
# Readable logs: BentoML logs every 4xx it raises itself (pydantic validation, malformed JSON)
# at ERROR with a traceback. Client errors become one INFO line; server errors keep theirs.


class _QuietClientErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        status = None
        if isinstance(exc, ValidationError):
            status = 400
        elif isinstance(exc, BentoMLException) and exc.error_code.value < 500:
            status = int(exc.error_code.value)
        if status is None:
            return True
        if isinstance(exc, ValidationError):
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            detail = f"{where + ': ' if where else ''}{first.get('msg', '')}"
        else:
            detail = str(exc)
        record.msg = "client error %d on %s: %s"
        route = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.args = (status, route, detail[:300])
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())


# ---------------------------------------------------------------------------------------------
# A gate in front of the endpoints: body size and content type are checked before BentoML
# parses anything (BentoML answers a multipart request without a boundary with a 500).


class RequestGate:
    """ASGI middleware in front of the POST endpoints: the body is read (at most the limit:
    413 above it, whether or not a Content-Length was sent), the content type checked (415),
    and an upload's multipart encoding parsed once (400 if malformed), before BentoML sees it.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int | None = None):
        self.app = app
        mb = _env_int("MODECONN_MAX_BODY_MB", 64, minimum=1)
        self.max_body_bytes = max_body_bytes or mb * 2**20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or (route not in JSON_ROUTES and route not in UPLOAD_ROUTES)
        ):
            return await self.app(scope, receive, send)
        problem, body = await self._check(scope, receive, route)
        if problem is not None:
            status, message = problem
            log.info("client error %d on %s: %s", status, route, message)
            response = JSONResponse(ErrorResponse(error=message).model_dump(), status_code=status)
            return await response(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _check(
        self, scope: Scope, receive: Receive, route: str
    ) -> tuple[tuple[int, str] | None, bytes]:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if route in JSON_ROUTES and media not in ("", "application/json"):
            return (
                415,
                f"{route} takes a JSON body (Content-Type: application/json), got {media!r}",
            ), b""
        if route in UPLOAD_ROUTES and media != "multipart/form-data":
            return (
                415,
                f"{route} takes a multipart/form-data upload (curl -F image=@digit.png -F "
                f"path=...), got {media or 'no content type'!r}",
            ), b""
        if route in UPLOAD_ROUTES and "boundary=" not in content_type.lower():
            return (400, "multipart/form-data without a boundary: send a well-formed upload"), b""
        too_big = (
            413,
            f"the body is above the limit of {self.max_body_bytes} bytes (MODECONN_MAX_BODY_MB)",
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return too_big, b""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return (400, "the request body was not received"), b""
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return too_big, b""
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if route in UPLOAD_ROUTES:
            try:
                await _parse_multipart(headers, body)
            except Exception as err:  # python-multipart raises several unrelated types
                return (400, f"malformed multipart/form-data body ({err})"), b""
        return None, body


async def _parse_multipart(headers: Headers, body: bytes) -> None:
    """Parse ``body`` as the multipart form ``headers`` announce (and drop it): raises if it
    is malformed, where BentoML's own parsing would answer 500."""

    async def stream():
        yield body

    form = await MultiPartParser(headers, stream()).parse()
    await form.close()


# ---------------------------------------------------------------------------------------------
# GET routes (BentoML's own APIs are POST only): a small Starlette app mounted beside them.


def _query(request: Request, name: str, cast):
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        return cast(text)
    except ValueError:
        raise RequestError(
            400, f"query parameter {name}={text!r} is not a valid {cast.__name__}"
        ) from None


async def _get_paths(request: Request) -> JSONResponse:
    catalog = bentoml.get_current_service().catalog
    try:
        result = _list_paths(catalog, request.query_params.get("path"))
    except RequestError as err:
        return _error(err)
    return JSONResponse(result.model_dump(mode="json"))


def _list_paths(catalog: Catalog, name: str | None) -> PathsResponse:
    names = [name] if name else sorted(catalog.paths)
    return PathsResponse(paths=[catalog.get(n).info() for n in names], max_batch=max_batch())


async def _get_export(request: Request) -> FileResponse | JSONResponse:
    service = bentoml.get_current_service()
    try:
        mode = request.query_params.get("mode") or "ensemble"
        if mode not in ("ensemble", "merged", "point"):
            raise RequestError(
                400,
                f"mode={mode!r}: expected 'ensemble', 'merged' or 'point'",
                {"mode": ["ensemble", "merged", "point"]},
            )
        path = request.query_params.get("path")
        if not path:
            raise RequestError(400, "query parameter path is required, e.g. ?path=paths/bezier")
        k, t = _query(request, "k", int), _query(request, "t", float)
        if t is not None and not 0.0 <= t <= 1.0:
            raise RequestError(400, f"t={t!r} must lie in [0, 1]")
        return _download(service.catalog, path, mode, k, t)
    except RequestError as err:
        return _error(err)


def _download(
    catalog: Catalog, path: str, mode: str, k: int | None, t: float | None
) -> FileResponse:
    graph, filename = catalog.export(path, mode, k, t)
    return FileResponse(graph.file, media_type="application/octet-stream", filename=filename)


_get_app = Starlette(
    routes=[
        Route("/paths", _get_paths, methods=["GET"]),
        Route("/export", _get_export, methods=["GET"]),
    ]
)


# ---------------------------------------------------------------------------------------------
# The service
#
# An API that answers a client error itself returns a starlette response (an ErrorResponse body
# with its 4xx status; BentoML sends a returned Response as it is), so its return annotation is a
# union, from which BentoML cannot infer the output spec. Its success body is annotated on a stub
# below instead, and BentoML infers the output spec (the OpenAPI response) from that.


def _predicted() -> PredictResponse:
    raise NotImplementedError  # never called: read by BentoML for its return annotation


def _listed() -> PathsResponse:
    raise NotImplementedError  # never called: read by BentoML for its return annotation


def _graph_file() -> Annotated[Path, ContentType("application/octet-stream")]:
    raise NotImplementedError  # never called: read by BentoML for its return annotation


def _output_spec(stub: Callable[[], object]) -> type[bentoml.IODescriptor]:
    """The output spec BentoML infers from ``stub``'s return annotation."""
    return bentoml.IODescriptor.from_output(stub)


class BatchItem(PredictRequest):
    """One request of /predict_batch, checked against the served paths while it is parsed:
    adaptive batching merges concurrent calls, so a bad item must fail before it joins one."""

    @model_validator(mode="after")
    def _check_served(self) -> BatchItem:
        try:
            catalog = bentoml.get_current_service().catalog
        except BentoMLException:  # no running service (plain pydantic use): nothing to check
            return self
        try:
            catalog.resolve(self)
        except RequestError as err:
            raise ValueError(err.message) from None
        return self


@bentoml.asgi_app(_get_app, path="/", name="get-routes")
@bentoml.service(
    workers=_env_int("MODECONN_WORKERS", 1, minimum=1),
    threads=_env_int("MODECONN_THREADS", 4, minimum=1),
    traffic={"timeout": 60},
)
class ModeConnService:
    """Ensembles along low-loss paths and merged models, from prebuilt ONNX graphs."""

    def __init__(self) -> None:
        device = os.environ.get("MODECONN_DEVICE", "auto") or "auto"
        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"MODECONN_DEVICE must be auto, cuda or cpu, got {device!r}")
        logging.getLogger("modeconn.service").setLevel(logging.INFO)
        tags = [t.strip() for t in os.environ.get("MODECONN_MODELS", "").split(",") if t.strip()]
        self.catalog = Catalog.load(
            models_dir(),
            tags,
            device=device,
            intra_op_threads=_env_int("MODECONN_ORT_THREADS", 1),
            preload=os.environ.get("MODECONN_PRELOAD", "1") != "0",
        )

    @bentoml.api(route="/predict", output_spec=_output_spec(_predicted))
    def predict(self, request: PredictRequest, /) -> PredictResponse | JSONResponse:
        """Predict a batch with a path's K-member ensemble or its merged model at t."""
        try:
            return self.catalog.predict(request)
        except RequestError as err:
            return _error(err)

    # max_latency_ms bounds the queueing BentoML allows (beyond it: 503) and scales its first
    # guesses of the batch cost: a large value makes the first requests wait for company.
    @bentoml.api(route="/predict_batch", batchable=True, max_batch_size=64, max_latency_ms=2000)
    def predict_batch(self, requests: list[BatchItem], /) -> list[PredictResponse]:
        """Several prediction requests at once; concurrent calls are batched adaptively."""
        return self.catalog.predict_many(requests)

    @bentoml.api(route="/predict_image", output_spec=_output_spec(_predicted))
    def predict_image(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG image")],
        path: Annotated[str, Field(description="a served path's name", examples=["paths/bezier"])],
        mode: Annotated[
            Literal["ensemble", "merged", "point"], Field(description="as in /predict")
        ] = "ensemble",
        k: Annotated[int | None, Field(ge=1, description="ensemble members")] = None,
        t: Annotated[float | None, Field(ge=0.0, le=1.0, description="merged/point: t")] = None,
        invert: Annotated[
            bool | None,
            Field(description="invert the image (default: decided from its border)"),
        ] = None,
    ) -> PredictResponse | JSONResponse:
        """Predict one uploaded image, preprocessed as the path's training data was."""
        try:
            data = Path(image).read_bytes()
            return self.catalog.predict_image(data, path, mode, k, t, invert)
        except RequestError as err:
            return _error(err)

    @bentoml.api(route="/paths", output_spec=_output_spec(_listed))
    def paths(self, request: PathsRequest, /) -> PathsResponse | JSONResponse:
        """The served paths: method, model, ensemble sizes, served t, barrier and accuracy."""
        try:
            return _list_paths(self.catalog, request.path)
        except RequestError as err:
            return _error(err)

    @bentoml.api(route="/export", output_spec=_output_spec(_graph_file))
    def export(self, request: ExportRequest, /) -> FileResponse | JSONResponse:
        """The ONNX graph of a K-member ensemble or of the merged model at t, as a download."""
        try:
            return _download(self.catalog, request.path, request.mode, request.k, request.t)
        except RequestError as err:
            return _error(err)


# BentoML annotates the parameter as type[AsgiMiddleware], a protocol whose *instances* take the
# app, where starlette (which BentoML hands the class to) constructs the class with it.
ModeConnService.add_asgi_middleware(RequestGate)  # pyright: ignore[reportArgumentType]
