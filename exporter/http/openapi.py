"""The OpenAPI document as the service really answers: every refusal a route can give, as
`application/problem+json` with its schema, and the query parameters of an export.

FastAPI documents a 422 for every route with parameters, which the service never sends (its
validation errors are 400 problems, exporter.http.problems), and knows nothing of what the
dependencies and middleware refuse (a missing key, a database that is away, an oversized
request). Routes declare what is theirs; what every route shares is added here, once, so that
a schema-driven fuzzer (tests/test_fuzz.py) can hold each answer to the document.
"""

import warnings
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from exporter.errors import PROBLEM_MEDIA_TYPE
from exporter.pipeline.query import FORMAT_OPTIONS

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An RFC 9457 problem document.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "invalid-params": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "reason"],
                "properties": {"name": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
    },
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}}}

# What any route may answer, whatever it does (the middleware's and the dependencies'
# refusals): headers that are too many or too large, two Authorization fields, an invalid
# parameter or X-Request-Id.
_EVERY_ROUTE: dict[str, str] = {
    "400": "Invalid request (a parameter, the X-Request-Id header, two Authorization fields)",
    "431": "Request headers over the limit",
}
# And a route that takes a body (middleware.HeaderLimitsMiddleware).
_WITH_A_BODY: dict[str, str] = {
    "411": "A body without one Content-Length",
    "413": "A request body over the limit",
}
_WITH_A_KEY: dict[str, str] = {
    "401": "Missing, unknown, revoked or expired key",
    "503": "A database is unavailable or busy: try again after Retry-After",
}

_FLAG = {"type": "string", "enum": ["true", "false"]}
# The format options, each taken by the formats that name it (Encoder.option_names).
_OPTION_SCHEMAS: dict[str, dict[str, Any]] = {
    "header": _FLAG,
    "bom": _FLAG,
    "crlf": _FLAG,
    "delimiter": {"type": "string", "enum": [",", ";", "|", "\t", "\\t", "tab"]},
    "null": {"type": "string", "maxLength": 100},
    "quote": {"type": "string", "enum": ["minimal", "all"]},
    "profile": {"type": "string", "enum": ["excel"]},
    "numbers": {"type": "string", "enum": ["number", "string"]},
}
assert _OPTION_SCHEMAS.keys() == FORMAT_OPTIONS, "every format option is documented"

# The export routes' own query parameters; any other parameter is a filter on a column.
_QUERY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "select",
        "description": "Columns, in order: `a,b` (a name with a comma in double quotes).",
        "schema": {"type": "string"},
    },
    {
        "name": "order",
        "description": "Sort order: `a.desc,b.nullsfirst`. Default: the primary key.",
        "schema": {"type": "string"},
    },
    {
        "name": "limit",
        "description": "At most this many rows.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    },
    {
        "name": "since",
        "description": "An `X-Export-Cursor` of an earlier export: only what changed since.",
        "schema": {"type": "string"},
    },
    {
        "name": "deletes",
        "description": "`true`: tombstones for deleted rows (tracked tables, NDJSON).",
        "schema": _FLAG,
    },
]
_FILTERS: dict[str, Any] = {
    "name": "filters",
    "description": "Filters, one parameter per column: `column=op.value` (eq, neq, gt, gte, "
    "lt, lte, like, ilike, in.(a,b), is.null, `not.` before any of them).",
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    "style": "form",
    "explode": True,
}


def export_parameters(option_names: Iterable[str]) -> list[dict[str, Any]]:
    """An export route's query parameters, with the format options it takes."""
    options = [
        {
            "name": name,
            "description": "A format option (see the documentation's Formats page).",
            "schema": _OPTION_SCHEMAS[name],
        }
        for name in sorted(option_names)
    ]
    return [{"in": "query", **p} for p in (*_QUERY_PARAMETERS, *options, _FILTERS)]


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                # A GET-and-HEAD route gets one operationId for both: completed() tells
                # them apart.
                warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
                document = get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            app.openapi_schema = completed(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def completed(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = _PROBLEM_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if method == "head":
                operation["operationId"] += "_head"
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            shared = dict(_EVERY_ROUTE)
            if path not in ("/healthz", "/readyz"):
                shared.update(_WITH_A_KEY)
            if "requestBody" in operation:
                shared.update(_WITH_A_BODY)
            for status, description in shared.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if int(status) >= 400:
                    _as_problem(status, response)
    return document


def _as_problem(status: str, response: dict[str, Any]) -> None:
    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}
    if status in ("429", "503"):
        response.setdefault("headers", {}).update(_RETRY_AFTER)
