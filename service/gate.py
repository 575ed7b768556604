"""The gate in front of every route of the service (ASGI middleware).

In order, for each HTTP request:

1. authentication, when ``MODECONN_API_KEY`` is set: every route but the health checks and
   the API docs needs ``Authorization: Bearer <key>`` (401 with ``WWW-Authenticate``
   otherwise; the key is compared in constant time);
2. on the POST endpoints, before BentoML sees anything: the content type (415; BentoML would
   answer a multipart request without a boundary with a 500) and the body size (413 above
   ``MODECONN_MAX_BODY_MB``, whether or not a Content-Length was sent). The body is read here
   and handed on whole;
3. every 4xx answer, whoever wrote it, leaves with the body of
   :class:`service.errors.ErrorResponse` (:func:`service.errors.error_body`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ErrorResponse, clip, error_body

__all__ = [
    "JSON_ROUTES",
    "UPLOAD_ROUTES",
    "PUBLIC_ROUTES",
    "RequestGate",
    "api_key",
    "env_int",
]

log = logging.getLogger("modeconn.service")

JSON_ROUTES = ("/predict", "/predict_batch", "/paths", "/export")
UPLOAD_ROUTES = ("/predict_image",)
#: Open without the API key: health checks (for orchestrators) and the API docs, which show
#: the routes and schemas this open-source service has anyway, never the served paths.
PUBLIC_ROUTES = ("/livez", "/healthz", "/readyz", "/", "/docs", "/docs.json")
_PUBLIC_PREFIXES = ("/static_content/",)  # the Swagger UI's files, shipped with BentoML


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """The integer setting ``name`` from the environment (``ValueError`` if malformed)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {clip(text)}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def api_key() -> str | None:
    """The key clients must send (``MODECONN_API_KEY``), or None: no authentication."""
    key = os.environ.get("MODECONN_API_KEY", "").strip()
    return key or None


def _reply(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=message).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class RequestGate:
    """ASGI middleware in front of every route: authentication, then (POST endpoints) content
    type and body size, then one error schema for every 4xx answer. See the module's doc."""

    def __init__(self, app: ASGIApp, max_body_bytes: int | None = None, key: str | None = None):
        self.app = app
        mb = env_int("MODECONN_MAX_BODY_MB", 64, minimum=1)
        self.max_body_bytes = max_body_bytes or mb * 2**20
        self.key = (key or api_key() or "").encode() or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        send = _ErrorBodies(send, head=scope.get("method") == "HEAD")
        if self.key is not None and not _public(route):
            headers = Headers(scope=scope)
            problem = self._authenticate(headers)
            if problem is not None:
                log.info("client error 401 on %s: %s", clip(route, quote=False), problem)
                challenge = 'Bearer realm="modeconn"'  # RFC 6750: and why, if a key was sent
                if "authorization" in headers:
                    challenge += ', error="invalid_token"'
                response = _reply(401, problem, {"WWW-Authenticate": challenge})
                return await response(scope, receive, send)
        if scope.get("method") != "POST" or (
            route not in JSON_ROUTES and route not in UPLOAD_ROUTES
        ):
            return await self.app(scope, receive, send)
        problem, body = await self._check(scope, receive, route)
        if problem is not None:
            status, message = problem
            log.info("client error %d on %s: %s", status, route, message)
            return await _reply(status, message)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, when it comes

        await self.app(scope, replay, send)

    def _authenticate(self, headers: Headers) -> str | None:
        """None if the request carries the key, else what is wrong (it never echoes it)."""
        assert self.key is not None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if not scheme:
            return "this service needs an API key: send the header Authorization: Bearer <key>"
        if scheme.lower() != "bearer" or not token.strip():
            return "the Authorization header must be: Bearer <key>"
        # Constant time: how long the comparison takes says nothing about the key.
        if not hmac.compare_digest(token.strip().encode(), self.key):
            return "the API key is not valid"
        return None

    async def _check(
        self, scope: Scope, receive: Receive, route: str
    ) -> tuple[tuple[int, str] | None, bytes]:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if route in JSON_ROUTES and media not in ("", "application/json"):
            return (
                415,
                f"{route} takes a JSON body (Content-Type: application/json), got {clip(media)}",
            ), b""
        if route in UPLOAD_ROUTES and media != "multipart/form-data":
            return (
                415,
                f"{route} takes a multipart/form-data upload (curl -F image=@digit.png -F "
                f"path=...), got {clip(media or 'no content type')}",
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
        return None, b"".join(chunks)


def _public(route: str) -> bool:
    return route in PUBLIC_ROUTES or route.startswith(_PUBLIC_PREFIXES)


class _ErrorBodies:
    """``send``, with the body of every 4xx response rewritten to the ErrorResponse schema
    (bodies of other statuses pass untouched, as they come)."""

    def __init__(self, send: Send, *, head: bool):
        self.send = send
        self.head = head  # a HEAD answer has no body to rewrite
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if 400 <= message["status"] < 500 and not self.head:
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            return await self._send_rewritten()
        await self.send(message)

    async def _send_rewritten(self) -> None:
        start = self.start
        assert start is not None
        headers = [
            (name, value)
            for name, value in start.get("headers", [])
            if name.lower() not in (b"content-length", b"content-type")
        ]
        content_type = next(
            (
                v.decode("latin-1")
                for n, v in start.get("headers", [])
                if n.lower() == b"content-type"
            ),
            "",
        )
        data = error_body(start["status"], b"".join(self.chunks), content_type)
        body = json.dumps(data, separators=(",", ":")).encode()  # ASCII: any text is safe
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
