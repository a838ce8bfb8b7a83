"""Errors as RFC 9457 problem details (`application/problem+json`): the one place an
ExporterError becomes an HTTP response."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from exporter.db.failures import database_failure
from exporter.db.pool import UNREACHABLE
from exporter.errors import PROBLEM_MEDIA_TYPE, ExporterError, InvalidRequest

log = logging.getLogger(__name__)


def problem_body(error: ExporterError, scope: Scope, instance: str) -> dict[str, object]:
    return error.problem(instance=instance, request_id=scope.get("state", {}).get("request_id"))


def problem_response(error: ExporterError, request: Request) -> JSONResponse:
    return JSONResponse(
        # The path as Starlette's URL writes it (`?`, `#` and `\` encoded).
        problem_body(error, request.scope, request.url.path),
        status_code=error.status,
        headers=error.headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


async def send_problem(send: Send, scope: Scope, error: ExporterError) -> None:
    """A problem+json response, from middleware (outside FastAPI's exception handlers)."""
    body = json.dumps(problem_body(error, scope, scope.get("path", ""))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RoutingError(ExporterError):
    """Starlette's own refusals (no such route, a method the route lacks), with its status."""

    def __init__(self, exc: StarletteHTTPException) -> None:
        super().__init__(
            exc.detail if isinstance(exc.detail, str) else None,
            title={404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error"),
            headers=exc.headers,
        )
        self.status = exc.status_code


def install(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ExporterError)
        return problem_response(exc, request)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(RoutingError(exc), request)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        params = [
            {
                "name": ".".join(str(p) for p in error.get("loc", ())[1:]) or "request",
                "reason": str(error.get("msg", "invalid")),
            }
            for error in exc.errors()
        ]
        error = InvalidRequest(params[0]["reason"] if params else None, invalid_params=params)
        return problem_response(error, request)

    async def on_database_unreachable(request: Request, exc: Exception) -> JSONResponse:
        # Catalog lookups and key checks, before any export: the database is down or refuses
        # connections.
        log.warning("database unavailable for %s: %r", request.url.path, exc)
        error = database_failure(exc)
        assert error is not None
        return problem_response(error, request)

    app.add_exception_handler(ExporterError, on_error)
    for unreachable in UNREACHABLE:
        app.add_exception_handler(unreachable, on_database_unreachable)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
