"""Content codings of exports (RFC 9110 §8.4, §12.5.3): the one a client accepts, and the
export's chunks compressed on the fly, each one flushed so that the download still streams."""

import functools
import re
import zlib
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Protocol

IDENTITY = "identity"
GZIP = "gzip"
ZSTD = "zstd"

# Level 1 of each: on the benchmark table's CSV (277 MB), gzip level 1 compresses at about
# 110 MB/s of one core to 30%, level 3 at 66 MB/s to 28%, level 6 at 31 MB/s to 25%; zstd
# level 1 at about 250 MB/s to 23%, better than its level 3 on this data. An export runs at
# about 60 MB/s, so anything slower than level 1 would make the compression the bottleneck.
GZIP_LEVEL = 1
ZSTD_LEVEL = 1

# Server-sent events must reach the client event by event; compressed, browsers and proxies
# hold them back. Never compressed, whatever the client accepts.
_NEVER_COMPRESSED = frozenset({"text/event-stream"})

# A client lists a few codings. Only so many elements of a header are read, so that a hostile
# one costs no more than a long ordinary one.
_MAX_ELEMENTS = 32
_QVALUE = re.compile(r"[01](?:\.[0-9]{0,3})?")
# RFC 9110 §8.4.1.3: x-gzip is gzip.
_ALIASES = {"x-gzip": GZIP}


def parse_accept_encoding(header: str) -> dict[str, float]:
    """Codings (lower case) and their weights. A malformed weight counts as 0 (not acceptable);
    a coding listed twice gets its lowest weight, so that a refusal is never overridden."""
    weights: dict[str, float] = {}
    for element in header.split(",", _MAX_ELEMENTS)[:_MAX_ELEMENTS]:
        coding, _, params = element.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        coding = _ALIASES.get(coding, coding)
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                weight = min(float(value), 1.0) if _QVALUE.fullmatch(value) else 0.0
        weights[coding] = min(weight, weights.get(coding, weight))
    return weights


@functools.cache
def _zstandard() -> ModuleType | None:
    """The zstandard module, imported when a client first asks for zstd (about 2 MiB that a
    server whose clients never ask does not pay); None if it cannot be imported."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def compressible(media_type: str) -> bool:
    return media_type.partition(";")[0].strip().lower() not in _NEVER_COMPRESSED


def choose_coding(accept_encoding: str | None, media_type: str) -> str:
    """The content coding for a response of `media_type`: the acceptable coding with the highest
    weight; on a tie zstd, then gzip, then identity. Without an Accept-Encoding header, identity
    (RFC 9110 allows any coding then, but a client that sends none, such as curl without
    --compressed, usually cannot decode one). When nothing acceptable is offered, identity too."""
    if accept_encoding is None or not compressible(media_type):
        return IDENTITY
    weights = parse_accept_encoding(accept_encoding)
    anything = weights.get("*")

    def weight(coding: str) -> float | None:
        return weights.get(coding, anything)

    candidates = []
    for rank, coding in enumerate((ZSTD, GZIP, IDENTITY)):
        q = weight(coding)
        if q is not None and q > 0:
            candidates.append((-q, rank, coding))
    for _, _, coding in sorted(candidates):
        if coding == ZSTD and _zstandard() is None:
            continue
        return coding
    return IDENTITY


class Compressor(Protocol):
    coding: str
    bytes_out: int

    def compress(self, data: bytes) -> bytes:
        """`data` compressed and flushed: everything it holds can be decoded by the client."""
        ...

    def finish(self) -> bytes:
        """The end of the compressed stream (gzip's trailer, zstd's frame end)."""
        ...


class _Gzip:
    coding = GZIP

    def __init__(self) -> None:
        # wbits 31: a gzip header and trailer around the deflate stream.
        self._zlib = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self.bytes_out = 0

    def compress(self, data: bytes) -> bytes:
        out = self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        self.bytes_out += len(out)
        return out

    def finish(self) -> bytes:
        out = self._zlib.flush(zlib.Z_FINISH)
        self.bytes_out += len(out)
        return out


class _Zstd:
    coding = ZSTD

    def __init__(self, zstandard: ModuleType) -> None:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._zstd = compressor.compressobj()
        self._flush_block: int = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self.bytes_out = 0

    def compress(self, data: bytes) -> bytes:
        out: bytes = self._zstd.compress(data) + self._zstd.flush(self._flush_block)
        self.bytes_out += len(out)
        return out

    def finish(self) -> bytes:
        out: bytes = self._zstd.flush()
        self.bytes_out += len(out)
        return out


def compressor_for(coding: str) -> Compressor | None:
    """A new compressor (one per response) for a coding from choose_coding; None: identity."""
    if coding == GZIP:
        return _Gzip()
    if coding == ZSTD:
        zstandard = _zstandard()
        assert zstandard is not None, "chosen only if available"
        return _Zstd(zstandard)
    return None


async def compressed(chunks: AsyncIterator[bytes], compressor: Compressor) -> AsyncIterator[bytes]:
    """Each chunk compressed and flushed as it comes. The end of the compressed stream is written
    only after the last chunk: a failure propagates without it, so that the response is still
    aborted rather than ending in a well-formed file. Closing this closes `chunks`."""
    try:
        async for chunk in chunks:
            out = compressor.compress(chunk)
            if out:
                yield out
        yield compressor.finish()
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
