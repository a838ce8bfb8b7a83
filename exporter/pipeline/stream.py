"""source -> encoder -> chunks. Shared by the HTTP response and the CLI.

`open()` does everything that can fail before the first byte: it takes a connection, opens the
snapshot, declares the cursor and fetches the first batch. After that, a failure can only
abort the stream; `aclose()` releases everything at once, however the export ended.
"""

import contextlib
import dataclasses
import enum
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, Protocol

import anyio

from exporter.db.connection import Connection
from exporter.db.pool import Pool, closing_connections_as_lost, snapshot
from exporter.db.slots import Slots
from exporter.errors import ServiceUnavailable
from exporter.pipeline.encoders import Encoder
from exporter.pipeline.query import ExportQuery
from exporter.pipeline.source import (
    CopySource,
    Source,
    build_copy,
    build_sql,
    check_filter_values,
)
from exporter.settings import Settings


def _seconds(milliseconds: int) -> float | None:
    # PostgreSQL's convention: 0 means no timeout.
    return milliseconds / 1000 if milliseconds else None


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    DISCONNECTED = "disconnected"
    ABORTED = "aborted"  # a per-export limit (Caps)


@dataclasses.dataclass(frozen=True)
class Caps:
    """Per-export limits; None: no limit. The stream enforces rows and bytes; the HTTP
    response enforces time and the client's pace (it sees the sending)."""

    max_rows: int | None = None
    max_bytes: int | None = None


class ExportAborted(ServiceUnavailable):
    """A limit ended the export: `limit` names it (as the export log does). Before the first
    byte, only EXPORTER_MAX_SECONDS can: the slow query's fault, a 503 as a timeout is."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(f"{limit}: {detail}")
        self.limit = limit


class Planner(Protocol):
    """Something an export must learn or decide inside its snapshot before it reads (an
    incremental pull's position): it may change the query."""

    async def plan(self, connection: Connection, query: ExportQuery) -> ExportQuery: ...


class ExportStream:
    def __init__(
        self,
        query: ExportQuery,
        encoder_class: type[Encoder],
        pool: Pool,
        settings: Settings,
        label: str,
        role: str | None = None,
        slots: Slots | None = None,
        caps: Caps = Caps(),
        planner: Planner | None = None,
    ) -> None:
        if caps.max_rows is not None and (query.limit is None or query.limit > caps.max_rows):
            # One row past the cap is enough to know the export would pass it; PostgreSQL
            # need not read further.
            query = dataclasses.replace(query, limit=caps.max_rows + 1)
        self.query = query
        self.encoder = encoder_class(query.columns, query.options)
        self.pool = pool
        self.settings = settings
        self.label = label
        self.role = role
        self.slots = slots
        self.caps = caps
        # Which limit ended the export, if one did (ExportAborted.limit).
        self.aborted_by: str | None = None
        self.planner = planner
        self.rows = 0
        self.bytes = 0
        self.started = time.monotonic()
        self.completed = False
        self.error: BaseException | None = None
        self._exit_stack = AsyncExitStack()
        self._source: Source | None = None
        self._copy: CopySource | None = None
        self._first_batch: list[Any] = []
        self._first_chunk: bytes | None = None

    async def open(self) -> None:
        # Before the first byte, a connection that the server is closing (it shuts down) is
        # the database being away: a 503, a job tried again later.
        with closing_connections_as_lost():
            await self._open()

    async def _open(self) -> None:
        try:
            connection = await self._exit_stack.enter_async_context(
                snapshot(self.pool, self.settings, self.label, self.role, self.slots)
            )
            await check_filter_values(connection, self.query)
            if self.planner is not None:
                self.query = await self.planner.plan(connection, self.query)
            copy_options = self.encoder.copy_options()
            if copy_options is not None and self.settings.use_copy:
                sql, settings_sql, args = build_copy(
                    self.query, self.encoder.rendering, self.encoder.render
                )
                self._copy = CopySource(
                    connection,
                    sql,
                    settings_sql,
                    args,
                    copy_options,
                    chunk_bytes=self.settings.chunk_bytes,
                    statement_timeout_s=_seconds(self.settings.statement_timeout_ms),
                    idle_timeout_s=_seconds(self.settings.idle_in_transaction_timeout_ms),
                )
                await self._copy.start()
                self._first_chunk = await self._copy.read()
            else:
                sql, args = build_sql(self.query, self.encoder.rendering, self.encoder.render)
                self._source = Source(connection, sql, args, self.settings.batch_rows)
                self._first_batch = await self._source.fetch()
        except BaseException:
            await self.aclose()
            raise

    def chunks(self) -> AsyncIterator[bytes]:
        """The export as UTF-8 chunks of about `chunk_bytes`; closing it closes the stream.

        `rows` and `bytes` count what has been handed on (sent, for HTTP), not merely read.
        """
        if self._copy is not None:
            return self._copy_chunks(self._copy)
        assert self._source is not None, "open() first"
        return self._row_chunks(self._source)

    async def _row_chunks(self, source: Source) -> AsyncIterator[bytes]:
        encoder = self.encoder
        chunk_bytes = self.settings.chunk_bytes
        # Rows are encoded a slice at a time, each slice sized from the bytes per row seen so
        # far to fill what the chunk still lacks: chunks stay near chunk_bytes however wide
        # the rows are, and the buffer never holds much more than one chunk.
        bytes_per_row = 100.0
        encoded_rows = 0
        max_rows = self.caps.max_rows
        async with self._ending():
            encoder.begin()
            batch = self._first_batch
            self._first_batch = []
            while batch:
                start = 0
                while start < len(batch):
                    if max_rows is not None and encoded_rows == max_rows:
                        # A row past the cap exists (the query stops at the first): the cap's
                        # rows go out whole, then the export is aborted.
                        if encoder.pending():
                            yield self._take(encoded_rows)
                            self.rows = encoded_rows
                        self._check_caps(max_rows + 1, self.bytes)
                    before = encoder.pending()
                    wanted = max(1, int((chunk_bytes - before) / bytes_per_row))
                    if max_rows is not None:
                        wanted = min(wanted, max_rows - encoded_rows)
                    part = batch[start : start + wanted]
                    start += len(part)
                    encoder.write_rows(part)
                    encoded_rows += len(part)
                    bytes_per_row = max((encoder.pending() - before) / len(part), 1.0)
                    if encoder.pending() >= chunk_bytes:
                        yield self._take(encoded_rows)
                        self.rows = encoded_rows
                batch = await source.fetch()
            encoder.end()
            if encoder.pending():
                yield self._take(encoded_rows)
            self.rows = encoded_rows
            self.completed = True

    async def _copy_chunks(self, copy: CopySource) -> AsyncIterator[bytes]:
        records = 0
        max_rows = self.caps.max_rows
        async with self._ending():
            chunk = self._first_chunk
            self._first_chunk = None
            preamble = self.encoder.preamble()
            if preamble:
                self._check_caps(0, self.bytes + len(preamble))
                self.bytes += len(preamble)
                yield preamble
            while chunk is not None:
                if max_rows is not None:
                    # Counted exactly (a CSV field may hold a line break): the query stops one
                    # row past the cap, and not a byte of that row is sent.
                    ends = self.encoder.record_ends(chunk)
                    if records + len(ends) > max_rows:
                        last = max_rows - records
                        head = self.encoder.convert(chunk[: ends[last - 1]] if last else b"")
                        if head:
                            self._check_caps(0, self.bytes + len(head))
                            self.bytes += len(head)
                            self.rows = records = max_rows
                            yield head
                        self._check_caps(max_rows + 1, self.bytes)
                    records += len(ends)
                    chunk = self.encoder.convert(chunk)
                else:
                    chunk = self.encoder.convert(chunk)
                    records += self.encoder.count_records(chunk)
                self._check_caps(0, self.bytes + len(chunk))
                self.bytes += len(chunk)
                yield chunk
                self.rows = records
                chunk = await copy.read()
            self.rows = copy.rows if copy.rows is not None else records
            self.completed = True

    def _check_caps(self, rows: int, size: int) -> None:
        """Refuse to hand on what would take the export to `rows` rows or `size` bytes past a
        cap: the export ends there, visibly incomplete."""
        max_rows, max_bytes = self.caps.max_rows, self.caps.max_bytes
        if max_rows is not None and rows > max_rows:
            self.abort("max_rows", f"the export has more than {max_rows} rows")
        if max_bytes is not None and size > max_bytes:
            self.abort("max_bytes", f"the export is larger than {max_bytes} bytes")

    def abort(self, limit: str, detail: str) -> None:
        self.aborted_by = limit
        raise ExportAborted(limit, detail)

    @contextlib.asynccontextmanager
    async def _ending(self) -> AsyncIterator[None]:
        """Note how the export ended (an error, or the consumer closing it) and release it."""
        try:
            yield
        except BaseException as exc:
            # An abort for a limit is the reason, whatever closes the stream after it.
            if not isinstance(self.error, ExportAborted):
                self.error = exc
            raise
        finally:
            await self.aclose()

    def _take(self, rows: int) -> bytes:
        data = self.encoder.take().encode()
        self._check_caps(rows, self.bytes + len(data))
        self.bytes += len(data)
        return data

    async def aclose(self) -> None:
        """Idempotent; shielded, because it runs when the export's task is being cancelled."""
        with anyio.CancelScope(shield=True):
            if self._copy is not None:
                # A COPY in flight must let go of the connection before it is reset.
                await self._copy.stop(self.settings.cleanup_timeout_s)
            await self._exit_stack.aclose()

    @property
    def outcome(self) -> Outcome:
        if self.completed:
            return Outcome.COMPLETED
        if self.aborted_by is not None:
            return Outcome.ABORTED
        if self.error is not None and not isinstance(self.error, anyio.get_cancelled_exc_class()):
            if not isinstance(self.error, GeneratorExit):
                return Outcome.FAILED
        return Outcome.DISCONNECTED

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started
