"""POST /exports, GET /exports/{id}, GET /exports/{id}/download, DELETE /exports/{id}:
background export jobs (exporter/jobs/records.py, runner.py, files.py)."""

import logging
import re
import urllib.parse
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field

from exporter.access.datasets import readable_dataset
from exporter.access.keys import ApiKey
from exporter.db.failures import ENCODING_ERRORS
from exporter.db.pool import Databases
from exporter.errors import (
    PROBLEM_MEDIA_TYPE,
    Conflict,
    Gone,
    InvalidRequest,
    NotFound,
    TooManyRequests,
    problem,
)
from exporter.http.dependencies import DatabasesDep, KeyDep, SettingsDep
from exporter.http.downloads import StoredExport, download_response
from exporter.http.event_streams import EventStreamSlots, SlottedStreamingResponse
from exporter.http.exports import attachment_name, content_type
from exporter.http.middleware import REQUEST_ID_PATTERN
from exporter.incremental.pulls import check_tracked, pull_cursor
from exporter.jobs import records as job_records
from exporter.jobs.events import EventHub, event_stream
from exporter.jobs.records import Job
from exporter.pipeline.encoders import ENCODERS
from exporter.pipeline.query import parse_query
from exporter.settings import Settings
from exporter.storage.store import FileStore, StoreError

log = logging.getLogger(__name__)

router = APIRouter()
_problem: dict[str, Any] = {"content": {PROBLEM_MEDIA_TYPE: {}}}
# Far above any real export's; a body is parsed whole, so it is bounded.
MAX_PARAMETERS = 200
_WELL_FORMED_ID = re.compile(REQUEST_ID_PATTERN)


def _unicode_text(value: str) -> str:
    # JSON may escape a lone surrogate (\ud800): a str, but no text PostgreSQL, a log or a
    # UTF-8 response can hold.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("not Unicode text (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


class JobRequest(BaseModel):
    dataset: Text = Field(max_length=1_000)
    format: Literal["csv", "ndjson"]
    params: dict[Text, Text | list[Text]] = Field(
        default_factory=dict,
        description="The query parameters of a direct export (select, filters, order, limit, "
        "since, format options); a list gives a parameter several times.",
    )


class JobInfo(BaseModel):
    id: str
    status: str = Field(description="queued, running, done, failed, cancelled or expired")
    dataset: str
    format: str
    rows: int | None = Field(description="Rows written so far, or in all once done.")
    bytes: int | None = Field(description="Bytes of the export (uncompressed).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When a done job's file is deleted.")
    error: str | None
    cursor: str | None = Field(description="The export's X-Export-Cursor, for since= pulls.")
    status_url: str
    events_url: str
    download_url: str

    @classmethod
    def of(cls, job: Job) -> "JobInfo":
        url = f"/exports/{urllib.parse.quote(job.id)}"
        return cls(
            id=job.id,
            status=job.status,
            dataset=job.dataset,
            format=job.format,
            rows=job.rows,
            bytes=job.bytes,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            expires_at=job.expires_at,
            error=job.error,
            cursor=job.cursor,
            status_url=url,
            events_url=f"{url}/events",
            download_url=f"{url}/download",
        )


def _params(body: JobRequest) -> list[tuple[str, str]]:
    pairs = [
        (name, value)
        for name, values in body.params.items()
        for value in ([values] if isinstance(values, str) else values)
    ]
    if len(pairs) > MAX_PARAMETERS:
        raise InvalidRequest(f"at most {MAX_PARAMETERS} parameters", title="Invalid job")
    return pairs


def _store(request: Request) -> FileStore:
    # The job runner's: one store (and, for S3, one connection pool) per process.
    store: FileStore = request.app.state.job_runner.files.store
    return store


StoreDep = Annotated[FileStore, Depends(_store)]


@router.post(
    "/exports",
    tags=["jobs"],
    status_code=202,
    response_model=JobInfo,
    responses={
        400: {"description": "Invalid dataset parameters", **_problem},
        401: {"description": "Missing or unknown key", **_problem},
        404: {"description": "No such dataset (or not in the key's scope)", **_problem},
        413: {"description": "A body over 64 KiB", **_problem},
        429: {"description": "The key has its maximum of jobs queued or running", **_problem},
    },
)
async def submit_job(
    body: JobRequest, key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> JSONResponse:
    """Run an export in the background into a compressed file; poll `status_url`, then fetch
    `download_url` (resumable)."""
    dataset = await readable_dataset(body.dataset, key, settings, databases)
    params = _params(body)
    encoder = ENCODERS[body.format]
    # Everything a direct export would refuse is refused now, not when the job runs.
    query = parse_query(
        dataset, params, max_limit=settings.max_limit, max_in_items=settings.max_in_items
    )
    encoder(query.columns, query.options)
    pull_cursor(query, encoder.format, key.role, await databases.cursor_secret())
    if query.deletes and query.since is None:
        async with databases.catalog.connection() as connection:
            await check_tracked(connection, dataset)
    try:
        job = await job_records.submit(
            databases.state,
            uuid.uuid4().hex,
            key.id,
            key.name,
            dataset.name,
            body.format,
            params,
            settings.max_jobs_per_key,
        )
    except ENCODING_ERRORS as exc:
        # The job's parameters are kept as given, to run it exactly: a state database whose
        # encoding cannot hold one (an emoji in LATIN1) cannot keep the job.
        raise InvalidRequest(
            f"a value the service's state database cannot hold (its encoding): {exc}",
            title="Invalid request body",
        ) from exc
    if job is None:
        raise TooManyRequests(
            f"this key has {settings.max_jobs_per_key} jobs queued or running; try again when"
            " one has finished",
            headers={"Retry-After": "30"},
        )
    info = JobInfo.of(job)
    return JSONResponse(
        info.model_dump(mode="json"), status_code=202, headers={"Location": info.status_url}
    )


async def _admin_reaches(
    dataset: str | None, key: ApiKey, settings: Settings, databases: Databases
) -> bool:
    """Whether an admin key may see another key's export of `dataset`: only within its own
    scope and role, where it could have run the export itself."""
    if not key.admin or dataset is None:
        return False
    try:
        await readable_dataset(dataset, key, settings, databases)
    except NotFound:
        return False
    return True


async def _job(job_id: str, key: ApiKey, settings: Settings, databases: Databases) -> Job:
    # An id no export can have (a NUL, which PostgreSQL refuses in a text) is not asked for.
    job = None
    if _WELL_FORMED_ID.fullmatch(job_id):
        job = await job_records.get(databases.state, job_id)
    # Another key's job does not exist, as another key's dataset does not; to an admin key,
    # one of a dataset outside its scope or role does not either (the same 404).
    if job is None or (
        job.key_id != key.id and not await _admin_reaches(job.dataset, key, settings, databases)
    ):
        raise NotFound("no export job with this id")
    return job


@router.api_route(
    "/exports/{job_id}",
    methods=["GET", "HEAD"],
    tags=["jobs"],
    response_model=JobInfo,
    responses={404: {"description": "No such job (or another key's)", **_problem}},
)
async def job_status(
    job_id: str, key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> JobInfo:
    return JobInfo.of(await _job(job_id, key, settings, databases))


@router.delete(
    "/exports/{job_id}",
    tags=["jobs"],
    response_model=JobInfo,
    responses={404: {"description": "No such job (or another key's)", **_problem}},
)
async def cancel_job(
    job_id: str, key: KeyDep, settings: SettingsDep, databases: DatabasesDep, store: StoreDep
) -> JobInfo:
    """Cancel a queued or running job, or delete a finished job's file."""
    job = await _job(job_id, key, settings, databases)
    cancelled = await job_records.cancel(databases.state, job.id)
    assert cancelled is not None
    if cancelled.status == "expired" and cancelled.file_name:
        try:
            await store.delete(cancelled.file_name)
        except StoreError as exc:
            # Expired all the same: no job needs the file now, and the sweep deletes it.
            log.warning("could not delete %s from the store: %s", cancelled.file_name, exc)
    return JobInfo.of(cancelled)


@router.api_route(
    "/exports/{job_id}/download",
    methods=["GET", "HEAD"],
    tags=["jobs"],
    response_class=Response,
    responses={
        200: {"description": "The export file"},
        206: {"description": "A byte range of it"},
        304: {"description": "Not modified"},
        404: {"description": "No such job (or another key's)", **_problem},
        409: {"description": "The job has not finished, or failed", **_problem},
        410: {"description": "The file has expired or was deleted", **_problem},
        412: {"description": "A precondition failed"},
        416: {"description": "Range not satisfiable"},
    },
)
async def download(
    job_id: str,
    request: Request,
    key: KeyDep,
    settings: SettingsDep,
    databases: DatabasesDep,
    store: StoreDep,
) -> Response:
    """The job's file: ETag, Last-Modified, byte ranges (resume with `curl -C -`), gzip as
    stored when the client accepts it."""
    job = await _job(job_id, key, settings, databases)
    if job.status in ("queued", "running"):
        raise Conflict(f"the job is {job.status}", headers={"Retry-After": "5"})
    if job.status != "done" or job.file_name is None:
        if job.status == "failed":
            raise Conflict(f"the job failed: {job.error}")
        raise Gone(f"the job is {job.status}; submit it again")
    assert job.finished_at is not None and job.bytes is not None and job.file_bytes is not None
    encoder = ENCODERS[job.format]
    media_type = content_type(encoder)
    stored = StoredExport(
        store=store,
        name=job.file_name,
        identity_length=job.bytes,
        encoded_length=job.file_bytes,
        validator=job.file_name,
        last_modified=job.finished_at,
        filename=attachment_name(job.dataset, encoder.extension, job.finished_at),
        media_type=media_type,
        seek_points=job.seek_points,
    )
    return await download_response(request, stored)


async def _recorded_end(
    databases: Databases, export_id: str, key: ApiKey, any_key: bool
) -> tuple[str, dict[str, Any]] | None:
    """The end of an export as its job or its export log entry records it (any key's, or
    only the key's own); None while it runs (or is queued)."""
    async with databases.state.connection() as connection:
        job = await connection.fetchrow(
            "SELECT status, rows, bytes, error FROM exporter.jobs"
            " WHERE id = $1 AND ($2 OR key_id = $3)",
            export_id,
            any_key,
            key.id,
        )
        entry = None
        if job is None:
            entry = await connection.fetchrow(
                "SELECT outcome, status, rows, bytes, error FROM exporter.export_log"
                " WHERE request_id = $1 AND ($2 OR key_name = $3) ORDER BY id DESC LIMIT 1",
                export_id,
                any_key,
                key.name,
            )
    if job is not None:
        if job["status"] in ("queued", "running"):
            return None
        if job["status"] == "done":
            url = f"/exports/{urllib.parse.quote(export_id)}/download"
            return "done", {"rows": job["rows"], "bytes": job["bytes"], "download_url": url}
        detail = job["error"] or job["status"]
        # No status: the job's record keeps none (its live event said which).
        return "error", problem(None, f"Job {job['status']}", detail)
    if entry is None or entry["outcome"] == "running":
        return None
    if entry["outcome"] == "completed":
        return "done", {"rows": entry["rows"], "bytes": entry["bytes"]}
    return "error", problem(
        entry["status"], f"Export {entry['outcome']}", entry["error"] or entry["outcome"]
    )


async def _may_watch(
    export_id: str, key: ApiKey, settings: Settings, databases: Databases
) -> str | None:
    """ "own" if the key started an export with this id (a job, an export in the export log,
    one with events: request ids are the client's to choose, so another key's export may
    share it); "any" if the key is an admin key and the job or export of that id is of a
    dataset within its reach (then every key's events of it are shown); None otherwise."""
    async with databases.state.connection() as connection:
        found = await connection.fetchrow(
            "SELECT EXISTS (SELECT FROM exporter.jobs WHERE id = $1 AND key_id = $3)"
            " OR EXISTS (SELECT FROM exporter.export_log"
            "   WHERE request_id = $1 AND key_name = $2)"
            " OR EXISTS (SELECT FROM exporter.export_events"
            "   WHERE export_id = $1 AND key_name = $2) AS own,"
            " COALESCE((SELECT dataset FROM exporter.jobs WHERE id = $1),"
            "   (SELECT dataset FROM exporter.export_log WHERE request_id = $1"
            "     ORDER BY id DESC LIMIT 1)) AS dataset",
            export_id,
            key.name,
            key.id,
        )
    assert found is not None
    if await _admin_reaches(found["dataset"], key, settings, databases):
        return "any"
    return "own" if found["own"] else None


@router.get(
    "/exports/{export_id}/events",
    tags=["jobs"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `progress` (rows, bytes, elapsed_s, "
            "estimated_rows), then `done` (with a job's download_url) or `error` (a problem)",
            "content": {"text/event-stream": {}},
        },
        404: {"description": "No such export (or another key's)", **_problem},
        429: {
            "description": "The key, or the service, holds its maximum of open event streams",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            **_problem,
        },
    },
)
async def export_events(
    export_id: str, request: Request, key: KeyDep, settings: SettingsDep, databases: DatabasesDep
) -> StreamingResponse:
    """The progress of any export (its request id) or job (its id), live. Reconnecting with
    `Last-Event-ID` resumes after that event."""
    reach = None
    if _WELL_FORMED_ID.fullmatch(export_id):
        reach = await _may_watch(export_id, key, settings, databases)
    if reach is None:
        raise NotFound("no export with this id")
    any_key = reach == "any"
    last = request.headers.get("last-event-id", "").strip()
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    after = int(last) if re.fullmatch(r"[0-9]{1,18}", last) else 0
    hub: EventHub = request.app.state.event_hub

    async def ended() -> tuple[str, dict[str, Any]] | None:
        return await _recorded_end(databases, export_id, key, any_key)

    slots: EventStreamSlots = request.app.state.event_stream_slots
    slots.take(key.id)
    return SlottedStreamingResponse(
        event_stream(databases.state, hub, export_id, None if any_key else key.name, after, ended),
        slots=slots,
        key_id=key.id,
        revocations=request.app.state.revocations,
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            # nginx would otherwise hold events back in its buffer.
            "X-Accel-Buffering": "no",
        },
    )
