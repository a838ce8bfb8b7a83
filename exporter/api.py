"""Routes: everything that can fail is checked first; then the rows stream."""

import logging
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import asyncpg
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import Receive, Scope, Send

from exporter import audit
from exporter.auth import ApiKey, authenticate
from exporter.catalog import Dataset, find_dataset, load_datasets
from exporter.db import Databases
from exporter.encoders import ENCODERS, Encoder, encoder_for_media_type
from exporter.negotiation import negotiate
from exporter.problems import PROBLEM_MEDIA_TYPE, Problem
from exporter.query import ExportQuery, parse_query
from exporter.settings import Settings
from exporter.stream import ExportStream

log = logging.getLogger(__name__)
router = APIRouter()


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _databases(request: Request) -> Databases:
    databases: Databases = request.app.state.databases
    return databases


SettingsDep = Annotated[Settings, Depends(_settings)]
DatabasesDep = Annotated[Databases, Depends(_databases)]
_bearer = HTTPBearer(auto_error=False, description="An API key from `exporter keys create`.")


async def _api_key(
    databases: DatabasesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if credentials is None:
        raise Problem(
            401,
            "Unauthorized",
            "send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = await authenticate(databases.state, credentials.credentials)
    if key is None:
        raise Problem(
            401,
            "Unauthorized",
            "unknown or revoked key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return key


KeyDep = Annotated[ApiKey, Depends(_api_key)]


class ColumnInfo(BaseModel):
    name: str
    type: str


class DatasetInfo(BaseModel):
    name: str
    kind: str
    columns: list[ColumnInfo]
    primary_key: list[str]
    estimated_rows: int | None
    formats: dict[str, str]

    @classmethod
    def of(cls, dataset: Dataset) -> "DatasetInfo":
        return cls(
            name=dataset.name,
            kind=dataset.kind,
            columns=[ColumnInfo(name=c.name, type=c.type) for c in dataset.columns],
            primary_key=list(dataset.primary_key),
            estimated_rows=dataset.estimated_rows,
            formats={
                e.format: f"/datasets/{urllib.parse.quote(dataset.name)}.{e.extension}"
                for e in ENCODERS.values()
            },
        )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "database unreachable"}})
async def readyz(databases: DatabasesDep) -> dict[str, str]:
    try:
        with anyio.fail_after(3):
            for engine in {databases.exports, databases.state}:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
    except (TimeoutError, OSError, DBAPIError) as exc:
        raise Problem(503, "Service Unavailable", "database unreachable") from exc
    return {"status": "ready"}


@router.get("/datasets", tags=["datasets"])
async def list_datasets(
    _key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> list[DatasetInfo]:
    datasets = await load_datasets(databases.exports, settings.exposed_schemas)
    return [DatasetInfo.of(d) for d in datasets]


async def _dataset(name: str, settings: Settings, databases: Databases) -> Dataset:
    dataset = await find_dataset(databases.exports, settings.exposed_schemas, name)
    if dataset is None:
        raise Problem(404, "Not Found", f"no dataset named {name!r}")
    return dataset


def _export_responses(media_type: str) -> dict[int | str, dict[str, Any]]:
    problem: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}
    return {
        200: {
            "description": "The export, streamed as an attachment.",
            "content": {media_type: {"schema": {"type": "string"}}},
        },
        400: {"description": "Invalid query parameter", **problem},
        401: {"description": "Missing or unknown key", **problem},
        404: {"description": "No such dataset", **problem},
    }


def _export_endpoint(
    encoder: type[Encoder],
) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def export(
        name: str, request: Request, key: KeyDep, settings: SettingsDep, databases: DatabasesDep
    ) -> Response:
        dataset = await _dataset(name, settings, databases)
        return await _start_export(request, key, dataset, encoder, settings, databases)

    export.__name__ = f"export_{encoder.format}"
    export.__doc__ = (
        f"Stream the dataset as {encoder.media_type}. Query: `select=a,b`, filters "
        "`col=op.value` (eq, neq, gt, gte, lt, lte, like, ilike, in.(a,b), is.null|true|false, "
        "`not.` prefix), `order=col.asc,col2.desc`, `limit=N`."
    )
    return export


# One route per format, registered before /datasets/{name}, which would also match "x.csv".
for _encoder in ENCODERS.values():
    router.add_api_route(
        f"/datasets/{{name}}.{_encoder.extension}",
        _export_endpoint(_encoder),
        methods=["GET"],
        tags=["exports"],
        response_class=Response,
        responses=_export_responses(_encoder.media_type),
    )
_DESCRIBE_OFFERS = ["application/json"] + [e.media_type for e in ENCODERS.values()]


@router.get(
    "/datasets/{name}",
    tags=["datasets"],
    response_model=DatasetInfo,
    responses={
        200: {
            "description": "The dataset's description, or with `Accept: text/csv` or "
            "`application/x-ndjson`, its export.",
            "content": {e.media_type: {"schema": {"type": "string"}} for e in ENCODERS.values()},
        },
        406: {"description": "Unsupported Accept", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
)
async def describe_dataset(
    name: str, request: Request, key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> Any:
    chosen = negotiate(request.headers.get("accept"), _DESCRIBE_OFFERS)
    if chosen is None:
        raise Problem(406, "Not Acceptable", "offered: " + ", ".join(_DESCRIBE_OFFERS))
    dataset = await _dataset(name, settings, databases)
    encoder = encoder_for_media_type(chosen)
    if encoder is None:
        return DatasetInfo.of(dataset)
    return await _start_export(request, key, dataset, encoder, settings, databases)


def _attachment(dataset: str, extension: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    filename = f"{dataset}-{stamp}.{extension}"
    ascii_name = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in filename
    )
    return (
        f'attachment; filename="{ascii_name}"; '
        f"filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"
    )


def _parameters(params: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name, []).append(value)
    return grouped


def _open_error(exc: BaseException, query: ExportQuery) -> Problem | None:
    """A problem for a PostgreSQL refusal that happened before the first byte, if it is the
    request's fault (or the database's state), else None."""
    # The transaction is read-only and identifiers come from the catalog, so a data error or a
    # failed domain check can only come from casting a filter value to its column's type.
    if isinstance(
        exc,
        asyncpg.exceptions.DataError | asyncpg.exceptions.IntegrityConstraintViolationError,
    ):
        names = dict.fromkeys(f.parameter for f in query.filters)
        return Problem(
            400,
            "Invalid query parameter",
            f"PostgreSQL rejected a filter value: {exc}",
            invalid_params=[{"name": name, "reason": str(exc)} for name in names],
        )
    # No operator or ordering for a column's type (say, `eq` on a json column).
    if isinstance(exc, asyncpg.exceptions.UndefinedFunctionError):
        names = dict.fromkeys([f.parameter for f in query.filters] + ["order"])
        return Problem(
            400,
            "Invalid query parameter",
            f"PostgreSQL rejected the query: {exc}",
            invalid_params=[{"name": name, "reason": str(exc)} for name in names],
        )
    if isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
        return Problem(403, "Forbidden", str(exc))
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return Problem(
            503,
            "Service Unavailable",
            "the query timed out before its first rows",
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, PoolTimeout | OSError | asyncpg.exceptions.PostgresConnectionError):
        return Problem(
            503,
            "Service Unavailable",
            "the database is not reachable",
            headers={"Retry-After": "5"},
        )
    return None


async def _start_export(
    request: Request,
    key: ApiKey,
    dataset: Dataset,
    encoder: type[Encoder],
    settings: Settings,
    databases: Databases,
) -> Response:
    params = request.query_params.multi_items()
    query = parse_query(dataset, params, max_limit=settings.max_limit)
    request_id = str(request.scope.get("state", {}).get("request_id", "-"))
    stream = ExportStream(
        query, encoder, databases.exports, settings, label=f"exporter {request_id}"
    )
    export_id = await audit.record_start(
        databases.state,
        request_id=request_id,
        key_name=key.name,
        dataset=dataset.name,
        format=encoder.format,
        parameters=_parameters(params),
        client_addr=request.client.host if request.client else None,
    )
    try:
        await stream.open()
    except Exception as exc:
        problem = _open_error(exc, query)
        await audit.record_end(
            databases.state,
            export_id,
            outcome="failed",
            rows=0,
            bytes_sent=0,
            error=str(exc)[:1000],
        )
        if problem is None:
            raise
        raise problem from exc

    async def finish(ended: ExportStream) -> None:
        outcome = ended.outcome.value
        error = None if ended.error is None else repr(ended.error)[:1000]
        await audit.record_end(
            databases.state,
            export_id,
            outcome=outcome,
            rows=ended.rows,
            bytes_sent=ended.bytes,
            error=error if outcome == "failed" else None,
        )
        log.info(
            "export %s of %s: %s, %d rows, %d bytes, %.2f s",
            encoder.format,
            dataset.name,
            outcome,
            ended.rows,
            ended.bytes,
            ended.elapsed_s,
        )

    headers = {
        "Content-Disposition": _attachment(dataset.name, encoder.extension),
        "Cache-Control": "no-store",
    }
    media_type = encoder.media_type + (
        "; charset=utf-8" if encoder.media_type.startswith("text/") else ""
    )
    return ExportResponse(stream, finish, headers=headers, media_type=media_type)


class ExportResponse(StreamingResponse):
    """A StreamingResponse that releases its export the moment the response ends.

    When the client leaves, Starlette cancels the task that sends the body while the body's
    generator is paused at `yield`; left alone, that generator (and its cursor, transaction
    and pooled connection) would wait for the garbage collector. So it is closed here,
    explicitly, under a shield. A failure raised by the body propagates to uvicorn, which then
    drops the connection without the terminating chunk: the client sees an incomplete file.
    """

    def __init__(
        self,
        stream: ExportStream,
        on_end: Callable[[ExportStream], Coroutine[Any, Any, None]],
        *,
        headers: dict[str, str],
        media_type: str,
    ) -> None:
        super().__init__(stream.chunks(), headers=headers, media_type=media_type)
        self.stream = stream
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.stream.aclose()
                log.debug("export released after %.3f s", time.monotonic() - started)
                await self.on_end(self.stream)
