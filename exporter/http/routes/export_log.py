"""GET /exports: the export log, for admin keys."""

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from exporter.access.log_query import (
    PARAMETERS,
    ExportLogEntry,
    LogQuery,
    LogQueryTimeout,
    fetch_page,
)
from exporter.errors import PROBLEM_MEDIA_TYPE, Forbidden, ServiceUnavailable
from exporter.http.dependencies import DatabasesDep, KeyDep

router = APIRouter()

# The export log's query shares the state pool with key checks and export logging: a query
# that scans a long log must not hold one of its few connections for long.
QUERY_TIMEOUT_S = 10


async def _admin(key: KeyDep) -> None:
    if not key.admin:
        raise Forbidden("this key may not read the export log")


class ExportLogPage(BaseModel):
    items: list[ExportLogEntry] = Field(description="Newest first.")
    next: str | None = Field(
        description="The next page's URL (also in the Link header), or null on the last page."
    )


_problem: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}


@router.get(
    "/exports",
    tags=["audit"],
    response_model=ExportLogPage,
    dependencies=[Depends(_admin)],
    responses={
        200: {
            "headers": {
                "Link": {
                    "description": 'The next page: `<URL>; rel="next"`, absent on the last.',
                    "schema": {"type": "string"},
                }
            }
        },
        400: {"description": "Invalid, unknown or repeated query parameter", **_problem},
        401: {"description": "Missing or unknown key", **_problem},
        403: {"description": "Not an admin key", **_problem},
        503: {"description": "The query took too long, or the database is busy", **_problem},
    },
    # The parameters are parsed by LogQuery, which `exporter log` shares; declared here only
    # for the documentation.
    openapi_extra={
        "parameters": [
            {"name": p.name, "in": "query", "schema": p.schema, "description": p.description}
            for p in PARAMETERS
        ]
    },
)
async def list_exports(
    request: Request, response: Response, databases: DatabasesDep
) -> ExportLogPage:
    """The export log, newest first: one entry per export request, refused ones included.
    Pages by keyset: follow `next` (or the Link header) until it is null."""
    query = LogQuery.parse(request.query_params.multi_items())
    try:
        page = await fetch_page(databases.state, query, QUERY_TIMEOUT_S)
    except LogQueryTimeout as exc:
        raise ServiceUnavailable(f"{exc}; narrow it with filters or a smaller limit") from exc
    next_url = None
    if page.next_before is not None:
        next_url = str(request.url.include_query_params(before=page.next_before))
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return ExportLogPage(items=page.entries, next=next_url)
