"""Compressed exports (Accept-Encoding: gzip, zstd), through `exporter serve` on a real socket:
the same bytes as an uncompressed export, still streamed, still aborted on failure, and in
the same memory. The raw bodies are decoded here, by zlib and zstandard, not by httpx."""

import json
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import httpx
import pytest
import zstandard

from exporter.http.compression import (
    GZIP,
    IDENTITY,
    ZSTD,
    choose_coding,
    compressible,
    parse_accept_encoding,
)
from tests.support.database import (
    BIG_ROWS,
    ExportDatabase,
    backend_of,
    export_outcome,
    logged_export,
    run_sql,
)
from tests.support.memory import mapped_files, peak_rss_bytes
from tests.support.server import Server, running_server

CSV = "text/csv; charset=utf-8"


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, IDENTITY),
        ("", IDENTITY),
        ("gzip", GZIP),
        ("GZip", GZIP),
        ("x-gzip", GZIP),
        ("zstd", ZSTD),
        # Ties go to zstd; otherwise the weight decides.
        ("gzip, zstd", ZSTD),
        ("deflate, gzip, br, zstd", ZSTD),  # curl --compressed
        ("gzip, deflate, br", GZIP),  # browsers
        ("  gzip ;  q=0.5 ,zstd;q=0.4", GZIP),
        ("zstd;q=0.4, gzip;Q=0.5", GZIP),
        ("gzip;q=1.0, zstd;q=0.999", GZIP),
        ("gzip;q=0.001", GZIP),
        # q=0: not acceptable.
        ("zstd;q=0, gzip", GZIP),
        ("gzip;q=0", IDENTITY),
        ("gzip;q=0.000, zstd;q=0", IDENTITY),
        ("gzip, gzip;q=0", IDENTITY),
        # identity and *.
        ("identity", IDENTITY),
        ("gzip;q=0.5, identity", IDENTITY),
        ("gzip;q=0.5, identity;q=0.5", GZIP),
        ("identity;q=0, gzip;q=0.1", GZIP),
        ("*", ZSTD),
        ("*;q=0.5, gzip", GZIP),
        ("*;q=0.5, zstd;q=0, gzip;q=0.2", IDENTITY),
        ("*;q=0", IDENTITY),
        ("*;q=0, identity;q=0", IDENTITY),
        # Nothing we offer.
        ("br, deflate, compress", IDENTITY),
        # Garbage: malformed weights are not acceptable, and nothing raises.
        ("gzip;q=abc", IDENTITY),
        ("gzip;q=2", IDENTITY),
        ("gzip;q=-1", IDENTITY),
        ("gzip;q=nan", IDENTITY),
        ("gzip;q=inf", IDENTITY),
        ("gzip;q=1e0", IDENTITY),
        ("gzip;q=", IDENTITY),
        ("gzip;q=abc, zstd;q=0.1", ZSTD),
        ("gzip;level=9", GZIP),
        (";;,, ,;q=1,=,", IDENTITY),
        ("gzip\x00, zst\u00e9", IDENTITY),
    ],
)
def test_choose_coding(header: str | None, chosen: str) -> None:
    assert choose_coding(header, CSV) == chosen


def test_parse_accept_encoding_weights() -> None:
    assert parse_accept_encoding("gzip;q=0.5, ZSTD, identity;q=0, *;q=0.25") == {
        "gzip": 0.5,
        "zstd": 1.0,
        "identity": 0.0,
        "*": 0.25,
    }


def test_event_streams_are_never_compressed() -> None:
    assert not compressible("text/event-stream")
    assert not compressible("Text/Event-Stream; charset=utf-8")
    assert choose_coding("gzip, zstd, *", "text/event-stream") == IDENTITY
    assert compressible(CSV) and compressible("application/x-ndjson")


@pytest.mark.parametrize(
    "header",
    [
        "x," * 200_000 + "gzip",
        "gzip;" + "q=1;" * 100_000,
        "gzip;q=" + "0" * 500_000,
        ";" * 500_000,
        "\u00e9" * 300_000,
    ],
)
def test_hostile_headers_are_cheap(header: str) -> None:
    started = time.perf_counter()
    choose_coding(header, CSV)
    assert time.perf_counter() - started < 0.5


def test_only_the_first_elements_are_read() -> None:
    assert choose_coding("x," * 100 + "gzip", CSV) == IDENTITY


class Decoder:
    """Incremental decoding of a gzip or zstd body, as a client does."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._gzip = zlib.decompressobj(wbits=31) if coding == GZIP else None
        self._zstd = zstandard.ZstdDecompressor().decompressobj() if coding == ZSTD else None

    def feed(self, data: bytes) -> bytes:
        if self._gzip is not None:
            return self._gzip.decompress(data)
        assert self._zstd is not None
        return self._zstd.decompress(data)

    @property
    def ended(self) -> bool:
        """The compressed stream's end (gzip trailer, zstd frame end) arrived, nothing after."""
        if self._gzip is not None:
            return self._gzip.eof and not self._gzip.unused_data
        assert self._zstd is not None
        return self._zstd.eof and not self._zstd.unused_data


def fetch(
    client: httpx.Client, path: str, coding: str, **headers: str
) -> tuple[httpx.Response, bytes]:
    """The response and its body, decoded by Decoder from the raw bytes."""
    with client.stream("GET", path, headers={"Accept-Encoding": coding, **headers}) as response:
        assert response.status_code == 200, response.read()
        if coding == IDENTITY:
            assert "content-encoding" not in response.headers
            return response, b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == coding
        decoder = Decoder(coding)
        body = b"".join(decoder.feed(chunk) for chunk in response.iter_raw())
        assert decoder.ended
    return response, body


@pytest.mark.parametrize("coding", [GZIP, ZSTD])
@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_compressed_export_is_the_same_export(
    server: Server, database: ExportDatabase, coding: str, fmt: str
) -> None:
    path = f"/datasets/small_copy.{fmt}"
    request_id = f"compressed-{fmt}-{coding}-{uuid.uuid4().hex[:8]}"
    with server.client(database.key) as client:
        plain, expected = fetch(client, path, IDENTITY)
        response, body = fetch(client, path, coding, **{"X-Request-Id": request_id})
    assert body == expected
    assert len(expected) > 40 * 65536  # many chunks, each compressed and flushed
    assert response.headers["vary"] == "Accept-Encoding"
    assert plain.headers["vary"] == "Accept-Encoding"
    for header in ("content-type", "cache-control", "x-content-type-options"):
        assert response.headers[header] == plain.headers[header]
    assert response.headers["content-disposition"].startswith('attachment; filename="small_copy-')
    # The export log counts the export's own (uncompressed) bytes.
    logged = logged_export(database.url, request_id)
    assert (logged["outcome"], logged["bytes"]) == ("completed", len(expected))
    assert f"({coding}: " in server.log()


def test_accept_negotiated_export_is_compressed_and_varies_on_both(
    client: httpx.Client,
) -> None:
    _, expected = fetch(client, "/datasets/people.csv", IDENTITY)
    response, body = fetch(client, "/datasets/people", GZIP, Accept="text/csv")
    assert body == expected
    assert {v.strip() for v in response.headers["vary"].split(",")} == {
        "Accept",
        "Accept-Encoding",
    }
    described = client.get("/datasets/people", headers={"Accept-Encoding": "gzip"})
    assert described.headers["content-type"] == "application/json"
    assert "content-encoding" not in described.headers
    assert described.headers["vary"] == "Accept"


def test_q_zero_is_respected(client: httpx.Client) -> None:
    refused = client.get("/datasets/people.csv", headers={"Accept-Encoding": "gzip;q=0, zstd;q=0"})
    assert "content-encoding" not in refused.headers
    assert refused.content.startswith(b"id,name,")
    gzip_only = client.get("/datasets/people.csv", headers={"Accept-Encoding": "zstd;q=0, gzip"})
    assert gzip_only.headers["content-encoding"] == "gzip"


def test_errors_before_the_first_byte_are_not_compressed(client: httpx.Client) -> None:
    response = client.get("/datasets/people.csv?id=eq.abc", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 400
    assert "content-encoding" not in response.headers
    assert response.headers["content-type"] == "application/problem+json"
    assert json.loads(response.content)["invalid-params"][0]["name"] == "id"


def _curl(server: Server, key: str, path: str, *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-H", f"Authorization: Bearer {key}", *options]
        + ["-w", "%{stderr}%header{content-encoding}", f"{server.base_url}{path}"],
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
@pytest.mark.parametrize("coding", [GZIP, ZSTD])
def test_curl_compressed_gets_the_same_bytes(
    server: Server, database: ExportDatabase, fmt: str, coding: str
) -> None:
    path = f"/datasets/small_copy.{fmt}"
    plain = _curl(server, database.key, path)
    assert plain.returncode == 0 and plain.stderr == b"", plain.stderr
    # curl's own --compressed header asks for zstd, gzip, br and deflate; this one only for one.
    compressed = _curl(
        server, database.key, path, "--compressed", "-H", f"Accept-Encoding: {coding}"
    )
    assert compressed.returncode == 0, compressed.stderr
    assert compressed.stderr.decode() == coding
    assert compressed.stdout == plain.stdout
    if coding == ZSTD:
        # What `curl --compressed` gets by itself.
        default = _curl(server, database.key, path, "--compressed")
        assert default.stderr == b"zstd" and default.stdout == plain.stdout


@pytest.mark.parametrize("coding", [GZIP, ZSTD])
def test_compressed_rows_leave_as_they_are_read(
    server: Server, database: ExportDatabase, coding: str
) -> None:
    request_id = f"first-compressed-{coding}-{uuid.uuid4().hex[:8]}"
    headers = {"X-Request-Id": request_id, "Accept-Encoding": coding}
    decoder = Decoder(coding)
    with server.client(database.key) as client:
        with client.stream("GET", "/datasets/big.csv", headers=headers) as r:
            assert r.headers["content-encoding"] == coding
            raw = r.iter_raw()
            first = decoder.feed(next(raw))
            # The first compressed bytes decode to rows while the export still holds its
            # snapshot: every chunk is flushed as it leaves, not held until the end.
            assert first.startswith(b"id,label,amount,at\n1,row 1,")
            active = backend_of(database, request_id)
            assert len(active) == 1 and active[0]["state"] in ("idle in transaction", "active")
            rest = sum(decoder.feed(chunk).count(b"\n") for chunk in raw)
    assert decoder.ended
    assert first.count(b"\n") + rest == BIG_ROWS + 1
    assert export_outcome(database, request_id) == "completed"


@pytest.mark.parametrize("coding", [GZIP, ZSTD])
def test_compressed_failure_after_first_byte_aborts_the_response(
    server: Server, database: ExportDatabase, coding: str
) -> None:
    request_id = f"killed-{coding}-{uuid.uuid4().hex[:8]}"
    headers = {"X-Request-Id": request_id, "Accept-Encoding": coding}
    decoder = Decoder(coding)
    with server.client(database.key) as client:
        with client.stream("GET", "/datasets/big.csv", headers=headers) as r:
            assert r.headers["content-encoding"] == coding
            raw = r.iter_raw()
            decoder.feed(next(raw))
            (backend,) = backend_of(database, request_id)
            run_sql(database.url, f"SELECT pg_terminate_backend({backend['pid']})")
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in raw:
                    decoder.feed(chunk)
    # No terminating chunk, and no end of the compressed stream either.
    assert not decoder.ended
    assert export_outcome(database, request_id) == "failed"


def test_curl_sees_a_failed_gzip_export_as_incomplete(
    server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    request_id = f"killed-curl-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "partial.csv"
    curl = subprocess.Popen(
        ["curl", "-sS", "--noproxy", "*", "--compressed", "-o", str(output)]
        + ["-H", "Accept-Encoding: gzip", "-H", f"X-Request-Id: {request_id}"]
        + ["-H", f"Authorization: Bearer {database.key}", "--limit-rate", "500k"]
        + [f"{server.base_url}/datasets/big.csv"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (output.exists() and output.stat().st_size > 0):
            assert time.monotonic() < deadline and curl.poll() is None, "no bytes arrived"
            time.sleep(0.02)
        (backend,) = backend_of(database, request_id)
        run_sql(database.url, f"SELECT pg_terminate_backend({backend['pid']})")
        _, stderr = curl.communicate(timeout=30)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    # 18: "transfer closed with outstanding read data remaining".
    assert curl.returncode == 18, stderr
    assert output.read_bytes().startswith(b"id,label,amount,at\n1,row 1,")
    assert export_outcome(database, request_id) == "failed"


def test_memory_stays_flat_when_compressing(database: ExportDatabase, tmp_path: Path) -> None:
    with running_server(database.url, tmp_path) as server:
        peaks = {}
        with server.client(database.key) as client:
            client.get("/datasets/people.csv", headers={"Accept-Encoding": "gzip"})
            # zstandard is imported only when a client first asks for zstd.
            assert "zstandard" not in mapped_files(server.process.pid)
            for dataset, rows in (("small_copy", 100_000), ("big", BIG_ROWS)):
                for fmt in ("csv", "ndjson"):
                    for coding in (GZIP, ZSTD):
                        decoder = Decoder(coding)
                        headers = {"Accept-Encoding": coding}
                        path = f"/datasets/{dataset}.{fmt}"
                        with client.stream("GET", path, headers=headers) as response:
                            lines = sum(
                                decoder.feed(chunk).count(b"\n") for chunk in response.iter_raw()
                            )
                        assert decoder.ended
                        assert lines == rows + (1 if fmt == "csv" else 0)
                peaks[dataset] = peak_rss_bytes(server.process.pid)
            assert "zstandard" in mapped_files(server.process.pid)
        growth = peaks["big"] - peaks["small_copy"]
        # As uncompressed (test_memory_stays_flat): one compressor per export, nothing buffered.
        assert growth < 5_000_000, f"peak RSS grew by {growth / 2**20:.1f} MiB"
        assert peaks["big"] < 80_000_000, f"peak RSS {peaks['big'] / 2**20:.1f} MiB"


def test_openapi_documents_the_content_encoding(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for extension in ("csv", "ndjson"):
        ok = spec["paths"][f"/datasets/{{name}}.{extension}"]["get"]["responses"]["200"]
        assert ok["headers"]["Content-Encoding"]["schema"]["enum"] == ["gzip", "zstd"]
