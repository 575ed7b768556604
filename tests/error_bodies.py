"""Every 4xx body the service tests receive is checked against the error schema the service
documents (``components.schemas.ErrorResponse`` of its ``/docs.json``): an httpx response
hook, installed on each client the tests use."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["ErrorBodies"]


class ErrorBodies:
    """A response hook that validates each 4xx body (JSON Schema of the served document) and
    counts them; ``install`` puts it on an httpx client."""

    def __init__(self, spec: dict[str, Any]):
        schema = {
            "$ref": "#/components/schemas/ErrorResponse",
            "components": spec["components"],
        }
        assert "ErrorResponse" in spec["components"]["schemas"], "no error schema documented"
        try:
            import jsonschema_rs  # with schemathesis (the dev extra)
        except ImportError:  # the model the schema is made from, as strict
            self.validator = None
        else:
            self.validator = jsonschema_rs.validator_for(schema)
        self.checked = 0
        self.statuses: set[int] = set()

    def check(self, status: int, body: bytes, where: str = "") -> dict:
        assert body, f"{where}: a {status} without a body"
        data = json.loads(body)
        if self.validator is not None:
            errors = [e.message for e in self.validator.iter_errors(data)]
        else:
            from pydantic import ValidationError

            from service.errors import ErrorResponse

            try:
                ErrorResponse.model_validate(data, strict=True)
                errors = []
            except ValidationError as err:
                errors = [str(err)]
        assert not errors, f"{where}: {status} body {body[:300]!r} does not match: {errors}"
        self.checked += 1
        self.statuses.add(status)
        return data

    def hook(self) -> Callable:
        def on_response(response) -> None:
            if 400 <= response.status_code < 500 and response.request.method != "HEAD":
                response.read()
                self.check(response.status_code, response.content, str(response.request.url))

        return on_response

    def install(self, client) -> None:
        hooks = dict(client.event_hooks)
        hooks["response"] = [*hooks.get("response", []), self.hook()]
        client.event_hooks = hooks
