"""exporter/jobs/seekable_gzip.py on its own: the writer's gzip and its seek points, inflating
from a point, choosing the point for an offset, and the points as the jobs table stores them.
Downloads that inflate from a point, through a socket, are tests/test_downloads.py."""

import gzip
import random
import zlib

import pytest

from exporter.jobs.seekable_gzip import (
    RAW_WBITS,
    SeekableGzipWriter,
    SeekPoint,
    flatten,
    seek_from,
    unflatten,
)

EVERY = 64 * 1024


def sample(size: int = 1_000_000, seed: int = 5) -> bytes:
    """CSV-like lines, a run of zeros and random bytes: parts that compress very differently."""
    rng = random.Random(seed)
    lines = b"".join(b"%d,naive \xe2\x98\x83 %f\r\n" % (i, rng.random()) for i in range(20_000))
    data = lines + bytes(200_000) + rng.randbytes(150_000) + lines
    return data[:size]


def written(data: bytes, piece: int = 10_000) -> tuple[bytes, SeekableGzipWriter]:
    writer = SeekableGzipWriter(1, every=EVERY)
    pieces = [writer.compress(data[i : i + piece]) for i in range(0, len(data), piece)]
    return b"".join([*pieces, writer.finish()]), writer


def test_the_file_is_plain_gzip_of_the_input() -> None:
    data = sample()
    compressed, writer = written(data)
    assert gzip.decompress(compressed) == data
    assert writer.size == len(compressed)


def test_seek_points_are_every_so_often_and_the_last_is_the_end() -> None:
    data = sample()
    compressed, writer = written(data, piece=10_000)
    points = writer.seek_points
    assert len(points) > 10
    offsets = [point.offset for point in points]
    assert offsets == sorted(set(offsets))
    # A point once `every` bytes have gone in since the last (at a piece's end, so no later
    # than a piece after).
    gaps = [b - a for a, b in zip([0, *offsets[:-2]], offsets[:-1], strict=True)]
    assert all(EVERY <= gap < EVERY + 10_000 for gap in gaps), gaps
    assert len(data) - offsets[-2] < EVERY + 10_000
    assert (points[-1].offset, points[-1].file_offset) == (len(data), len(compressed))


def test_inflating_from_any_point_gives_the_same_bytes_and_its_crc() -> None:
    data = sample()
    compressed, writer = written(data, piece=7_777)
    starts = [SeekPoint(0, 0, 0), *writer.seek_points[:-1]]
    for start, end in zip(starts, writer.seek_points, strict=True):
        if start.file_offset == 0:
            inflater = zlib.decompressobj(wbits=31)  # the file's start: the gzip header
        else:
            inflater = zlib.decompressobj(wbits=RAW_WBITS)
        segment = inflater.decompress(compressed[start.file_offset : end.file_offset])
        assert segment == data[start.offset : end.offset]
        # Each point carries the CRC-32 of the segment it ends.
        assert zlib.crc32(segment) == end.crc32
    # From a point to the end of the file: the rest of the export, then the gzip trailer.
    middle = writer.seek_points[len(writer.seek_points) // 2]
    inflater = zlib.decompressobj(wbits=RAW_WBITS)
    assert inflater.decompress(compressed[middle.file_offset :]) == data[middle.offset :]
    assert inflater.eof and len(inflater.unused_data) == 8


def test_an_empty_export_is_one_point_at_the_end() -> None:
    writer = SeekableGzipWriter(6)
    compressed = writer.finish()
    assert gzip.decompress(compressed) == b""
    assert writer.seek_points == [SeekPoint(0, len(compressed), 0)]
    assert seek_from(writer.seek_points, 0) == (None, writer.seek_points)


POINTS = [SeekPoint(100, 40, 1), SeekPoint(200, 80, 2), SeekPoint(250, 95, 3)]


@pytest.mark.parametrize(
    ("offset", "start", "after"),
    [
        (0, None, POINTS),
        (99, None, POINTS),
        (100, POINTS[0], POINTS[1:]),
        (199, POINTS[0], POINTS[1:]),
        (200, POINTS[1], POINTS[2:]),
        # The last point is the end, never a start.
        (249, POINTS[1], POINTS[2:]),
        (250, POINTS[1], POINTS[2:]),
    ],
)
def test_seek_from_starts_at_the_last_point_at_or_before_the_offset(
    offset: int, start: SeekPoint | None, after: list[SeekPoint]
) -> None:
    assert seek_from(POINTS, offset) == (start, after)


def test_points_flatten_for_the_jobs_table_and_come_back() -> None:
    assert flatten(POINTS) == [100, 40, 1, 200, 80, 2, 250, 95, 3]
    assert unflatten(flatten(POINTS)) == tuple(POINTS)
    assert unflatten(None) == unflatten([]) == ()
    _, writer = written(sample(300_000))
    assert unflatten(flatten(writer.seek_points)) == tuple(writer.seek_points)
