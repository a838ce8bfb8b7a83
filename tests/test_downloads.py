"""Downloads of stored exports through a real uvicorn server on a real socket, with httpx and
curl: both representations, every form of Range, If-Range, conditional requests, HEAD, resumed
downloads, and the file closed when the client leaves."""

import asyncio
import gzip
import os
import random
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from exporter.http.downloads import CACHE_CONTROL, StoredExport, download_response
from exporter.http.middleware import SecurityHeadersMiddleware
from exporter.http.preconditions import (
    format_http_date,
)
from exporter.jobs.seekable_gzip import SeekableGzipWriter, SeekPoint
from exporter.storage.local import LocalStore
from exporter.storage.s3 import Credentials, S3Store
from tests.support.s3 import S3Server
from tests.support.server import free_port

CSV = "text/csv; charset=utf-8"
NDJSON = "application/x-ndjson"
# In the past, with a fraction of a second that Last-Modified drops.
FINISHED = datetime(2026, 1, 7, 14, 0, 0, 750_000, tzinfo=UTC)
LAST_MODIFIED = format_http_date(FINISHED)
IDENTITY = {"Accept-Encoding": "identity"}
GZIP = {"Accept-Encoding": "gzip"}

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")


def awkward_export(seed: int) -> bytes:
    """A few MB that compress very differently part by part: CSV lines with multi-byte UTF-8,
    quotes and CRLF; a run of zeros (inflating a thousandfold); random bytes (not at all);
    bare newlines."""
    rng = random.Random(seed)
    lines = "".join(
        f'{i},"naïve ☃ {rng.random()}","a ""quoted"" value",\U0001f600\r\n' for i in range(30_000)
    ).encode()
    return b"".join(
        [lines[:700_000], bytes(1_500_000), rng.randbytes(1_000_000), b"\n" * 300_001, lines]
    )


def write_gzip(path: Path, data: bytes, *, members: int = 1) -> list[SeekPoint]:
    """`data` as gzip the way a job writes it: zlib at level 1, flushed at irregular points
    (sync and full flushes); several members if asked. The seek points (offsets in `data` and
    in the file of each full flush) of a file of one member."""
    points = []
    written = crc = 0
    rng = random.Random(len(data))
    cuts = sorted(rng.sample(range(1, len(data)), members - 1)) if members > 1 else []
    with path.open("wb") as file:
        for member in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)):
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
            position = 0
            while position < len(member):
                size = rng.randrange(1, 400_000)
                piece = member[position : position + size]
                written += file.write(compressor.compress(piece))
                crc = zlib.crc32(piece, crc)
                mode = rng.choice([zlib.Z_NO_FLUSH, zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH])
                written += file.write(compressor.flush(mode))
                position += size
                if mode == zlib.Z_FULL_FLUSH and members == 1:
                    points.append(SeekPoint(min(position, len(data)), written, crc))
                    crc = 0
            written += file.write(compressor.flush())
    return [*points, SeekPoint(len(data), written, crc)] if members == 1 else []


@dataclass
class Served:
    base_url: str
    exports: dict[str, StoredExport]
    sources: dict[str, bytes]
    directory: Path  # of the gzip files (the local store's, or what was put into S3)
    kind: str  # "directory" or "s3"

    def url(self, name: str) -> str:
        return f"{self.base_url}/exports/{name}/download"

    def gz(self, name: str) -> bytes:
        return (self.directory / self.exports[name].name).read_bytes()


def store(
    directory: Path, name: str, data: bytes, members: int = 1, **overrides: Any
) -> StoredExport:
    path = directory / f"{name}.csv.gz"
    points = write_gzip(path, data, members=members)
    stored = StoredExport(
        store=LocalStore(directory),
        name=path.name,
        identity_length=len(data),
        encoded_length=path.stat().st_size,
        validator=f"{name}-0123abcd",
        last_modified=FINISHED,
        filename=f"{name}-20260107T140000Z.csv",
        media_type=CSV,
        seek_points=tuple(points),
    )
    return replace(stored, **overrides)


def put_in_s3(
    s3_server: S3Server, directory: Path, exports: dict[str, StoredExport]
) -> dict[str, StoredExport]:
    """The exports' files copied into a new bucket; the exports read from it."""
    bucket = s3_server.create_bucket()

    def s3_store() -> S3Store:
        credentials = Credentials(s3_server.ACCESS_KEY_ID, s3_server.SECRET_ACCESS_KEY)
        return S3Store(s3_server.endpoint, bucket, "downloads/", "us-east-1", True, credentials)

    async def upload() -> None:
        uploader = s3_store()
        try:
            for stored in exports.values():
                if (directory / stored.name).exists():
                    part = directory / f"{stored.name}.part"
                    shutil.copyfile(directory / stored.name, part)
                    await uploader.keep(part, stored.name)
        finally:
            await uploader.aclose()

    asyncio.run(upload())
    # Its own client: the server's event loop is not this one.
    reader = s3_store()
    return {name: replace(stored, store=reader) for name, stored in exports.items()}


@pytest.fixture(scope="module", params=["directory", "s3"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The same files served from a local directory, and from an S3-compatible server."""
    directory = tmp_path_factory.mktemp("downloads")
    main = awkward_export(1)
    multi = awkward_export(2)[:2_000_000]
    sources = {"main": main, "multi": multi, "empty": b"", "short": main, "long": main}
    exports = {
        "main": store(directory, "main", main),
        "multi": store(directory, "multi", multi, members=3, media_type=NDJSON),
        "empty": store(directory, "empty", b""),
        "named": store(directory, "named", b"x\n", filename="événements 2026.csv"),
        # Metadata that does not match the file: the response must not end as if complete.
        "short": store(directory, "short", main, identity_length=len(main) + 10),
        "long": store(directory, "long", main, identity_length=len(main) - 10),
    }
    # A damaged CRC-32 in the trailer: the last chunk is held back until it has been checked.
    crc = store(directory, "crc", main)
    with (directory / crc.name).open("r+b") as file:
        file.seek(-8, os.SEEK_END)
        damaged = file.read(1)[0] ^ 0xFF
        file.seek(-8, os.SEEK_END)
        file.write(bytes([damaged]))
    exports["crc"] = crc
    sources["crc"] = main
    # As a job writes it (a seek point every 256 KiB here), with a byte damaged before the
    # second point: a range after it is served whole, inflated from the last point before it.
    seekable = directory / "seekable.csv.gz"
    writer = SeekableGzipWriter(1, every=256 * 1024)
    compressed = b"".join(
        [
            *(writer.compress(main[i : i + 65536]) for i in range(0, len(main), 65536)),
            writer.finish(),
        ]
    )
    assert gzip.decompress(compressed) == main and len(compressed) == writer.size
    second = writer.seek_points[1][1]
    seekable.write_bytes(compressed[: second - 10] + b"\xff" + compressed[second - 9 :])
    exports["seekable"] = replace(
        exports["main"],
        name=seekable.name,
        encoded_length=len(compressed),
        seek_points=tuple(writer.seek_points),
    )
    sources["seekable"] = main
    # More than loopback's socket buffers hold, so that a client leaving finds it mid-file.
    sources["big"] = random.Random(3).randbytes(24 * 1024 * 1024)
    exports["big"] = store(directory, "big", sources["big"])
    exports["gone"] = replace(exports["main"], name="deleted.csv.gz")
    if request.param == "s3":
        s3_server: S3Server = request.getfixturevalue("s3_server")
        exports = put_in_s3(s3_server, directory, exports)

    async def download(request: Request) -> Response:
        return await download_response(request, exports[request.path_params["name"]])

    app = Starlette(
        routes=[Route("/exports/{name}/download", download, methods=["GET", "HEAD"])],
        middleware=[Middleware(SecurityHeadersMiddleware)],
    )
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", exports, sources, directory, request.param)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def raw(http: httpx.Client, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    """The response with its body as sent (not decoded)."""
    with http.stream(method, url, headers=headers) as response:
        response._content = b"".join(response.iter_raw())
    return response


def test_identity_download(served: Served, http: httpx.Client) -> None:
    stored = served.exports["main"]
    response = http.get(served.url("main"), headers=IDENTITY)
    assert response.status_code == 200
    assert response.content == served.sources["main"]
    headers = response.headers
    assert headers["content-length"] == str(stored.identity_length)
    assert headers["etag"] == '"main-0123abcd"'
    assert "content-encoding" not in headers
    assert headers["content-type"] == CSV
    assert headers["last-modified"] == LAST_MODIFIED == "Wed, 07 Jan 2026 14:00:00 GMT"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["accept-ranges"] == "bytes"
    assert headers["cache-control"] == CACHE_CONTROL
    assert headers["content-disposition"] == (
        "attachment; filename=\"main-20260107T140000Z.csv\"; filename*=UTF-8''"
        "main-20260107T140000Z.csv"
    )
    assert headers["x-content-type-options"] == "nosniff"


def test_gzip_download_is_the_file(served: Served, http: httpx.Client) -> None:
    response = raw(http, "GET", served.url("main"), GZIP)
    assert response.status_code == 200
    assert response.content == served.gz("main")
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(served.exports["main"].encoded_length)
    assert response.headers["etag"] == '"main-0123abcd-gzip"'
    # The same name: the coding is the message's, and the client decodes it.
    assert 'main-20260107T140000Z.csv"' in response.headers["content-disposition"]
    assert zlib.decompress(response.content, 31) == served.sources["main"]
    decoded = http.get(served.url("main"), headers=GZIP)
    assert decoded.content == served.sources["main"]


def test_several_gzip_members_decode_whole(served: Served, http: httpx.Client) -> None:
    response = http.get(served.url("multi"), headers=IDENTITY)
    assert response.content == served.sources["multi"]
    assert response.headers["content-type"] == NDJSON
    middle = len(served.sources["multi"]) // 2
    ranged = http.get(served.url("multi"), headers={**IDENTITY, "Range": f"bytes={middle}-"})
    assert ranged.status_code == 206
    assert ranged.content == served.sources["multi"][middle:]


@pytest.mark.parametrize(
    ("accept_encoding", "coding"),
    [
        ("gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("GZIP;q=0.1", "gzip"),
        ("*", "gzip"),
        ("zstd, gzip, br", "gzip"),
        ("gzip, identity", "gzip"),
        ("identity", None),
        ("zstd, br", None),
        ("gzip;q=0", None),
        ("*;q=0, identity", None),
        ("gzip;q=0.5, identity", None),
        ("gzip;q=0.5, *;q=0.8", None),
        ("", None),
    ],
)
def test_accept_encoding_chooses(
    served: Served, http: httpx.Client, accept_encoding: str, coding: str | None
) -> None:
    response = http.head(served.url("main"), headers={"Accept-Encoding": accept_encoding})
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == coding
    stored = served.exports["main"]
    length = stored.encoded_length if coding else stored.identity_length
    assert response.headers["content-length"] == str(length)


def range_cases(length: int) -> list[tuple[str, int, int]]:
    """Range values and the span [start, end) each asks for."""
    return [
        ("bytes=0-0", 0, 1),
        ("bytes=0-99", 0, 100),
        ("bytes=100-", 100, length),
        ("bytes=700000-2199999", 700_000, 2_200_000),  # the zeros, within the length
        ("bytes=2199990-2200009", 2_199_990, 2_200_010),  # the end of the zeros
        (f"bytes={length - 1}-", length - 1, length),
        (f"bytes={length - 1}-{length + 1000}", length - 1, length),
        ("bytes=5-99999999999999999999999999999", 5, length),
        ("bytes=-1", length - 1, length),
        ("bytes=-500", length - 500, length),
        (f"bytes=-{length}", 0, length),
        (f"bytes=-{length * 2}", 0, length),
        ("Bytes=10-19", 10, 20),
        ("bytes=10-19,", 10, 20),
        ("bytes= 10-19", 10, 20),
        ("bytes=0000000000000000000000000012-13", 12, 14),
    ]


@pytest.mark.parametrize("coding", ["identity", "gzip"])
def test_ranges(served: Served, http: httpx.Client, coding: str) -> None:
    whole = served.sources["main"] if coding == "identity" else served.gz("main")
    length = len(whole)
    for value, start, end in range_cases(length):
        if end > length:
            continue  # the zeros' span on the (shorter) gzip file
        response = raw(http, "GET", served.url("main"), {"Accept-Encoding": coding, "Range": value})
        assert response.status_code == 206, value
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{length}", value
        assert response.headers["content-length"] == str(end - start)
        assert response.content == whole[start:end], value
        assert response.headers.get("content-encoding") == (coding if coding == "gzip" else None)
        assert response.headers["etag"] == (
            '"main-0123abcd-gzip"' if coding == "gzip" else '"main-0123abcd"'
        )


@pytest.mark.parametrize(
    "value",
    [
        "bytes=abc",
        "bytes=10-5",
        "bytes=",
        "bytes=-",
        "bytes=5",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes 0-5",
        "0-5",
        "items=0-5",
        "bytes=0-5,10-20",  # several ranges: ignored, by choice
        "bytes=0-0,-1",
        f"bytes={10**9}-,0-0",
    ],
)
def test_malformed_or_multiple_ranges_get_everything(
    served: Served, http: httpx.Client, value: str
) -> None:
    response = http.get(served.url("main"), headers={**IDENTITY, "Range": value})
    assert response.status_code == 200
    assert "content-range" not in response.headers
    assert response.content == served.sources["main"]


@pytest.mark.parametrize("coding", ["identity", "gzip"])
def test_unsatisfiable_range(served: Served, http: httpx.Client, coding: str) -> None:
    stored = served.exports["main"]
    length = stored.identity_length if coding == "identity" else stored.encoded_length
    for value in (f"bytes={length}-", f"bytes={length + 100}-{length + 200}", "bytes=-0"):
        response = http.get(served.url("main"), headers={"Accept-Encoding": coding, "Range": value})
        assert response.status_code == 416, value
        assert response.headers["content-range"] == f"bytes */{length}"
        assert response.headers["content-type"] == "application/problem+json"
        assert "content-encoding" not in response.headers
        assert response.json()["status"] == 416


def test_range_on_an_empty_export_is_ignored(served: Served, http: httpx.Client) -> None:
    for value in ("bytes=0-", "bytes=-5"):
        response = http.get(served.url("empty"), headers={**IDENTITY, "Range": value})
        assert (response.status_code, response.content) == (200, b"")
        assert response.headers["content-length"] == "0"
    assert http.get(served.url("empty"), headers=GZIP).content == b""


def test_if_range(served: Served, http: httpx.Client) -> None:
    source = served.sources["main"]
    earlier = format_http_date(FINISHED - timedelta(seconds=1))
    cases = [
        ('"main-0123abcd"', 206),
        ('"main-0123abcd-gzip"', 200),  # the other representation's
        ('W/"main-0123abcd"', 200),  # weak: never for a range
        ('"other"', 200),
        (LAST_MODIFIED, 206),
        (earlier, 200),
        ("not a validator", 200),
    ]
    for if_range, status in cases:
        headers = {**IDENTITY, "Range": "bytes=100-199", "If-Range": if_range}
        response = http.get(served.url("main"), headers=headers)
        assert response.status_code == status, if_range
        assert response.content == (source[100:200] if status == 206 else source)
    gzip = raw(
        http,
        "GET",
        served.url("main"),
        {**GZIP, "Range": "bytes=10-19", "If-Range": '"main-0123abcd-gzip"'},
    )
    assert (gzip.status_code, gzip.content) == (206, served.gz("main")[10:20])
    # Without Range, If-Range means nothing.
    alone = http.get(served.url("main"), headers={**IDENTITY, "If-Range": '"other"'})
    assert alone.status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-None-Match": '"main-0123abcd"'}, 304),
        ({"If-None-Match": 'W/"main-0123abcd"'}, 304),  # weak comparison
        ({"If-None-Match": '"x", "main-0123abcd"'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"main-0123abcd-gzip"'}, 200),
        ({"If-None-Match": '"x"'}, 200),
        ({"If-None-Match": "main-0123abcd"}, 200),  # malformed: no tags
        ({"If-Modified-Since": LAST_MODIFIED}, 304),
        ({"If-Modified-Since": "Thu, 01 Jan 2099 00:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Wed, 07 Jan 2026 13:59:59 GMT"}, 200),
        ({"If-Modified-Since": "Wednesday, 07-Jan-26 14:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Wed Jan  7 14:00:00 2026"}, 304),
        ({"If-Modified-Since": "yesterday"}, 200),
        # If-None-Match wins over If-Modified-Since, either way.
        ({"If-None-Match": '"x"', "If-Modified-Since": LAST_MODIFIED}, 200),
        ({"If-None-Match": '"main-0123abcd"', "If-Modified-Since": "Jan 1 2000"}, 304),
        ({"If-Match": '"main-0123abcd"'}, 200),
        ({"If-Match": '"x", "main-0123abcd"'}, 200),
        ({"If-Match": "*"}, 200),
        ({"If-Match": 'W/"main-0123abcd"'}, 412),  # strong comparison
        ({"If-Match": '"main-0123abcd-gzip"'}, 412),
        ({"If-Match": "garbage"}, 412),
        ({"If-Unmodified-Since": LAST_MODIFIED}, 200),
        ({"If-Unmodified-Since": "Wed, 07 Jan 2026 13:59:59 GMT"}, 412),
        ({"If-Unmodified-Since": "never"}, 200),
        # If-Match first; If-Unmodified-Since only without it.
        ({"If-Match": '"x"', "If-None-Match": '"main-0123abcd"'}, 412),
        ({"If-Match": '"main-0123abcd"', "If-Unmodified-Since": "Jan 1 2000 00:00:00"}, 200),
        ({"If-Unmodified-Since": "Jan 1 2000 00:00:00", "If-None-Match": "*"}, 412),
        # Before any range.
        ({"If-None-Match": '"main-0123abcd"', "Range": "bytes=0-9"}, 304),
        ({"If-Match": '"x"', "Range": "bytes=0-9"}, 412),
        ({"If-Match": '"main-0123abcd"', "Range": "bytes=0-9"}, 206),
    ],
)
def test_conditional_requests(
    served: Served, http: httpx.Client, headers: dict[str, str], status: int
) -> None:
    for method in ("GET", "HEAD"):
        response = http.request(method, served.url("main"), headers={**IDENTITY, **headers})
        # HEAD ignores Range.
        assert response.status_code == (200 if status == 206 and method == "HEAD" else status)
        if status == 304:
            assert response.content == b""
            assert response.headers["etag"] == '"main-0123abcd"'
            assert response.headers["vary"] == "Accept-Encoding"
            assert response.headers["cache-control"] == CACHE_CONTROL
            assert response.headers["last-modified"] == LAST_MODIFIED
            assert "content-length" not in response.headers
        if status == 412 and method == "GET":
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 412


def test_not_modified_per_representation(served: Served, http: httpx.Client) -> None:
    headers = {**GZIP, "If-None-Match": '"main-0123abcd", "main-0123abcd-gzip"'}
    response = http.get(served.url("main"), headers=headers)
    assert response.status_code == 304
    assert response.headers["etag"] == '"main-0123abcd-gzip"'
    identity_etag = http.get(
        served.url("main"), headers={**GZIP, "If-None-Match": '"main-0123abcd"'}
    )
    assert identity_etag.status_code == 200


@pytest.mark.parametrize("accept_encoding", ["identity", "gzip"])
def test_head_is_get_without_body(served: Served, http: httpx.Client, accept_encoding: str) -> None:
    headers = {"Accept-Encoding": accept_encoding}
    head = raw(http, "HEAD", served.url("main"), headers)
    get = raw(http, "GET", served.url("main"), headers)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert {**head.headers, "date": ""} == {**get.headers, "date": ""}
    # Range is for GET only (RFC 9110 §14.2).
    ranged = http.head(served.url("main"), headers={**headers, "Range": "bytes=0-9"})
    assert ranged.status_code == 200
    assert ranged.headers["content-length"] == get.headers["content-length"]


def test_unicode_filename(served: Served, http: httpx.Client) -> None:
    response = http.get(served.url("named"), headers=IDENTITY)
    assert response.content == b"x\n"
    assert response.headers["content-disposition"] == (
        'attachment; filename="_v_nements_2026.csv"; '
        "filename*=UTF-8''%C3%A9v%C3%A9nements%202026.csv"
    )


def test_deleted_file_is_gone(served: Served, http: httpx.Client) -> None:
    response = http.get(served.url("gone"), headers=IDENTITY)
    assert response.status_code == 410
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("name", ["short", "long", "crc"])
def test_a_file_not_as_its_metadata_says_aborts(
    served: Served, http: httpx.Client, name: str
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(served.url(name), headers=IDENTITY)
    # What is sent before the damage is found is the export's.
    start = http.get(served.url(name), headers={**IDENTITY, "Range": "bytes=0-99"})
    assert (start.status_code, start.content) == (206, served.sources[name][:100])


def test_a_range_inflates_from_the_last_seek_point(served: Served, http: httpx.Client) -> None:
    points = served.exports["seekable"].seek_points
    assert len(points) > 10
    source = served.sources["seekable"]
    for start in (points[1][0], points[1][0] + 1, points[5][0] - 1, len(source) - 1):
        end = min(start + 300_000, len(source))
        response = raw(
            http, "GET", served.url("seekable"), {**IDENTITY, "Range": f"bytes={start}-"}
        )
        assert (response.status_code, response.content) == (206, source[start:]), start
        response = raw(
            http, "GET", served.url("seekable"), {**IDENTITY, "Range": f"bytes={start}-{end - 1}"}
        )
        assert response.content == source[start:end], start
    # From before the damage, inflating meets it: the transfer is cut, also for a range that
    # ends inside the damaged segment (its end is inflated to check its CRC-32) or at its end.
    damaged = points[1].offset  # the damage is in the segment that ends here
    for value in (
        f"bytes={points[0].offset}-",
        f"bytes=0-{damaged - 1}",
        f"bytes={points[0].offset + 5}-{points[0].offset + 10}",
        f"bytes=0-{damaged + 5}",
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(served.url("seekable"), headers={**IDENTITY, "Range": value})
    # A range in an intact segment is checked, and served.
    intact = raw(http, "GET", served.url("seekable"), {**IDENTITY, "Range": "bytes=10-99"})
    assert (intact.status_code, intact.content) == (206, source[10:100])


def open_descriptors(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
@pytest.mark.parametrize("accept_encoding", ["identity", "gzip"])
def test_file_closed_when_the_client_leaves(served: Served, accept_encoding: str) -> None:
    if served.kind != "directory":
        pytest.skip("about a local file's descriptor")
    path = served.directory / served.exports["big"].name
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "GET", served.url("big"), headers={"Accept-Encoding": accept_encoding}
        ) as response:
            # Kept: a generator dropped here would be closed, and close the connection.
            chunks = response.iter_raw(16 * 1024)
            next(chunks)
            assert open_descriptors(path) == 1  # the server (in this process) streams from it
        # Left with most of the body unread: the connection is closed.
    deadline = time.monotonic() + 10
    while open_descriptors(path):
        assert time.monotonic() < deadline, "the file stayed open"
        time.sleep(0.02)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60, check=False)


@needs_curl
def test_curl_downloads(served: Served, tmp_path: Path) -> None:
    plain, compressed = tmp_path / "plain.csv", tmp_path / "compressed.csv"
    assert curl("-f", "-o", str(plain), served.url("main")).returncode == 0
    assert plain.read_bytes() == served.sources["main"]
    # curl --compressed asks for several codings, gzip among them, and decodes.
    assert curl("-f", "--compressed", "-o", str(compressed), served.url("main")).returncode == 0
    assert compressed.read_bytes() == served.sources["main"]
    ranged = curl("-f", "-r", "1000-1999", served.url("main"))
    assert ranged.stdout == served.sources["main"][1000:2000]


@needs_curl
@pytest.mark.parametrize("cut", [1, 700_003, 2_200_000, 3_333_333, -1, 0])
def test_curl_resumes_a_cut_download(served: Served, tmp_path: Path, cut: int) -> None:
    """A file holding the first bytes of the export (the rest lost) is completed by
    `curl -C -`: the identity representation from the file's length on. Cut 0 of the end:
    the file is complete, and curl says so (a 416 it does not count as an error)."""
    source = served.sources["main"]
    partial = tmp_path / "partial.csv"
    partial.write_bytes(source[: cut if cut > 0 else len(source) + cut])
    # -f would make curl 7.88 fail (22) on the complete file's 416, which without it curl
    # reads as "already downloaded".
    fail = ("-f",) if cut else ()
    result = curl(*fail, "-C", "-", "-o", str(partial), served.url("main"))
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == source


@needs_curl
def test_curl_resumes_a_gzip_download(served: Served, tmp_path: Path) -> None:
    """A client that keeps the gzip bytes resumes them as a range of the file itself."""
    gz = served.gz("main")
    partial = tmp_path / "partial.csv.gz"
    partial.write_bytes(gz[: len(gz) // 3])
    args = ("-f", "-H", "Accept-Encoding: gzip", "-C", "-", "-o", str(partial))
    assert curl(*args, served.url("main")).returncode == 0
    assert partial.read_bytes() == gz


@needs_curl
def test_curl_killed_mid_download_then_resumed(served: Served, tmp_path: Path) -> None:
    # Larger than loopback's socket buffers: curl's --limit-rate paces its reads, and a file
    # that fits in the buffers can arrive whole before it is killed.
    source = served.sources["big"]
    partial = tmp_path / "partial.csv"
    slow = subprocess.Popen(
        ["curl", "-sS", "--limit-rate", "500K", "-o", str(partial), served.url("big")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not partial.exists() or partial.stat().st_size < 300_000:
            assert time.monotonic() < deadline and slow.poll() is None
            time.sleep(0.02)
    finally:
        slow.kill()
        slow.wait()
    assert 0 < partial.stat().st_size < len(source)
    result = curl("-f", "-C", "-", "-o", str(partial), served.url("big"))
    assert result.returncode == 0, result.stderr
    assert partial.read_bytes() == source
