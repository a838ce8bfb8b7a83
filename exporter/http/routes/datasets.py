"""Routes: everything that can fail is checked first; then the rows stream."""

import logging
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from exporter.access import export_log
from exporter.access.datasets import readable_dataset
from exporter.access.revocations import Revocations
from exporter.db.pool import UNREACHABLE, Databases
from exporter.errors import (
    PROBLEM_MEDIA_TYPE,
    NotAcceptable,
    ServiceUnavailable,
)
from exporter.http.dependencies import (
    ActiveDep,
    CredentialsDep,
    DatabasesDep,
    KeyDep,
    SettingsDep,
    checked_key,
)
from exporter.http.exports import ActiveExports, export_request, start_export
from exporter.http.negotiation import negotiate
from exporter.http.openapi import export_parameters
from exporter.incremental.pulls import VERSIONED_KINDS
from exporter.incremental.tracking import tracked_relids
from exporter.pipeline.catalog import Dataset, load_datasets
from exporter.pipeline.encoders import ENCODERS, Encoder, encoder_for_media_type
from exporter.pipeline.query import FORMAT_OPTIONS
from exporter.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter()


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
    # How since= pulls of it work: "tracked" (exporter track), "snapshot", or None (a view).
    incremental: str | None = None

    @classmethod
    def of(cls, dataset: Dataset, tracked: frozenset[int] = frozenset()) -> "DatasetInfo":
        incremental = None
        if dataset.relkind in VERSIONED_KINDS:
            incremental = "tracked" if dataset.relid in tracked else "snapshot"
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
            incremental=incremental,
        )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "database unreachable"}})
async def readyz(databases: DatabasesDep) -> dict[str, str]:
    try:
        with anyio.fail_after(3):
            for pool in (databases.catalog, databases.state):
                async with pool.connection() as connection:
                    await connection.fetchval("SELECT 1")
    except (TimeoutError, *UNREACHABLE) as exc:
        raise ServiceUnavailable("database unreachable", headers={"Retry-After": "5"}) from exc
    return {"status": "ready"}


@router.get("/datasets", tags=["datasets"])
async def list_datasets(
    key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> list[DatasetInfo]:
    datasets = await load_datasets(databases.catalog, settings.exposed_schemas, role=key.role)
    tracked = await tracked_relids(databases.catalog)
    return [DatasetInfo.of(d, tracked) for d in datasets if key.may_read(d.name)]


_EXPORT_HEADERS = {
    "Content-Encoding": {
        "description": "`gzip` or `zstd` when the request's Accept-Encoding asks for it; "
        "each chunk is compressed as it is sent.",
        "schema": {"type": "string", "enum": ["gzip", "zstd"]},
    },
    "Content-Disposition": {"schema": {"type": "string"}},
    "X-Export-Cursor": {
        "description": "On every export of a table (not a view, not with `limit`): the token "
        "to pass as `since=` for what changes after this export's snapshot.",
        "schema": {"type": "string"},
    },
    "X-Export-Cursor-Mode": {
        "description": "On a `since=` pull: `snapshot` or `tracked`.",
        "schema": {"type": "string", "enum": ["snapshot", "tracked"]},
    },
    "X-Export-Possibly-Repeated": {
        "description": "On a `since=` pull: how many of its rows the previous pull may "
        "already have delivered (0 in tracked mode).",
        "schema": {"type": "integer"},
    },
}


def _export_responses(media_type: str) -> dict[int | str, dict[str, Any]]:
    problem: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}
    return {
        200: {
            "description": "The export, streamed as an attachment.",
            "content": {media_type: {"schema": {"type": "string"}}},
            "headers": _EXPORT_HEADERS,
        },
        400: {"description": "Invalid query parameter", **problem},
        401: {"description": "Missing, unknown, revoked or expired key", **problem},
        403: {"description": "The key's PostgreSQL role may not read the dataset", **problem},
        404: {"description": "No such dataset (or not in the key's scope)", **problem},
        410: {
            "description": "The `since=` cursor can no longer be honoured: run a full export",
            **problem,
        },
        429: {
            "description": "The key, or the service, runs its maximum of concurrent exports",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            **problem,
        },
        503: {"description": "Database unavailable or busy", **problem},
    }


async def _export(
    name: str,
    encoder: type[Encoder],
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    settings: Settings,
    databases: Databases,
    active: ActiveExports,
) -> Response:
    """Every export request of a valid key is in the export log, refused ones (404, 400,
    429, ...) included. Without a valid key it is not (a 401 is counted for the server log):
    anyone could write rows otherwise."""
    key = await checked_key(request, databases, credentials)
    logged = export_request(request, name, encoder)
    logged.key_name = key.name
    revocations: Revocations = request.app.state.revocations
    # Subscribed first, so that a revoke while the export is being prepared is not missed.
    revoked = revocations.subscribe(key.id)
    try:
        async with export_log.refusals_logged(databases.state, logged):
            dataset = await readable_dataset(name, key, settings, databases)
            return await start_export(
                request,
                logged,
                key,
                dataset,
                encoder,
                settings,
                databases,
                active,
                revocations,
                revoked,
            )
    except BaseException:
        revocations.unsubscribe(key.id, revoked)
        raise


def _export_endpoint(
    encoder: type[Encoder],
) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def export(
        name: str,
        request: Request,
        credentials: CredentialsDep,
        settings: SettingsDep,
        databases: DatabasesDep,
        active: ActiveDep,
    ) -> Response:
        return await _export(name, encoder, request, credentials, settings, databases, active)

    export.__name__ = f"export_{encoder.format}"
    export.__doc__ = (
        f"Stream the dataset as {encoder.media_type}. Query: `select=a,b`, filters "
        "`col=op.value` (eq, neq, gt, gte, lt, lte, like, ilike, in.(a,b), is.null|true|false, "
        "`not.` prefix), `order=col.asc,col2.desc`, `limit=N`; incremental pulls: "
        "`since=<X-Export-Cursor of an earlier export>`, `deletes=true` (tracked tables, "
        "NDJSON)."
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
        openapi_extra={"parameters": export_parameters(_encoder.option_names)},
    )
_DESCRIBE_OFFERS = ["application/json"] + [e.media_type for e in ENCODERS.values()]


@router.get(
    "/datasets/{name}",
    tags=["datasets"],
    response_model=DatasetInfo,
    responses={
        # Everything an export answers, since it may be one.
        **_export_responses("text/csv"),
        200: {
            "description": "The dataset's description, or with `Accept: text/csv` or "
            "`application/x-ndjson`, its export.",
            "content": {e.media_type: {"schema": {"type": "string"}} for e in ENCODERS.values()},
            "headers": _EXPORT_HEADERS,
        },
        406: {"description": "Unsupported Accept", "content": {PROBLEM_MEDIA_TYPE: {}}},
    },
    openapi_extra={"parameters": export_parameters(FORMAT_OPTIONS)},
)
async def describe_dataset(
    name: str,
    request: Request,
    response: Response,
    credentials: CredentialsDep,
    settings: SettingsDep,
    databases: DatabasesDep,
    active: ActiveDep,
) -> Any:
    chosen = negotiate(request.headers.get("accept"), _DESCRIBE_OFFERS)
    encoder = None if chosen is None else encoder_for_media_type(chosen)
    if encoder is not None:
        # An export: _export checks the key, then logs the request.
        export = await _export(name, encoder, request, credentials, settings, databases, active)
        export.headers.add_vary_header("Accept")
        return export
    # The key first: nothing, not even what is offered, is told to a client without one.
    key = await checked_key(request, databases, credentials)
    if chosen is None:
        raise NotAcceptable("offered: " + ", ".join(_DESCRIBE_OFFERS))
    dataset = await readable_dataset(name, key, settings, databases)
    response.headers["Vary"] = "Accept"
    return DatasetInfo.of(dataset, await tracked_relids(databases.catalog))
