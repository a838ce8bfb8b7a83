"""How an HTTP export starts, streams and ends: everything that can fail before the first byte
is done here first; then ExportResponse streams and, however it ends, releases and logs."""

import logging
import math
import urllib.parse
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from exporter.access import export_log
from exporter.access.exports import KeyExport
from exporter.access.keys import ApiKey
from exporter.access.revocations import REVOKED, Revocations
from exporter.db.pool import Databases
from exporter.errors import ClientClosedRequest, ExporterError
from exporter.http.compression import Compressor, choose_coding, compressed, compressor_for
from exporter.http.memory import release_free_memory
from exporter.http.pace import PaceLimits, SendMeter
from exporter.incremental.pulls import pull_cursor
from exporter.jobs.events import Publisher
from exporter.pipeline.catalog import Dataset
from exporter.pipeline.encoders import Encoder
from exporter.pipeline.failures import export_failure
from exporter.pipeline.query import estimated_rows, parse_query
from exporter.pipeline.stream import ExportAborted, ExportStream
from exporter.settings import Settings

log = logging.getLogger(__name__)

# The answer to a request whose client left before the export's first byte: nobody receives
# it (uvicorn drops it, unlogged); nginx uses the same code for the same event.
CLIENT_CLOSED_REQUEST = 499


class ActiveExports:
    """The exports of this process that have not released their connection yet, so that
    shutdown can wait for their cleanup and their export log entries."""

    def __init__(self) -> None:
        self._pending: set[anyio.Event] = set()

    def begin(self) -> anyio.Event:
        done = anyio.Event()
        self._pending.add(done)
        return done

    def end(self, done: anyio.Event) -> None:
        done.set()
        self._pending.discard(done)

    async def wait(self, timeout_s: float) -> int:
        """Wait for every export to end; the number still running after timeout_s."""
        with anyio.move_on_after(timeout_s):
            for done in list(self._pending):
                await done.wait()
        return len(self._pending)


def export_request(
    request: Request, dataset: str, encoder: type[Encoder]
) -> export_log.ExportRequest:
    """What the export log records of the request, known before anything is checked."""
    return export_log.ExportRequest(
        request_id=str(request.scope.get("state", {}).get("request_id", "-")),
        dataset=dataset,
        format=encoder.format,
        parameters=export_log.bounded_parameters(request.query_params.multi_items()),
        client_addr=request.client.host if request.client else None,
    )


async def start_export(
    request: Request,
    logged: export_log.ExportRequest,
    key: ApiKey,
    dataset: Dataset,
    encoder: type[Encoder],
    settings: Settings,
    databases: Databases,
    active: ActiveExports,
    revocations: Revocations,
    revoked: anyio.Event,
) -> Response:
    """The export's response; `revoked` (the key's revocation, subscribed by the caller) cuts
    it off, and is unsubscribed however the export ends."""
    params = request.query_params.multi_items()
    query = parse_query(
        dataset, params, max_limit=settings.max_limit, max_in_items=settings.max_in_items
    )
    secret = await databases.cursor_secret()
    since = pull_cursor(query, encoder.format, key.role, secret)
    media_type = content_type(encoder)
    # Several Accept-Encoding fields make one list (RFC 9110 §5.3).
    accept_encoding = ", ".join(request.headers.getlist("accept-encoding")) or None
    compressor = compressor_for(choose_coding(accept_encoding, media_type))
    stream = KeyExport(
        query, encoder, key, databases, settings, f"exporter {logged.request_id}", secret, since
    )
    await export_log.record_start(databases.state, logged)

    async def finish(ended: ExportStream, outcome: str | None = None) -> None:
        outcome = outcome or ended.outcome.value
        error = None if ended.error is None else str(ended.error)[:1000]
        if outcome == "completed":
            await publisher.done()
        else:
            ending = ClientClosedRequest if outcome == "disconnected" else ExporterError
            failure = ending(detail=error or outcome, title=f"Export {outcome}")
            # aborted_by is in every such event, null when no limit ended the export.
            await publisher.error({**failure.problem(), "aborted_by": ended.aborted_by})
        await export_log.record_end(
            databases.state,
            logged,
            outcome=outcome,
            status=200,
            rows=ended.rows,
            bytes_sent=ended.bytes,
            error=error if outcome in ("failed", "aborted") else None,
            aborted_by=ended.aborted_by,
        )
        sent = "" if compressor is None else f" ({compressor.coding}: {compressor.bytes_out} sent)"
        log.info(
            "export %s of %s: %s%s, %d rows, %d bytes%s, %.2f s",
            encoder.format,
            dataset.name,
            outcome,
            f" ({ended.aborted_by})" if ended.aborted_by else "",
            ended.rows,
            ended.bytes,
            sent,
            ended.elapsed_s,
        )

    async def record_client_gone() -> None:
        await export_log.record_end(
            databases.state,
            logged,
            outcome="disconnected",
            status=CLIENT_CLOSED_REQUEST,
            rows=0,
            bytes_sent=0,
        )

    done = active.begin()

    def released() -> None:
        active.end(done)
        revocations.unsubscribe(key.id, revoked)

    try:
        opened = await _open_unless_client_leaves(stream, request, settings.max_seconds)
    except BaseException as exc:
        stream.error = exc
        problem = export_failure(exc, query)
        with anyio.CancelScope(shield=True):
            if isinstance(exc, ExportAborted) and problem is not None:
                await export_log.record_end(
                    databases.state,
                    logged,
                    outcome="aborted",
                    status=problem.status,
                    rows=0,
                    bytes_sent=0,
                    error=str(exc),
                    aborted_by=exc.limit,
                )
            elif problem is not None:
                await export_log.record_refusal(
                    databases.state, logged, problem.status, problem.detail or problem.title
                )
            elif isinstance(exc, Exception):
                await export_log.record_refusal(databases.state, logged, 500, repr(exc))
            else:
                # Cancellation (a shutdown): the log entry must not stay "running".
                await record_client_gone()
        released()
        if problem is None:
            raise
        raise problem from exc
    if not opened:
        await record_client_gone()
        released()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    # Progress for GET /exports/{id}/events, from whichever process runs the export.
    publisher = Publisher(
        databases.state,
        logged.request_id,
        key.name,
        lambda: (stream.rows, stream.bytes),
        estimated_rows(query),
        settings.progress_interval_s,
    )
    publisher.start()

    headers = {
        "Content-Disposition": _attachment(dataset.name, encoder.extension),
        "Cache-Control": "no-store",
        # Compressed or not, the response depends on the header.
        "Vary": "Accept-Encoding",
        **stream.pull.headers(),
    }
    return ExportResponse(
        stream,
        finish,
        released,
        headers=headers,
        media_type=media_type,
        compressor=compressor,
        pace=PaceLimits(
            max_seconds=settings.max_seconds,
            min_bytes_per_second=settings.min_bytes_per_second,
            window_s=settings.min_rate_window_s,
        ),
        revoked=revoked,
    )


def content_type(encoder: type[Encoder]) -> str:
    return encoder.media_type + (
        "; charset=utf-8" if encoder.media_type.startswith("text/") else ""
    )


async def _open_unless_client_leaves(
    stream: ExportStream, request: Request, max_seconds: float | None
) -> bool:
    """Open the stream; False if the client left first; ExportAborted past max_seconds.

    Under uvicorn, nothing cancels an endpoint whose client has gone: the first batch of a
    slow query would hold its connection until it was ready. So the disconnect is watched
    here, and opening is cancelled (the cursor, transaction and connection with it). So is
    a query that has not given its first rows within EXPORTER_MAX_SECONDS.
    """
    opened = False
    failure: Exception | None = None
    async with anyio.create_task_group() as task_group:

        async def cancel_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            task_group.cancel_scope.cancel()

        task_group.start_soon(cancel_on_disconnect)
        try:
            with anyio.move_on_after(math.inf if max_seconds is None else max_seconds) as late:
                await stream.open()
            if late.cancelled_caught:
                stream.abort(
                    "max_seconds",
                    f"the export ran longer than {max_seconds:g} s before its first rows",
                )
            opened = True
        except Exception as exc:
            # Kept out of the task group, which would wrap it in an ExceptionGroup.
            failure = exc
        task_group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return opened


def attachment_name(dataset: str, extension: str, at: datetime | None = None) -> str:
    """A download's file name: `<dataset>-<UTC timestamp>.<ext>`, never a client's text."""
    stamp = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{dataset}-{stamp}.{extension}"


def _attachment(dataset: str, extension: str) -> str:
    return attachment(attachment_name(dataset, extension))


def attachment(filename: str) -> str:
    """Content-Disposition for a download saved as `filename` (RFC 6266): an ASCII fallback
    for old clients, and the name itself in UTF-8."""
    ascii_name = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in filename
    )
    return (
        f'attachment; filename="{ascii_name}"; '
        f"filename*=UTF-8''{urllib.parse.quote(filename, safe='')}"
    )


class ExportResponse(StreamingResponse):
    """A StreamingResponse that releases its export the moment the response ends.

    When the client leaves, Starlette cancels the task that sends the body while the body's
    generator is paused at `yield`; left alone, that generator (and its cursor, transaction
    and pooled connection) would wait for the garbage collector. So it is closed here,
    explicitly, under a shield. A failure raised by the body propagates to uvicorn, which then
    drops the connection without the terminating chunk: the client sees an incomplete file.

    With a compressor, each chunk is compressed and flushed as it leaves (Content-Encoding);
    the stream's own counts stay those of the uncompressed export.
    """

    def __init__(
        self,
        stream: ExportStream,
        on_end: Callable[[ExportStream], Coroutine[Any, Any, None]],
        on_released: Callable[[], None],
        *,
        headers: dict[str, str],
        media_type: str,
        compressor: Compressor | None = None,
        pace: PaceLimits | None = None,
        revoked: anyio.Event | None = None,
    ) -> None:
        body = stream.chunks()
        if compressor is not None:
            body = compressed(body, compressor)
            headers = {**headers, "Content-Encoding": compressor.coding}
        super().__init__(body, headers=headers, media_type=media_type)
        self.stream = stream
        self.on_end = on_end
        self.on_released = on_released
        self.pace = pace or PaceLimits()
        self.revoked = revoked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ended = False

        async def send_tracking_the_end(message: Message) -> None:
            nonlocal ended
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True

        try:
            if self.pace.active or self.revoked is not None:
                await self._send_watched(scope, receive, send_tracking_the_end)
            else:
                await super().__call__(scope, receive, send_tracking_the_end)
        finally:
            if not ended:
                # Every row was read, but the response did not end (its last chunk, a gzip
                # trailer or the terminating chunk was never sent): not a complete export.
                self.stream.completed = False
            with anyio.CancelScope(shield=True):
                try:
                    try:
                        aclose = getattr(self.body_iterator, "aclose", None)
                        if aclose is not None:
                            await aclose()
                        await self.stream.aclose()
                    finally:
                        # Logged however the release went.
                        await self.on_end(self.stream)
                finally:
                    self.on_released()
                    release_free_memory()

    async def _send_watched(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response while a watcher checks the time limits and the key's revocation;
        a broken limit or a revoked key cuts the response off (ExportAborted reaches uvicorn,
        which drops the connection)."""
        meter = SendMeter()

        async def metered_send(message: Message) -> None:
            with meter.sending(len(message.get("body", b""))):
                await send(message)

        broken: tuple[str, str] | None = None
        failure: Exception | None = None
        async with anyio.create_task_group() as task_group:

            async def watch() -> None:
                nonlocal broken
                async with anyio.create_task_group() as watchers:

                    async def pace() -> None:
                        nonlocal broken
                        broken = await self.pace.first_broken(meter, self.stream.started)
                        watchers.cancel_scope.cancel()

                    async def revocation(revoked: anyio.Event) -> None:
                        nonlocal broken
                        await revoked.wait()
                        broken = ("revoked", REVOKED)
                        watchers.cancel_scope.cancel()

                    if self.pace.active:
                        watchers.start_soon(pace)
                    if self.revoked is not None:
                        watchers.start_soon(revocation, self.revoked)
                task_group.cancel_scope.cancel()

            task_group.start_soon(watch)
            try:
                await super().__call__(scope, receive, metered_send)
            except Exception as exc:
                # Kept out of the task group, which would wrap it in an ExceptionGroup.
                failure = exc
            task_group.cancel_scope.cancel()
        if broken is not None:
            limit, detail = broken
            self.stream.aborted_by = limit
            self.stream.error = ExportAborted(limit, detail)
            raise self.stream.error
        if failure is not None:
            raise failure
