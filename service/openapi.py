"""The API docs: the OpenAPI document BentoML writes, completed, and a Swagger UI at ``/docs``.

BentoML documents its own (POST) APIs only, each 4xx with a schema this service does not send.
:func:`openapi_document` adds what it leaves out:

* the GET routes (``GET /paths``, ``GET /export``), their query parameters taken from the
  request models of their POST twins;
* one error schema, :class:`service.errors.ErrorResponse`, for every 4xx of every route (the
  gate makes every 4xx body match it), with the statuses each route can answer;
* the bearer scheme, when ``MODECONN_API_KEY`` is set (Swagger UI's "Authorize" button).

``/docs`` serves the Swagger UI BentoML ships (``/static_content``), pointed at this document,
without the analytics tag of BentoML's own page at ``/``: nothing is fetched from elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from .errors import ErrorResponse
from .gate import PUBLIC_ROUTES

__all__ = ["DOCS_PAGE", "openapi_document"]

_REF = "#/components/schemas/{model}"
_ERROR_REF = {"$ref": _REF.format(model="ErrorResponse")}
_STATUS_TEXT = {
    400: "Bad input: what was wrong and what was expected",
    401: "No valid API key (only when MODECONN_API_KEY is set)",
    404: "Unknown path (the served paths are listed in `expected`)",
    413: "Body above MODECONN_MAX_BODY_MB",
    415: "Wrong content type",
}
# What each operation of the service can answer with a 4xx (401 added when a key is set).
_POST_ERRORS = (400, 404, 413, 415)
_GET_ERRORS = {"/paths": (404,), "/export": (400, 404)}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>modeconn: API docs</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""


def _error_responses(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {
        str(status): {
            "description": _STATUS_TEXT[status],
            "content": {"application/json": {"schema": dict(_ERROR_REF)}},
        }
        for status in statuses
    }


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A request model's fields as OpenAPI query parameters."""
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", []))
    parameters = []
    for name, field in schema["properties"].items():
        field = {k: v for k, v in field.items() if k not in ("title", "examples")}
        if "anyOf" in field:  # `int | None`: the query parameter is simply left out
            kinds = [s for s in field.pop("anyOf") if s.get("type") != "null"]
            field.update(kinds[0] if len(kinds) == 1 else {"anyOf": kinds})
        if field.get("default", "") is None:
            del field["default"]
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "description": field.pop("description", ""),
                "schema": field,
            }
        )
    return parameters


def openapi_document(
    spec: dict[str, Any], get_models: dict[str, type[BaseModel]], *, key_required: bool
) -> dict[str, Any]:
    """BentoML's OpenAPI document ``spec`` (``Service.openapi_spec.asdict()``), completed: GET
    routes (``get_models``: route -> the request model whose fields are its query
    parameters), one error schema for every 4xx, the bearer scheme if ``key_required``."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    # As sent: every field is there (serialization mode marks defaults required).
    error_schema = ErrorResponse.model_json_schema(ref_template=_REF, mode="serialization")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    for unused in ("InvalidArgument", "NotFound"):  # BentoML's 4xx schemas, never sent
        schemas.pop(unused, None)
    paths = spec["paths"]
    for item in paths.values():  # status codes as JSON has them: strings
        for method in _METHODS:
            if method in item:
                responses = item[method].get("responses", {})
                item[method]["responses"] = {str(k): v for k, v in responses.items()}
    for route, model in get_models.items():
        post = paths[route]["post"]
        paths[route]["get"] = {
            "tags": post.get("tags", []),
            "description": post.get("description", "") + " (the same, as a GET with a query)",
            "operationId": post.get("operationId", route.strip("/")) + "__get",
            "parameters": _query_parameters(model),
            "responses": {"200": copy.deepcopy(post["responses"]["200"])},
        }
    for route, item in paths.items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for status in [s for s in responses if 400 <= int(s) < 500]:
                del responses[status]
            statuses = _POST_ERRORS if method == "post" else _GET_ERRORS.get(route, ())
            if key_required and route not in PUBLIC_ROUTES:
                statuses = (*statuses, 401)
                operation["security"] = [{"bearer": []}]
            responses.update(_error_responses(tuple(sorted(statuses))))
    if key_required:
        spec["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "MODECONN_API_KEY: Authorization: Bearer <key>",
            }
        }
    return spec
