"""The export log: one row per export request, refused ones included.

An export that starts is written when it starts (outcome 'running') and completed when it ends;
a request refused before that (401, 403, 404, 429, 400, ...) is written once, as refused. What
the client sent is hostile: every text is bounded and cleaned of what PostgreSQL's text and
jsonb cannot hold (NUL), so that writing the log never fails the request.
"""

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio

from exporter.db.failures import ENCODING_ERRORS, database_failure
from exporter.db.pool import UNREACHABLE, Pool, PoolTimeout

log = logging.getLogger(__name__)

MAX_TEXT = 1_000
MAX_LOGGED_PARAMETERS = 200
TRUNCATED = "_truncated"


def clean(text: str, limit: int = MAX_TEXT) -> str:
    # NUL cannot be stored in text or jsonb; lone surrogates cannot be encoded.
    text = text[:limit].replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def _escaped(text: str) -> str:
    """For a state database whose encoding cannot hold a character (an emoji in LATIN1): the
    cleaned text with every non-ASCII character backslash-escaped."""
    return clean(text).encode("ascii", "backslashreplace").decode("ascii")


def bounded_parameters(params: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The query parameters as the log keeps them: grouped by name, bounded in number and
    length; `_truncated` says that some were cut."""
    grouped: dict[str, list[str]] = {}
    truncated = len(params) > MAX_LOGGED_PARAMETERS
    for name, value in params[:MAX_LOGGED_PARAMETERS]:
        if len(name) > MAX_TEXT or len(value) > MAX_TEXT:
            truncated = True
        grouped.setdefault(clean(name), []).append(clean(value))
    if truncated:
        grouped[TRUNCATED] = ["true"]
    return grouped


@dataclass
class ExportRequest:
    """What the log knows of an export request before it is answered."""

    request_id: str
    dataset: str
    format: str
    parameters: dict[str, list[str]]
    client_addr: str | None
    key_name: str | None = None
    # The export log row, once written.
    entry_id: int | None = field(default=None, init=False)
    ended: bool = field(default=False, init=False)


_INSERT = (
    "INSERT INTO exporter.export_log"
    " (request_id, key_name, dataset, format, parameters, client_addr, outcome, status, error,"
    "  ended_at)"
    " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9,"
    "  CASE WHEN $7 = 'running' THEN NULL ELSE clock_timestamp() END)"
    " RETURNING id"
)


async def _insert(
    pool: Pool, request: ExportRequest, outcome: str, status: int | None, error: str | None
) -> int:
    try:
        return await _insert_as(pool, request, outcome, status, error, clean)
    except ENCODING_ERRORS:
        return await _insert_as(pool, request, outcome, status, error, _escaped)


async def _insert_as(
    pool: Pool,
    request: ExportRequest,
    outcome: str,
    status: int | None,
    error: str | None,
    text: Callable[[str], str],
) -> int:
    parameters = {
        text(name): [text(value) for value in values] for name, values in request.parameters.items()
    }
    async with pool.connection() as connection:
        entry_id = await connection.fetchval(
            _INSERT,
            request.request_id,
            None if request.key_name is None else text(request.key_name),
            text(request.dataset),
            request.format,
            json.dumps(parameters),
            request.client_addr,
            outcome,
            status,
            None if error is None else text(error),
        )
    return int(entry_id)


async def record_start(pool: Pool, request: ExportRequest) -> None:
    request.entry_id = await _insert(pool, request, "running", None, None)


async def record_refusal(pool: Pool, request: ExportRequest, status: int, reason: str) -> None:
    """Log a request answered with an error before its export started. Never raises: the
    client gets its answer whether or not the log could be written."""
    if request.ended:
        return
    request.ended = True
    outcome = "refused" if status < 500 else "failed"
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            if request.entry_id is None:
                await _insert(pool, request, outcome, status, reason)
            else:
                await _update(pool, request.entry_id, outcome, status, 0, 0, reason, None)
        except Exception:
            log.exception("could not log refused export request")


async def record_end(
    pool: Pool,
    request: ExportRequest,
    *,
    outcome: str,
    status: int,
    rows: int,
    bytes_sent: int,
    error: str | None = None,
    aborted_by: str | None = None,
) -> None:
    # Runs while the request is being torn down (the client may have left): shielded, bounded.
    if request.ended or request.entry_id is None:
        return
    request.ended = True
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await _update(
                pool, request.entry_id, outcome, status, rows, bytes_sent, error, aborted_by
            )
        except Exception:
            log.exception("could not complete export log entry %s", request.entry_id)


async def _update(
    pool: Pool,
    entry_id: int,
    outcome: str,
    status: int,
    rows: int,
    bytes_sent: int,
    error: str | None,
    aborted_by: str | None,
) -> None:
    async def update(text: Callable[[str], str]) -> None:
        async with pool.connection() as connection:
            await connection.execute(
                "UPDATE exporter.export_log"
                " SET outcome = $2, status = $3, rows = $4, bytes = $5, error = $6,"
                " aborted_by = $7, ended_at = clock_timestamp()"
                " WHERE id = $1",
                entry_id,
                outcome,
                status,
                rows,
                bytes_sent,
                None if error is None else text(error),
                aborted_by,
            )

    try:
        await update(clean)
    except ENCODING_ERRORS:
        await update(_escaped)


def refusal_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status (and a reason for the log) an exception before an export's first byte
    is answered with, as the exception handlers (problems.install) answer it."""
    if isinstance(exc, (PoolTimeout, *UNREACHABLE)):
        # Whichever pool or connection failed, the log says the same.
        return 503, "database unavailable"
    error = database_failure(exc)
    if error is None:
        return 500, repr(exc)
    return error.status, error.detail or error.title


@contextlib.asynccontextmanager
async def refusals_logged(pool: Pool, request: ExportRequest) -> AsyncIterator[None]:
    """Log the request as refused if the block raises before its export has been logged."""
    try:
        yield
    except Exception as exc:
        status, reason = refusal_status(exc)
        await record_refusal(pool, request, status, reason)
        raise
