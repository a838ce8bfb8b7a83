"""Errors as RFC 9457 problem details (`application/problem+json`)."""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exporter.db.pool import UNREACHABLE, PoolTimeout, RoleUnavailable
from exporter.pipeline.query import QueryError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        invalid_params: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_params = list(invalid_params)
        self.headers = dict(headers or {})

    @classmethod
    def from_query_error(cls, error: QueryError) -> "Problem":
        return cls(
            400,
            "Invalid query parameter",
            f"{error.parameter}: {error.detail}",
            invalid_params=[{"name": error.parameter, "reason": error.detail}],
        )


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": problem.title, "status": problem.status}
    if problem.detail:
        body["detail"] = problem.detail
    body["instance"] = request.url.path
    if problem.invalid_params:
        body["invalid-params"] = problem.invalid_params
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(
        body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_MEDIA_TYPE
    )


def install(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request)

    async def on_query_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueryError)
        return problem_response(Problem.from_query_error(exc), request)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        problem = Problem(exc.status_code, title, detail, headers=exc.headers)
        return problem_response(problem, request)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        params = [
            {
                "name": ".".join(str(p) for p in error.get("loc", ())[1:]) or "request",
                "reason": str(error.get("msg", "invalid")),
            }
            for error in exc.errors()
        ]
        return problem_response(
            Problem(
                400,
                "Invalid request",
                params[0]["reason"] if params else None,
                invalid_params=params,
            ),
            request,
        )

    async def on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Catalog lookups and key checks, before any export: the database is down, refuses
        # connections, or every connection of a side pool is busy.
        log.warning("database unavailable for %s: %r", request.url.path, exc)
        detail = (
            "the service is busy; try again shortly"
            if isinstance(exc, PoolTimeout)
            else "the database is not reachable"
        )
        problem = Problem(503, "Service Unavailable", detail, headers={"Retry-After": "5"})
        return problem_response(problem, request)

    async def on_role_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The client learns that its key's role cannot be used, not the server's roles.
        return problem_response(Problem(403, "Forbidden", str(exc)), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RoleUnavailable, on_role_unavailable)
    for unavailable in (PoolTimeout, *UNREACHABLE):
        app.add_exception_handler(unavailable, on_database_unavailable)
    app.add_exception_handler(QueryError, on_query_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
