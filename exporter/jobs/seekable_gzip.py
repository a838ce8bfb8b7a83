"""Gzip files that can be read from the middle: a full flush every SEEK_POINT_BYTES of input
(the deflate stream then restarts on a byte boundary, with no reference to what came before)
and a list of where they are. A download that resumes 40 GB into an export inflates from the
last point before its offset, not from the file's start (some 80 s of a core per 40 GB).

Inflating from the middle cannot check the gzip trailer's CRC-32 (it covers the whole export),
so each point also carries the CRC-32 of the segment it ends, and the list ends with one for
the last segment: whatever is inflated is checked.

A full flush costs a few hundred bytes of compression per point: nothing at 16 MiB apart.
"""

import bisect
import zlib
from collections.abc import Sequence
from typing import NamedTuple

SEEK_POINT_BYTES = 16 * 1024 * 1024
# wbits: a gzip header and trailer; raw deflate (from a seek point on).
GZIP_WBITS = 31
RAW_WBITS = -15


class SeekPoint(NamedTuple):
    offset: int  # in the export (the input)
    file_offset: int  # in the gzip file, where raw deflate restarts
    crc32: int  # of the export's bytes from the previous point (or its start) to `offset`


class SeekableGzipWriter:
    """One gzip member, compressed at `level`, with seek points at each full flush and a last
    one at the end (its file_offset is the file's size)."""

    def __init__(self, level: int, every: int = SEEK_POINT_BYTES) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, GZIP_WBITS)
        self._every = every
        self._next_point = every
        self._consumed = 0
        self._produced = 0
        self._crc = 0
        self.seek_points: list[SeekPoint] = []

    def compress(self, data: bytes) -> bytes:
        out = self._compressor.compress(data)
        self._consumed += len(data)
        self._crc = zlib.crc32(data, self._crc)
        if self._consumed >= self._next_point:
            out += self._compressor.flush(zlib.Z_FULL_FLUSH)
            self._point(self._produced + len(out))
            self._next_point = self._consumed + self._every
        self._produced += len(out)
        return out

    def finish(self) -> bytes:
        out = self._compressor.flush()
        self._produced += len(out)
        self._point(self._produced)
        return out

    def _point(self, file_offset: int) -> None:
        self.seek_points.append(SeekPoint(self._consumed, file_offset, self._crc))
        self._crc = 0

    @property
    def size(self) -> int:
        """Bytes of output so far."""
        return self._produced


def seek_from(points: Sequence[SeekPoint], offset: int) -> tuple[SeekPoint | None, list[SeekPoint]]:
    """Where to start inflating for `offset` of the export (the last point at or before it;
    None: the file's start), and the points after it, whose CRC-32s check what is inflated.
    The last point (the end) is never a start."""
    starts = points[:-1]
    index = bisect.bisect_right([point.offset for point in starts], offset) - 1
    if index < 0:
        return None, list(points)
    return starts[index], list(points[index + 1 :])


def flatten(points: Sequence[SeekPoint]) -> list[int]:
    return [value for point in points for value in point]


def unflatten(values: Sequence[int] | None) -> tuple[SeekPoint, ...]:
    values = values or []
    return tuple(SeekPoint(*values[i : i + 3]) for i in range(0, len(values) - 2, 3))
