"""The download of a finished export job: one gzip file in the job store (a directory or an
S3-compatible bucket), served as two representations of the same resource (RFC 9110 §3.2),
each with its own strong ETag, byte ranges and conditional requests:

- gzip, for a client that accepts it: the file's own bytes, `Content-Encoding: gzip`; a range
  is a range of those bytes (§14.1.4: ranges apply to the encoded content);
- identity, for any other: the file decompressed on the way out.

Content-Disposition names the export itself (`events-20261201T140000Z.csv`), without `.gz`, in
both: a content coding belongs to the message, and whoever asked for it decodes it (browsers,
`curl --compressed`, httpx and requests all do) and saves the CSV. A client that keeps the
gzip bytes (`curl -H 'Accept-Encoding: gzip' -o f`) chose to, and names its file itself.
"""

import logging
import zlib
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from exporter.errors import Gone, PreconditionFailed, RangeNotSatisfiable, ServiceUnavailable
from exporter.http.compression import GZIP, IDENTITY, compressible, parse_accept_encoding
from exporter.http.exports import attachment
from exporter.http.preconditions import (
    OPAQUE_TAG,
    UNSATISFIABLE,
    ByteRange,
    EntityTag,
    Outcome,
    evaluate_preconditions,
    format_http_date,
    if_range_holds,
    parse_range,
)
from exporter.http.problems import problem_response
from exporter.jobs.seekable_gzip import GZIP_WBITS, RAW_WBITS, SeekPoint, seek_from
from exporter.storage.store import CHUNK, ByteSource, FileGone, FileStore, StoreError

log = logging.getLogger(__name__)

# A range of the identity representation starts with inflating the file from the last seek
# point before it (exporter/jobs/seekable_gzip.py: at most 16 MiB before it), or from its beginning
# for a file without them: about 2 s of one core per GB skipped (zlib inflates some 500 MB/s
# of CSV here), plus reading the compressed bytes before the offset, all before the range's
# first byte. It is done this many bytes of output per step, so that a client that leaves
# mid-skip stops the work within a step (a few ms), and the event loop never waits on it.
SKIP_STEP = 4 * 1024 * 1024

# private: the download needs a key, and is that key's data; no shared cache may keep it (it
# would not anyway, for a request with Authorization, RFC 9111 §3.5). no-cache: a client may
# keep it, but asks again each time (a 304 costs nothing), so that a deleted or expired export
# is not served from a cache. Direct exports say no-store because they are never the same
# twice; a job's file is, and a browser's cache may hold it like any download.
CACHE_CONTROL = "private, no-cache"


class CorruptExport(RuntimeError):
    """The file does not hold what its metadata says: a bug or a damaged store. Raised before
    the first byte, it is a 500; after, it aborts the response (the client sees it cut off)."""


@dataclass(frozen=True)
class StoredExport:
    """A finished job's file and what the jobs table says of it."""

    store: FileStore
    name: str  # the file's, in the store
    identity_length: int  # bytes of the export, uncompressed
    encoded_length: int  # bytes of the gzip file
    # Changes whenever the file's bytes could (a digest, or the job id and its finish time).
    # The ETags are `"<validator>"` (identity) and `"<validator>-gzip"`.
    validator: str
    last_modified: datetime  # aware
    filename: str
    media_type: str
    # Where inflating may start (exporter/jobs/seekable_gzip.py), for a file of one gzip member.
    seek_points: tuple[SeekPoint, ...] = ()

    def __post_init__(self) -> None:
        if not self.validator or not OPAQUE_TAG.fullmatch(self.validator):
            raise ValueError(f"not usable in an ETag: {self.validator!r}")
        if self.last_modified.tzinfo is None:
            raise ValueError("last_modified must be aware")
        if self.identity_length < 0 or self.encoded_length < 0:
            raise ValueError("negative length")


async def download_response(request: Request, stored: StoredExport) -> Response:
    """The response to GET or HEAD of the stored export: 200, 206, 304, 412 or 416 (problem
    details), or 410 if the file has gone (deleted or expired since its metadata was read)."""
    gzip = _accepts_gzip(request, stored.media_type)
    etag = EntityTag(f"{stored.validator}-gzip" if gzip else stored.validator)
    length = stored.encoded_length if gzip else stored.identity_length
    last_modified = _last_modified(stored.last_modified)
    headers = {
        "ETag": str(etag),
        "Last-Modified": format_http_date(last_modified),
        # Compressed or not, the response depends on the header.
        "Vary": "Accept-Encoding",
        "Cache-Control": CACHE_CONTROL,
    }
    # Preconditions apply to a representation that exists (§13.2.1), so the file is looked at
    # first.
    try:
        size = await stored.store.size(stored.name)
    except StoreError as exc:
        return _unavailable(request, exc)
    if size is None:
        return _gone(request)
    if size != stored.encoded_length:
        raise CorruptExport(f"{stored.name}: {size} bytes, not {stored.encoded_length}")

    outcome = evaluate_preconditions(request.headers, request.method, etag, last_modified)
    if outcome is Outcome.NOT_MODIFIED:
        return Response(status_code=304, headers=headers)
    if outcome is Outcome.PRECONDITION_FAILED:
        detail = "If-Match or If-Unmodified-Since does not hold for this export"
        return problem_response(PreconditionFailed(detail, headers=headers), request)

    headers["Accept-Ranges"] = "bytes"
    # Of the export's bytes only: not of a 416's problem details.
    representation = {
        "Content-Type": stored.media_type,
        "Content-Disposition": attachment(stored.filename),
    }
    if gzip:
        representation["Content-Encoding"] = GZIP
    span, status = ByteRange(0, length), 200
    # Range is for GET only (§14.2: HEAD ignores it); a range that If-Range does not let
    # through, a malformed one, or several, get the whole representation.
    range_value = _single(request, "range")
    if_range = _single(request, "if-range")
    if (
        request.method == "GET"
        and range_value is not None
        and (if_range is None or if_range_holds(if_range, etag, last_modified))
    ):
        asked = parse_range(range_value, length)
        if asked is UNSATISFIABLE:
            headers["Content-Range"] = f"bytes */{length}"
            detail = f"the export is {length} bytes long" + (" (gzip)" if gzip else "")
            problem = RangeNotSatisfiable(detail, headers=headers)
            return problem_response(problem, request)
        if asked is not None:
            span, status = asked, 206
            headers["Content-Range"] = span.content_range(length)
    headers |= representation
    headers["Content-Length"] = str(span.end - span.start)
    return _FileResponse(stored, gzip, span, status, headers, head=request.method == "HEAD")


def _gone(request: Request) -> Response:
    return problem_response(Gone("the export's file has been deleted"), request)


def _unavailable(request: Request, exc: StoreError) -> Response:
    # The store's address and answer are for the server's log, not for clients.
    log.warning("job store: %s", exc)
    problem = ServiceUnavailable(
        "the export's file cannot be read at the moment", headers={"Retry-After": "5"}
    )
    return problem_response(problem, request)


def _accepts_gzip(request: Request, media_type: str) -> bool:
    """Whether to send the gzip representation: gzip acceptable, and weighted at least as
    identity (as compression.choose_coding, which would pick zstd, which there is none of)."""
    accept_encoding = ", ".join(request.headers.getlist("accept-encoding"))
    if not accept_encoding or not compressible(media_type):
        # No header: identity, as for direct exports (curl without --compressed, curl -C -).
        return False
    weights = parse_accept_encoding(accept_encoding)
    anything = weights.get("*")
    gzip = weights.get(GZIP, anything)
    identity = weights.get(IDENTITY, anything)
    return gzip is not None and gzip > 0 and (identity is None or gzip >= identity)


def _last_modified(moment: datetime) -> datetime:
    """Last-Modified in whole seconds, as sent and as clients send it back; never in the future
    (§8.8.2.1: a clock ahead of this one, on the worker that finished the job)."""
    return min(moment, datetime.now(UTC)).replace(microsecond=0)


def _single(request: Request, name: str) -> str | None:
    """A field that may appear once; sent twice, it is ignored like any malformed one."""
    values = request.headers.getlist(name)
    return values[0] if len(values) == 1 else None


class _Reader:
    async def read(self) -> bytes:
        """The next chunk (at most CHUNK bytes); b"" at the end."""
        raise NotImplementedError


class _EncodedReader(_Reader):
    """A span of the gzip file's own bytes, from a source that starts at the span."""

    def __init__(self, source: ByteSource, span: ByteRange) -> None:
        self._source = source
        self._remaining = span.end - span.start

    async def read(self) -> bytes:
        if self._remaining == 0:
            return b""
        data = (await self._source.read())[: self._remaining]
        if not data:
            raise CorruptExport("the file ended before its encoded length")
        self._remaining -= len(data)
        return data


class _NeedInput(Exception):
    """Inflating needs the next chunk of the file (read outside the worker thread)."""


class _IdentityReader(_Reader):
    """A span of the export, decompressed from the start of the file. Memory stays at a chunk
    of input and one of output however well the data compresses (a run of zeros inflates a
    thousandfold: zlib is never asked for more than CHUNK at a time). Inflating runs in a
    worker thread, in steps; the file is read between them, on the event loop."""

    def __init__(
        self,
        source: ByteSource,
        span: ByteRange,
        length: int,
        name: str,
        point: SeekPoint | None,
        checks: list[SeekPoint],
    ) -> None:
        """`source` starts at the file's start, or at `point`'s offset in the file; `checks`
        are the seek points after it, whose CRC-32s are checked from a point on."""
        self._source = source
        self._input = b""
        self._input_ended = False
        self._name = name
        # From a seek point: raw deflate, up to the gzip trailer.
        self._raw = point is not None
        self._zlib = zlib.decompressobj(wbits=RAW_WBITS if point else GZIP_WBITS)
        self._trailer: bytes | None = None
        self._length = length
        self._produced = point.offset if point else 0
        self._skip = span.start - self._produced
        # From the file's start too: a range that stops before the end is checked by them.
        self._checks = list(checks)
        self._checked_to = self._produced  # the end of the last segment checked
        self._crc = 0
        self._remaining = span.end - span.start
        self._to_the_end = span.end == length
        self._end = span.end
        self._last: bytes | None = None  # held back until the end has been checked

    async def read(self) -> bytes:
        while True:
            try:
                out = await anyio.to_thread.run_sync(self._step)
            except _NeedInput:
                self._input = await self._source.read()
                self._input_ended = not self._input
                continue
            if out is not None:
                return out

    def _step(self) -> bytes | None:
        """The next chunk; None after SKIP_STEP bytes skipped (a point to stop at)."""
        if self._last is not None:
            # Checking the last chunk needed more input: check again with it.
            self._check_last()
            out, self._last = self._last, None
            return out
        budget = SKIP_STEP
        while self._remaining:
            out = self._inflate()
            if self._skip:
                if len(out) <= self._skip:
                    self._skip -= len(out)
                    budget -= len(out)
                    if budget <= 0:
                        return None
                    continue
                out, self._skip = out[self._skip :], 0
            out = out[: self._remaining]
            self._remaining -= len(out)
            if self._remaining == 0:
                # The last chunk leaves only once what it holds has been checked: the gzip
                # trailer for a range to the end, else the CRC-32 of the segment it ends in.
                # With a Content-Length, holding it back is the one way to tell the client.
                self._last = out
                self._check_last()
                self._last = None
            return out
        return b""

    def _take_input(self) -> bytes:
        # Raised before any state changes: the step is simply taken again with input.
        if not self._input and not self._input_ended:
            raise _NeedInput
        data, self._input = self._input, b""
        return data

    def _inflate(self) -> bytes:
        out = self._inflate_any()
        if not out:
            raise CorruptExport("the export is shorter than its identity length")
        if self._produced + len(out) > self._length:
            raise CorruptExport("the export is longer than its identity length")
        if self._checks:
            self._check_segments(out)
        self._produced += len(out)
        return out

    def _check_segments(self, out: bytes) -> None:
        """The CRC-32 of each segment inflated from a seek point on (the trailer's covers the
        whole export, so cannot be checked from the middle)."""
        position = 0
        while self._checks and self._produced + len(out) >= self._checks[0].offset:
            cut = self._checks[0].offset - self._produced
            self._crc = zlib.crc32(out[position:cut], self._crc)
            check = self._checks.pop(0)
            if self._crc != check.crc32:
                raise CorruptExport(f"{self._name}: a segment's CRC-32 does not match")
            self._crc, position, self._checked_to = 0, cut, check.offset
        self._crc = zlib.crc32(out[position:], self._crc)

    def _inflate_any(self) -> bytes:
        """At most CHUNK bytes of the decompressed file; b"" at its end."""
        while True:
            if self._zlib.eof and self._raw:
                return self._raw_end()
            if self._zlib.eof:
                # A member may follow another (files concatenated, or `gzip -c >>`): gzip(1)
                # and every HTTP client decode them all, so the identity representation does.
                data = self._zlib.unused_data or self._take_input()
                if not data:
                    return b""
                self._zlib = zlib.decompressobj(wbits=GZIP_WBITS)
            else:
                data = self._zlib.unconsumed_tail or self._take_input()
            # With no input left, zlib may still hold output (a match cut by the limit).
            try:
                out = self._zlib.decompress(data, CHUNK)
            except zlib.error as exc:  # a bad CRC-32 or length in the trailer, say
                raise CorruptExport(f"{self._name}: {exc}") from exc
            if out:
                return out
            if not data and not self._zlib.eof:
                raise CorruptExport("the file ends inside its gzip stream")

    def _raw_end(self) -> bytes:
        """After the deflate stream read from a seek point: the gzip trailer, and nothing
        more. Its ISIZE is checked (its CRC-32 covers the whole export: the segments' were)."""
        if self._trailer is None:
            self._trailer = self._zlib.unused_data
        while len(self._trailer) < 8:
            data = self._take_input()
            if not data:
                raise CorruptExport("the file ends inside its gzip trailer")
            self._trailer += data
        while data := self._take_input():
            self._trailer += data
        if len(self._trailer) != 8:
            raise CorruptExport("the file goes on after its gzip stream")
        if int.from_bytes(self._trailer[4:], "little") != self._length & 0xFFFFFFFF:
            raise CorruptExport("the file's gzip trailer does not give the identity length")
        if self._checks or self._produced != self._length:
            raise CorruptExport(f"{self._name}: the export ends before its last seek point")
        return b""

    def _check_last(self) -> None:
        if self._to_the_end:
            self._check_end()
            return
        # A range that ends inside a segment: the segment is inflated to its end (at most
        # SEEK_POINT_BYTES more), so that its CRC-32 is checked. Not for an older file
        # without seek points (nothing to check against but the trailer).
        while self._checks and self._checked_to < self._end:
            self._inflate()

    def _check_end(self) -> None:
        if self._inflate_any():
            raise CorruptExport("the export is longer than its identity length")


class _FileResponse(Response):
    """Streams a span of one representation from the store: one chunk in memory at a time,
    decompressed in a worker thread. The file (or the store's response) is closed however the
    response ends: the
    client leaving is noticed (uvicorn's `send` would not tell: it returns silently once the
    client has gone) and cancels the sending."""

    def __init__(
        self,
        stored: StoredExport,
        gzip: bool,
        span: ByteRange,
        status: int,
        headers: dict[str, str],
        *,
        head: bool,
    ) -> None:
        super().__init__(status_code=status, headers=headers)
        self.stored = stored
        self.gzip = gzip
        self.span = span
        self.head = head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        if self.head:
            await send(start)
            await send({"type": "http.response.body", "body": b""})
            return
        failure: Exception | None = None
        # Watched from the start: opening the file may wait on the store (S3) for a while.
        async with anyio.create_task_group() as task_group:

            async def cancel_on_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                task_group.cancel_scope.cancel()

            task_group.start_soon(cancel_on_disconnect)
            try:
                await self._send(start, scope, receive, send)
            except Exception as exc:
                # Kept out of the task group, which would wrap it in an ExceptionGroup.
                failure = exc
            task_group.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _send(self, start: Message, scope: Scope, receive: Receive, send: Send) -> None:
        # The identity representation inflates the file from a seek point (or its start);
        # the encoded one reads the span only.
        if self.gzip:
            # The whole file without a Range (a server or proxy may ignore one).
            whole = self.span.end == self.stored.encoded_length
            begin, end = self.span.start, None if whole else self.span.end
        else:
            point, _ = seek_from(self.stored.seek_points, self.span.start)
            begin, end = (point.file_offset if point else 0), None
        async with AsyncExitStack() as stack:
            try:
                source = await stack.enter_async_context(
                    self.stored.store.reader(self.stored.name, begin, end)
                )
            except StoreError as exc:
                # Deleted or unreachable since its size was read: nothing has been sent yet.
                request = Request(scope)
                response = (
                    _gone(request) if isinstance(exc, FileGone) else _unavailable(request, exc)
                )
                await response(scope, receive, send)
                return
            await send(start)
            await self._send_body(source, send)

    async def _send_body(self, source: ByteSource, send: Send) -> None:
        reader: _Reader = (
            _EncodedReader(source, self.span)
            if self.gzip
            else _IdentityReader(
                source,
                self.span,
                self.stored.identity_length,
                self.stored.name,
                *seek_from(self.stored.seek_points, self.span.start),
            )
        )
        while chunk := await reader.read():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
