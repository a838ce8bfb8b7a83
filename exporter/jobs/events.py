"""Progress of exports over Server-Sent Events (GET /exports/{id}/events).

Whichever process runs an export publishes its events into exporter.export_events (numbered per
export) and NOTIFYs; every process LISTENs once (EventHub) and wakes the subscribers of that
export, which read the events after the last one they sent. Kept in a table, not only sent
through NOTIFY: a subscriber that reconnects with Last-Event-ID gets every event it missed, and
one that connects after the export ended still gets its end.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from exporter.db.listen import Listener
from exporter.db.pool import Pool

log = logging.getLogger(__name__)

CHANNEL = "exporter_events"
# Progress at least this often while an export runs, even when its counts stand still (a
# slow query before its first row): elapsed_s tells the watcher it is alive.
PROGRESS_AT_LEAST_S = 2.0
# A comment line this often keeps idle proxies from closing the stream.
HEARTBEAT_S = 15.0
# What an EventSource waits before reconnecting (the retry: field), in milliseconds.
RETRY_MS = 2000
TERMINAL = frozenset({"done", "error"})


async def publish(pool: Pool, export_id: str, key_name: str, event: str, data: Any) -> None:
    async with pool.connection() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO exporter.export_events (export_id, key_name, event, data)"
            " VALUES ($1, $2, $3, $4::jsonb)",
            export_id,
            key_name,
            event,
            json.dumps(data),
        )
        # Delivered at commit, with the event readable.
        await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, export_id)


class Publisher:
    """The events of one export: `progress` while it runs (when the counts changed, at most
    every interval_s, EXPORTER_PROGRESS_INTERVAL_S), then one `done` or `error`. Publishing
    never fails the export: a failure is logged, and the export goes on."""

    def __init__(
        self,
        pool: Pool,
        export_id: str,
        key_name: str,
        counts: Callable[[], tuple[int, int]],
        estimated_rows: int | None,
        interval_s: float,
    ) -> None:
        self.pool = pool
        self.export_id = export_id
        self.key_name = key_name
        self.counts = counts
        self.estimated_rows = estimated_rows
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._progress_forever())

    def progress(self) -> dict[str, Any]:
        rows, size = self.counts()
        return {
            "rows": rows,
            "bytes": size,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "estimated_rows": self.estimated_rows,
        }

    async def _publish(self, event: str, data: Any) -> None:
        async with self._lock:
            try:
                await publish(self.pool, self.export_id, self.key_name, event, data)
            except Exception as exc:
                log.warning("export %s: could not publish %s: %s", self.export_id, event, exc)

    async def _progress_forever(self) -> None:
        published = 0.0
        while True:
            # Waiting first: a job claimed only to find its key's export slots taken goes
            # back to the queue within moments, and must not publish a progress each time.
            await asyncio.sleep(self.interval_s)
            counts = self.counts()
            now = time.monotonic()
            if counts != self._last or now - published >= PROGRESS_AT_LEAST_S:
                self._last, published = counts, now
                await self._publish("progress", self.progress())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def done(self, **extra: Any) -> None:
        await self.stop()
        await self._publish("done", {**self.progress(), **extra})

    async def error(self, problem: dict[str, Any]) -> None:
        await self.stop()
        await self._publish("error", problem)


class EventHub:
    """One LISTEN connection per process (reconnected when lost), waking the subscribers of an
    export. While it is down, subscribers poll."""

    def __init__(self, state_url: str) -> None:
        self._subscribers: dict[str, set[asyncio.Event]] = {}
        self._listener = Listener(state_url, CHANNEL, self._notified, self._wake_all)
        self._task: asyncio.Task[None] | None = None
        self.draining = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listener.run_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def drain(self) -> None:
        """This process is shutting down: every event stream ends once it has sent what there
        is to send now. Otherwise a stream lasts as long as its export, and would hold the
        process for the whole grace period; its EventSource reconnects (retry:) with
        Last-Event-ID to another process or replica and, events being rows, misses none."""
        self.draining = True
        self._wake_all()

    @property
    def listening(self) -> bool:
        return self._listener.connected

    def _notified(self, export_id: str) -> None:
        for wake in self._subscribers.get(export_id, ()):
            wake.set()

    def _wake_all(self) -> None:
        # (Re)connected: what was notified meanwhile is lost; every subscriber reads again.
        for waiting in self._subscribers.values():
            for wake in waiting:
                wake.set()

    @contextlib.contextmanager
    def subscription(self, export_id: str) -> Iterator[asyncio.Event]:
        wake = asyncio.Event()
        self._subscribers.setdefault(export_id, set()).add(wake)
        try:
            yield wake
        finally:
            waiting = self._subscribers.get(export_id)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self._subscribers[export_id]


async def events_after(
    pool: Pool, export_id: str, key_name: str | None, after: int
) -> list[tuple[int, str, str]]:
    """(id, event, data) of the export after event `after`; key_name None: any key's (admin)."""
    async with pool.connection() as connection:
        rows = await connection.fetch(
            "SELECT id, event, data::text FROM exporter.export_events"
            " WHERE export_id = $1 AND ($2::text IS NULL OR key_name = $2) AND id > $3"
            " ORDER BY id LIMIT 1000",
            export_id,
            key_name,
            after,
        )
    return [(row["id"], row["event"], row["data"]) for row in rows]


def format_event(event_id: int | None, event: str, data: str) -> bytes:
    # data is one line of JSON (jsonb's text form has no line breaks).
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


# How the end of an export that published none looks to a subscriber: refused before it
# started, cancelled while queued, failed for good, older than its events' retention.
Ended = Callable[[], Awaitable[tuple[str, dict[str, Any]] | None]]


async def event_stream(
    pool: Pool, hub: EventHub, export_id: str, key_name: str | None, after: int, ended: Ended
) -> AsyncIterator[bytes]:
    """The stream of an export's events after `after`, ending with its done or error; if the
    export has ended without publishing its end, one made from its record (without an id)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    with hub.subscription(export_id) as wake:
        quiet_since = time.monotonic()
        while True:
            wake.clear()
            events = await events_after(pool, export_id, key_name, after)
            for event_id, event, data in events:
                after = event_id
                quiet_since = time.monotonic()
                yield format_event(event_id, event, data)
                if event in TERMINAL:
                    return
            if not events:
                end = await ended()
                # Read again: the end may have been published since the last read.
                if end is not None and not await events_after(pool, export_id, key_name, after):
                    yield format_event(None, end[0], json.dumps(end[1]))
                    return
            if hub.draining:
                # Between two events: the stream ends complete, and the client reconnects.
                return
            # Woken by NOTIFY; a poll besides, in case it is not listening or missed one.
            timeout = 1.0 if not hub.listening else HEARTBEAT_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await wake.wait()
            if time.monotonic() - quiet_since >= HEARTBEAT_S:
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"


async def prune(pool: Pool, retention_s: float) -> None:
    async with pool.connection() as connection:
        await connection.execute(
            "DELETE FROM exporter.export_events"
            " WHERE at < clock_timestamp() - make_interval(secs => $1)",
            float(retention_s),
        )
