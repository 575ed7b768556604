"""The HTTP service: curve ensembles and merged models of path artifacts, over onnxruntime.

    bentoml serve service.service:ModeConnService      # MODECONN_ARTIFACTS=./artifacts

Every artifact with a serving bundle (``modeconn serve-build DIR``) below the models directory
is served under its path relative to it (``paths/bezier``). Endpoints (JSON unless noted):

* ``POST /predict``: a batch for one path, as its K-member ensemble (mean softmax, entropy,
  mutual information, disagreement; Garipov et al. 2018, arXiv 1802.10026), as the merged
  network at one t, or as a cascade of members that each input leaves once it is confident
  (``members_used`` per input); inputs as nested lists, or for large batches as base64 float32
  bytes;
* ``POST /predict_batch``: a list of such requests, adaptively batched by BentoML;
* ``POST /predict_image``: one PNG/JPEG upload (multipart), preprocessed as the path's data set;
* ``GET|POST /paths``: what is served, with barrier and accuracy from each manifest;
* ``GET|POST /export``: the ONNX graph of an ensemble or merged model, as a download;
* BentoML's ``/readyz``, ``/livez``, ``/metrics``; the API docs at ``/docs`` (Swagger UI) and
  ``/docs.json`` (OpenAPI, :mod:`service.openapi`), and BentoML's page at ``/``.

The worker imports no torch: numpy, onnxruntime (:mod:`modeconn.runtime`), pydantic, Pillow.
Bad input is a 4xx whose message says what was expected, never a 500, always with the body of
:class:`service.errors.ErrorResponse`, quoting what the client sent short; 4xx tracebacks that
BentoML would log at ERROR are logged as one INFO line. Request bodies are parsed off the event
loop (:mod:`service.bodies`); authentication, body size and content type are checked before
(:mod:`service.gate`).

Settings (environment): ``MODECONN_ARTIFACTS`` (models directory, default ``./artifacts``),
``MODECONN_MODELS`` (BentoML model store tags, comma-separated, from ``modeconn serve-build
--to-store``), ``MODECONN_MAX_BATCH`` (default 1024), ``MODECONN_MAX_BODY_MB`` (default 64),
``MODECONN_DEVICE`` (auto | cuda | cpu), ``MODECONN_ORT_THREADS`` (threads per onnxruntime
operator; default 1 per worker), ``MODECONN_WORKERS`` (worker processes, default 1),
``MODECONN_THREADS`` (concurrent requests per worker, default 4), ``MODECONN_PRELOAD``
(``0``: open graphs on first use), ``MODECONN_API_KEY`` (every route but the health checks and
the docs then needs ``Authorization: Bearer <key>``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import bentoml
from bentoml.exceptions import BentoMLException
from bentoml.validators import ContentType
from pydantic import BeforeValidator, Field, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .bodies import off_loop, release
from .catalog import Catalog, RequestError
from .errors import ErrorResponse, clip, describe_loc
from .gate import JSON_ROUTES, UPLOAD_ROUTES, RequestGate, api_key, env_int
from .lifecycle import server_worker
from .openapi import DOCS_PAGE, openapi_document
from .schemas import (
    MAX_K,
    ExportRequest,
    Mode,
    PathsRequest,
    PathsResponse,
    Precision,
    PredictRequest,
    PredictResponse,
    max_batch,
)

__all__ = ["ModeConnService", "RequestGate", "JSON_ROUTES", "UPLOAD_ROUTES", "models_dir"]

log = logging.getLogger("modeconn.service")


def models_dir() -> Path:
    """The models directory: ``MODECONN_ARTIFACTS``, default ``./artifacts``."""
    return Path(os.environ.get("MODECONN_ARTIFACTS", "") or "artifacts")


def _error(err: RequestError) -> JSONResponse:
    message = clip(err.message, 2000, quote=False)  # its user values are quoted short already
    log.info("client error %d: %s", err.status, message)
    body = ErrorResponse(error=message, expected=err.expected)
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
            first = exc.errors(include_url=False, include_input=False)[0]
            where = describe_loc(list(first.get("loc", ())))
            detail = f"{where + ': ' if where else ''}{first.get('msg', '')}"
        else:
            detail = str(exc)
        record.msg = "client error %d on %s: %s"
        route = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.args = (status, clip(str(route), quote=False), clip(detail, 300, quote=False))
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


class _ClippedAccessLog(logging.Filter):
    """BentoML's access log line quotes the path and content type a client sent: short."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                clip(a, 300, quote=False) if isinstance(a, str) else a for a in record.args
            )
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
logging.getLogger("bentoml.access").addFilter(_ClippedAccessLog())


# ---------------------------------------------------------------------------------------------
# GET routes (BentoML's own APIs are POST only): a small Starlette app mounted beside them.


_T = TypeVar("_T", int, float)


def _query(request: Request, name: str, cast: Callable[[str], _T]) -> _T | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        return cast(text)
    except ValueError:
        kind = getattr(cast, "__name__", "value")
        raise RequestError(
            400, f"query parameter {name}={clip(text)} is not a valid {kind}"
        ) from None


async def _get_paths(request: Request) -> JSONResponse:
    catalog = bentoml.get_current_service().catalog
    try:
        result = _list_paths(catalog, request.query_params.get("path"))
    except RequestError as err:
        return _error(err)
    return JSONResponse(result.model_dump(mode="json"))


def _list_paths(catalog: Catalog, name: str | None) -> PathsResponse:
    served = [catalog.get(name)] if name else [catalog.paths[n] for n in sorted(catalog.paths)]
    return PathsResponse(paths=[p.info() for p in served], max_batch=max_batch())


async def _get_export(request: Request) -> FileResponse | JSONResponse:
    service = bentoml.get_current_service()
    try:
        mode = request.query_params.get("mode") or "ensemble"
        if mode not in get_args(Mode):
            raise RequestError(
                400,
                f"mode={clip(mode)}: expected one of {', '.join(get_args(Mode))}",
                {"mode": list(get_args(Mode))},
            )
        path = request.query_params.get("path")
        if not path:
            raise RequestError(400, "query parameter path is required, e.g. ?path=paths/bezier")
        k, t = _query(request, "k", int), _query(request, "t", float)
        if k is not None and not 1 <= k <= MAX_K:
            raise RequestError(400, f"k={clip(k)} must be an ensemble size, 1 to {MAX_K}")
        if t is not None and not 0.0 <= t <= 1.0:
            raise RequestError(400, f"t={t!r} must lie in [0, 1]")
        precision = request.query_params.get("precision") or "fp32"
        if precision not in get_args(Precision):
            raise RequestError(
                400,
                f"precision={clip(precision)}: expected one of {', '.join(get_args(Precision))}",
                {"precision": list(get_args(Precision))},
            )
        return _download(service.catalog, path, mode, k, t, precision)
    except RequestError as err:
        return _error(err)


def _download(
    catalog: Catalog, path: str, mode: str, k: int | None, t: float | None, precision: str
) -> FileResponse:
    graph, filename = catalog.export(path, mode, k, t, precision)
    return FileResponse(graph.file, media_type="application/octet-stream", filename=filename)


async def _docs(request: Request) -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)


@functools.cache
def _document(key_required: bool) -> bytes:
    """The OpenAPI document, made once (35 ms; /docs.json is open to anyone)."""
    spec = openapi_document(
        ModeConnService.openapi_spec.asdict(),
        {"/paths": PathsRequest, "/export": ExportRequest},
        key_required=key_required,
    )
    return bytes(JSONResponse(spec).body)


async def _docs_json(request: Request) -> Response:
    return Response(_document(api_key() is not None), media_type="application/json")


# Mounted at "/" before BentoML's own routes of the same names: /docs.json here is BentoML's
# document, completed (service.openapi).
_get_app = Starlette(
    routes=[
        Route("/paths", _get_paths, methods=["GET"]),
        Route("/export", _get_export, methods=["GET"]),
        Route("/docs", _docs, methods=["GET"]),
        Route("/docs.json", _docs_json, methods=["GET"]),
    ]
)


# ---------------------------------------------------------------------------------------------
# The service
#
# An API that answers a client error itself returns a starlette response (an ErrorResponse body
# with its 4xx status; BentoML sends a returned Response as it is), and /predict answers with
# JSON it serialized itself; so its return annotation is a response, from which BentoML cannot
# infer the output spec. Its success body is annotated on a stub below instead, and BentoML
# infers the output spec (the OpenAPI response) from that.


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
            _, graph, _ = catalog.resolve(self)
            graph.open()  # opens (and checks) lazily loaded graphs now, not mid-batch
        except RequestError as err:
            raise ValueError(err.message) from None
        return self


def _batch_rules(items: Any) -> Any:
    """/predict_batch takes what /predict takes: at least one input, at most MODECONN_MAX_BATCH
    counted across the items (checked on the raw items, before any is parsed)."""
    if not isinstance(items, list):
        return items  # pydantic says what was expected
    if not items:
        raise ValueError("the batch is empty: send a list of at least one request")
    limit, total = max_batch(), 0
    for item in items:
        inputs = item.get("inputs") if isinstance(item, dict) else None
        shape = item.get("shape") if isinstance(item, dict) else None
        if isinstance(inputs, list):
            total += len(inputs)
        elif isinstance(shape, list) and shape and isinstance(shape[0], int):
            total += shape[0]
        else:
            total += 1  # every request carries at least one input
        if total > limit:
            raise ValueError(
                f"the requests carry {clip(total)} inputs or more, above the maximum of {limit} "
                "(MODECONN_MAX_BATCH) for one call: split them into several calls"
            )
    return items


BatchRequests = Annotated[list[BatchItem], BeforeValidator(_batch_rules)]

_F = TypeVar("_F", bound=Callable)


def _api(**options: Any) -> Callable[[_F], _F]:
    """``bentoml.api(**options)``, with an input spec that parses the body off the event loop
    and never fetches a URL or opens a file named by the client (``service.bodies.off_loop``).
    """

    def decorate(func: _F) -> _F:
        spec = bentoml.IODescriptor.from_input(func, skip_self=True)
        return bentoml.api(input_spec=off_loop(spec), **options)(func)  # pyright: ignore

    return decorate


def _answer(response: PredictResponse) -> Response:
    """``response`` as JSON, made here (a worker thread): BentoML would serialize it on the
    event loop (90 ms for 1,024 inputs of 1,000 classes)."""
    return Response(response.model_dump_json(), media_type="application/json")


def _release_inputs(requests: Sequence[PredictRequest]) -> None:
    """Free answered requests' nested input lists here (a worker thread), a bounded step at a
    time, rather than in one go when BentoML drops the requests on the event loop."""
    for request in requests:
        release(request.inputs)


@bentoml.asgi_app(_get_app, path="/", name="get-routes")
@bentoml.service(
    workers=env_int("MODECONN_WORKERS", 1, minimum=1),
    threads=env_int("MODECONN_THREADS", 4, minimum=1),
    traffic={"timeout": 60},
    # BentoML's access log decodes the request's Content-Type as UTF-8 and fails (a broken
    # answer, a traceback) on any other byte a client sends: it is left out of the log.
    logging={"access": {"request_content_type": False}},
)
class ModeConnService:
    """Ensembles along low-loss paths and merged models, from prebuilt ONNX graphs."""

    @server_worker
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
            intra_op_threads=env_int("MODECONN_ORT_THREADS", 1),
            preload=os.environ.get("MODECONN_PRELOAD", "1") != "0",
        )

    @_api(route="/predict", output_spec=_output_spec(_predicted))
    def predict(self, request: PredictRequest, /) -> Response:
        """Predict a batch with a path's K-member ensemble or its merged model at t."""
        try:
            return _answer(self.catalog.predict(request))
        except RequestError as err:
            return _error(err)
        finally:
            _release_inputs([request])

    # max_latency_ms bounds the queueing BentoML allows (beyond it: 503) and scales its first
    # guesses of the batch cost: a large value makes the first requests wait for company.
    @_api(route="/predict_batch", batchable=True, max_batch_size=64, max_latency_ms=2000)
    def predict_batch(self, requests: BatchRequests, /) -> list[PredictResponse]:
        """Several prediction requests at once (at most MODECONN_MAX_BATCH inputs in all);
        concurrent calls are batched adaptively."""
        try:
            return self.catalog.predict_many(requests)
        finally:
            _release_inputs(requests)

    @_api(route="/predict_image", output_spec=_output_spec(_predicted))
    def predict_image(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG image")],
        path: Annotated[str, Field(description="a served path's name", examples=["paths/bezier"])],
        mode: Annotated[Mode, Field(description="as in /predict")] = "ensemble",
        k: Annotated[
            int | None, Field(ge=1, le=MAX_K, description="ensemble (cascade) members")
        ] = None,
        t: Annotated[float | None, Field(ge=0.0, le=1.0, description="merged/point: t")] = None,
        invert: Annotated[
            bool | None,
            Field(description="invert the image (default: decided from its border)"),
        ] = None,
        precision: Annotated[Precision, Field(description="as in /predict")] = "fp32",
    ) -> Response:
        """Predict one uploaded image, preprocessed as the path's training data was."""
        try:
            # `image` is always the temporary file of an uploaded part (service.bodies).
            data = Path(image).read_bytes()
            return _answer(self.catalog.predict_image(data, path, mode, k, t, invert, precision))
        except RequestError as err:
            return _error(err)

    @_api(route="/paths", output_spec=_output_spec(_listed))
    def paths(self, request: PathsRequest, /) -> PathsResponse | JSONResponse:
        """The served paths: method, model, ensemble sizes, served t, barrier and accuracy."""
        try:
            return _list_paths(self.catalog, request.path)
        except RequestError as err:
            return _error(err)

    @_api(route="/export", output_spec=_output_spec(_graph_file))
    def export(self, request: ExportRequest, /) -> FileResponse | JSONResponse:
        """The ONNX graph of a K-member ensemble or of the merged model at t, as a download."""
        try:
            return _download(
                self.catalog, request.path, request.mode, request.k, request.t, request.precision
            )
        except RequestError as err:
            return _error(err)


# BentoML annotates the parameter as type[AsgiMiddleware], a protocol whose *instances* take the
# app, where starlette (which BentoML hands the class to) constructs the class with it.
ModeConnService.add_asgi_middleware(RequestGate)  # pyright: ignore[reportArgumentType]
