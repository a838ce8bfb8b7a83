"""The export log: one row per export request of a valid key, refused ones included.

An export that starts is written when it starts (outcome 'running') and completed when it ends;
a request refused before that (403, 404, 429, 400, ...) is written once, as refused. One
without a valid key (401) is not written at all (http/refusals.py). What the client sent is
hostile: every text is bounded, all the parameters of a row too, and cleaned of what
PostgreSQL's text and jsonb cannot hold (NUL), so that writing the log never fails the request.
"""

import asyncio
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
# All of a row's parameters (names and values, as kept): a few KB, whatever the request's size
# (up to 64 KB of query string), so that no request can make a large row.
MAX_LOGGED_PARAMETERS_CHARS = 4_096
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
    budget = MAX_LOGGED_PARAMETERS_CHARS
    for name, value in params[:MAX_LOGGED_PARAMETERS]:
        if budget <= 0:
            truncated = True
            break
        kept_name = clean(name, min(MAX_TEXT, budget))
        budget -= len(kept_name)
        kept_value = clean(value, min(MAX_TEXT, max(budget, 0)))
        budget -= len(kept_value)
        if len(kept_name) < len(name) or len(kept_value) < len(value):
            truncated = True
        grouped.setdefault(kept_name, []).append(kept_value)
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


def _not_logged(what: str, exc: Exception) -> None:
    """The export log could not be written: the client's answer stands, the server log says
    why (a database that is away in a line, anything else with its traceback)."""
    if isinstance(exc, (PoolTimeout, *UNREACHABLE)):
        log.warning("%s: %s", what, exc)
    else:
        log.error("%s", what, exc_info=exc)


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
        except Exception as exc:
            _not_logged("could not log refused export request", exc)


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
        except Exception as exc:
            _not_logged(f"could not complete export log entry {request.entry_id}", exc)


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


# Rows deleted by one statement: a large backlog is pruned in short transactions.
PRUNE_BATCH = 10_000


async def prune(pool: Pool, retention_s: float) -> int:
    """Delete the entries requested more than retention_s ago; how many."""
    deleted = 0
    while True:
        async with pool.connection() as connection:
            batch = await connection.fetchval(
                "WITH gone AS (DELETE FROM exporter.export_log WHERE id IN ("
                "  SELECT id FROM exporter.export_log"
                # now(), not clock_timestamp(): a stable value, so the index on started_at
                # bounds the scan (a volatile one would filter every row of the log).
                "  WHERE started_at < now() - make_interval(secs => $1)"
                "  ORDER BY started_at LIMIT $2) RETURNING 1)"
                " SELECT count(*) FROM gone",
                retention_s,
                PRUNE_BATCH,
            )
        deleted += int(batch)
        if batch < PRUNE_BATCH:
            return deleted


async def prune_forever(pool: Pool, retention_s: float, interval_s: float) -> None:
    """`serve`'s pruning of the log, every interval_s in every process (deleting is
    idempotent). Failures are logged, never fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            pruned = await prune(pool, retention_s)
            if pruned:
                log.info("pruned %d export log entries older than the retention", pruned)
        except Exception as exc:
            log.warning("could not prune the export log: %s", exc)
