"""Limits, through real servers: concurrent exports per key and in total (counted by PostgreSQL,
so across worker processes and replicas), per-export caps, and slow clients."""

import contextlib
import csv
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.database import ExportDatabase, logged_export, new_key, run_sql
from tests.support.server import Server, running_server


@contextlib.contextmanager
def held_export(server: Server, key: str, request_id: str) -> Iterator[int]:
    """An export of the million-row table that has started and is not read any further: it
    holds its slot (and its snapshot) until the client leaves. Yields the client's port."""
    with server.client(key) as client:
        headers = {"X-Request-Id": request_id}
        with client.stream("GET", "/datasets/big.csv", headers=headers) as response:
            assert response.status_code == 200, response.read()
            # Kept: a dropped iterator closes the response.
            raw = response.iter_raw()
            next(raw)
            _, port = response.extensions["network_stream"].get_extra_info("client_addr")
            yield port


def refused(response: httpx.Response, scope_words: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
    assert scope_words in response.json()["detail"]


def export_status(server: Server, key: str, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    with server.client(key) as client:
        return client.get("/datasets/people.csv", headers=headers)


def admitted_within(server: Server, key: str, seconds: float) -> float:
    """How long it took until an export of the key was admitted again."""
    started = time.monotonic()
    while True:
        response = export_status(server, key)
        if response.status_code == 200:
            return time.monotonic() - started
        assert response.status_code == 429, response.text
        assert time.monotonic() - started < seconds, "the slot was not released"
        time.sleep(0.05)


def test_a_keys_third_export_waits_for_one_of_its_two(
    database: ExportDatabase, tmp_path: Path
) -> None:
    key, other = new_key(database.url), new_key(database.url)
    with running_server(database.url, tmp_path) as server:
        request_id = f"third-{uuid.uuid4().hex[:8]}"
        with held_export(server, key, "hold-1"), held_export(server, key, "hold-2"):
            refused(export_status(server, key, request_id), "this key")
            # Another key is not held back by this one's exports.
            assert export_status(server, other).status_code == 200
        # The refusal is in the export log, with the key's name and the status.
        logged = logged_export(database.url, request_id)
        assert (logged["outcome"], logged["status"], logged["dataset"]) == (
            "refused",
            429,
            "people",
        )
        assert logged["key_name"].startswith("key-")
        # The held exports ended when their clients left, and freed their slots at once.
        assert admitted_within(server, key, seconds=3) < 3
        for held in ("hold-1", "hold-2"):
            assert logged_export(database.url, held)["outcome"] == "disconnected"


def test_the_service_wide_limit(database: ExportDatabase, tmp_path: Path) -> None:
    first, second = new_key(database.url), new_key(database.url)
    with running_server(database.url, tmp_path, max_exports="1") as server:
        with held_export(server, first, "total-hold"):
            refused(export_status(server, second), "the service")
        admitted_within(server, second, seconds=3)


def test_a_process_runs_every_export_the_service_admits(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """Issue 14, defect 12: with EXPORTER_MAX_EXPORTS above the pool size, one process admitted
    more exports than its pool held, and answered 503 "every export connection is busy" while
    the service-wide limit had room. The pool now holds what the service admits, plus the
    one connection that is told 429 at once."""
    keys = [new_key(database.url) for _ in range(5)]
    with running_server(
        database.url, tmp_path, pool_size="2", max_exports="4", pool_timeout_s="0.5"
    ) as server:
        with contextlib.ExitStack() as held:
            for index, key in enumerate(keys[:4]):
                held.enter_context(held_export(server, key, f"pool-{index}-{uuid.uuid4().hex}"))
            started = time.monotonic()
            refused(export_status(server, keys[4]), "the service")
            assert time.monotonic() - started < 0.5  # the slots', not a wait for a connection
        admitted_within(server, keys[4], seconds=3)


def test_slots_are_released_when_exports_complete_or_fail(
    database: ExportDatabase, tmp_path: Path
) -> None:
    key = new_key(database.url)
    with running_server(database.url, tmp_path, max_exports_per_key="1") as server:
        # Completed exports, one after another, never find their own slot still taken.
        for _ in range(5):
            assert export_status(server, key).status_code == 200
        # Nor after a refusal of the query (a 400) or a failure before the first byte.
        with server.client(key) as client:
            assert client.get("/datasets/people.csv?nope=eq.1").status_code == 400
            assert client.get("/datasets/people.csv?age=eq.x").status_code == 400
        assert export_status(server, key).status_code == 200


def _worker_of(server: Server, client_port: int) -> int:
    """The pid of the worker process running an export: the one serving the HTTP connection
    from `client_port` (a direct export runs in the worker that accepted its request). Not
    found through the export's database connection, whose client port only TCP has."""
    server_port = int(server.base_url.rpartition(":")[2])
    for worker in psutil.Process(server.process.pid).children(recursive=True):
        for c in worker.net_connections("tcp"):
            if c.laddr.port == server_port and c.raddr and c.raddr.port == client_port:
                return int(worker.pid)
    raise AssertionError(f"no worker serves the connection from port {client_port}")


def test_the_per_key_limit_holds_across_worker_processes(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """Two exports of a key, each in a different worker process: a counter in a process would
    see one export and admit a third; the slots in PostgreSQL refuse it, in either worker."""
    key = new_key(database.url)
    with running_server(database.url, tmp_path, workers=2) as server:
        with contextlib.ExitStack() as holds:
            first_worker = _worker_of(server, holds.enter_context(held_export(server, key, "w-0")))
            # Which worker accepts a connection is the kernel's choice: try until the second
            # held export runs in the other worker.
            for attempt in range(1, 40):
                with contextlib.ExitStack() as trial:
                    port = trial.enter_context(held_export(server, key, f"w-{attempt}"))
                    if _worker_of(server, port) != first_worker:
                        holds.enter_context(trial.pop_all())
                        break
                admitted_within(server, key, seconds=3)
            else:
                pytest.fail("every export ran in the same worker process")
            for _ in range(6):  # each on a new connection: both workers answer some
                refused(export_status(server, key), "this key")


def test_the_per_key_limit_holds_across_replicas(database: ExportDatabase, tmp_path: Path) -> None:
    key = new_key(database.url)
    with (
        running_server(database.url, tmp_path) as replica_a,
        running_server(database.url, tmp_path) as replica_b,
    ):
        with held_export(replica_a, key, "r-a"), held_export(replica_b, key, "r-b"):
            refused(export_status(replica_a, key), "this key")
            refused(export_status(replica_b, key), "this key")


# --- per-export caps -------------------------------------------------------------------------


def read_until_cut(server: Server, key: str, path: str, request_id: str) -> bytes:
    """The body as far as it came; the test fails unless the response was cut off."""
    received = bytearray()
    with server.client(key) as client:
        with client.stream("GET", path, headers={"X-Request-Id": request_id}) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in response.iter_raw():
                    received += chunk
    return bytes(received)


@pytest.mark.parametrize("use_copy", ["true", "false"])
def test_max_rows_aborts_an_export_that_would_pass_it(
    database: ExportDatabase, tmp_path: Path, use_copy: str
) -> None:
    key = new_key(database.url)
    with running_server(database.url, tmp_path, max_rows="1000", use_copy=use_copy) as server:
        for fmt, header_lines in (("csv", 1), ("ndjson", 0)):
            request_id = f"max-rows-{fmt}-{use_copy}"
            body = read_until_cut(server, key, f"/datasets/big.{fmt}", request_id)
            # The cap's rows, whole, and not a byte more; never a complete-looking file.
            assert body.count(b"\n") - header_lines == 1000 and body.endswith(b"\n")
            logged = logged_export(database.url, request_id)
            assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "max_rows")
            assert "more than 1000 rows" in logged["error"]
            # Exactly at the cap is complete; one row more is not.
            with server.client(key) as client:
                exact = client.get(f"/datasets/big.{fmt}", params={"limit": "1000"})
                assert exact.status_code == 200
                assert exact.content.count(b"\n") - header_lines == 1000
            read_until_cut(server, key, f"/datasets/big.{fmt}?limit=1001", f"{request_id}-1001")


@pytest.mark.parametrize("use_copy", ["true", "false"])
def test_max_rows_counts_rows_not_line_breaks(
    database: ExportDatabase, tmp_path: Path, use_copy: str
) -> None:
    # people has 5 rows; the last holds a line break inside a field: 6 lines of data.
    key = new_key(database.url)
    with running_server(database.url, tmp_path, max_rows="5", use_copy=use_copy) as server:
        with server.client(key) as client:
            response = client.get("/datasets/people.csv")
            assert response.status_code == 200 and b"multi\nline" in response.content
    with running_server(database.url, tmp_path, max_rows="2", use_copy=use_copy) as server:
        # Newest first, the two-line row leads: the cut falls after the second row, not the
        # second line.
        for crlf in ("false", "true"):
            path = f"/datasets/people.csv?order=id.desc&crlf={crlf}"
            body = read_until_cut(server, key, path, f"cut-2-{crlf}-{use_copy}")
            rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
            assert [row[0] for row in rows] == ["id", "5", "4"]
            assert rows[1][1] == "multi\nline"
            assert body.endswith(b"\r\n" if crlf == "true" else b"\n")


def test_max_bytes_aborts_before_sending_more(database: ExportDatabase, tmp_path: Path) -> None:
    key = new_key(database.url)
    with running_server(database.url, tmp_path, max_bytes="100000") as server:
        body = read_until_cut(server, key, "/datasets/big.ndjson", "max-bytes")
        assert len(body) <= 100_000
        for line in body.splitlines()[:-1]:
            json.loads(line)
        logged = logged_export(database.url, "max-bytes")
        assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "max_bytes")
        with server.client(key) as client:
            assert client.get("/datasets/people.ndjson").status_code == 200


def test_max_seconds_aborts_a_long_export(database: ExportDatabase, tmp_path: Path) -> None:
    key = new_key(database.url)
    with running_server(database.url, tmp_path, max_seconds="1") as server:
        with server.client(key) as client:
            headers = {"X-Request-Id": "max-seconds"}
            with client.stream("GET", "/datasets/big.csv", headers=headers) as response:
                raw = response.iter_raw()
                next(raw)
                started = time.monotonic()
                # The client stops reading; a second later the export lets go of PostgreSQL.
                assert backend_gone(database, "max-seconds", seconds=4)
                assert time.monotonic() - started < 4
                # What was already in the socket's buffers still arrives, then the cut.
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in raw:
                        pass
        logged = logged_export(database.url, "max-seconds")
        assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "max_seconds")
        assert "longer than 1 s" in logged["error"]
        admitted_within(server, key, seconds=3)


def test_max_seconds_holds_before_the_first_rows(database: ExportDatabase, tmp_path: Path) -> None:
    """A query that has not given its first rows within EXPORTER_MAX_SECONDS is answered
    then, with an error (nothing has been sent), and lets go of PostgreSQL."""
    view = f"late_{uuid.uuid4().hex[:8]}"
    run_sql(database.url, f"CREATE VIEW public.{view} AS SELECT pg_sleep(30) IS NULL AS slept")
    key = new_key(database.url)
    try:
        with running_server(database.url, tmp_path, max_seconds="1") as server:
            with server.client(key) as client:
                started = time.monotonic()
                response = client.get(f"/datasets/{view}.csv", headers={"X-Request-Id": "late"})
                assert time.monotonic() - started < 5
                assert response.status_code == 503, response.text
                assert response.json()["detail"] == (
                    "max_seconds: the export ran longer than 1 s before its first rows"
                )
            assert backend_gone(database, "late", seconds=4)
            logged = logged_export(database.url, "late")
            assert (logged["outcome"], logged["status"], logged["aborted_by"]) == (
                "aborted",
                503,
                "max_seconds",
            )
            admitted_within(server, key, seconds=3)
    finally:
        run_sql(database.url, f"DROP VIEW public.{view}")


def test_a_slow_client_is_cut_off(database: ExportDatabase, tmp_path: Path) -> None:
    key = new_key(database.url)
    settings = {"min_bytes_per_second": "1000000", "min_rate_window_s": "2"}
    with running_server(database.url, tmp_path, 1, **settings) as server:
        started = time.monotonic()
        with server.client(key) as client:
            headers = {"X-Request-Id": "slow-client"}
            with client.stream("GET", "/datasets/big.csv", headers=headers) as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in response.iter_raw(16384):
                        time.sleep(0.1)  # 160 KB/s, under the minimum
        assert time.monotonic() - started < 30
        logged = logged_export(database.url, "slow-client")
        assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "min_bytes_per_second")
        assert backend_gone(database, "slow-client")
        # A client that keeps up, under the same rule, gets everything.
        with server.client(key) as client:
            response = client.get("/datasets/big.csv", headers={"X-Request-Id": "fast-client"})
            assert response.status_code == 200
        assert logged_export(database.url, "fast-client")["outcome"] == "completed"


def test_a_slow_database_is_not_the_clients_fault(database: ExportDatabase, tmp_path: Path) -> None:
    """The client reads all there is; PostgreSQL is what is slow. Nothing is cut off."""
    run_sql(
        database.url,
        "CREATE VIEW public.trickle AS SELECT i, pg_sleep(0.002) IS NULL AS slept"
        " FROM generate_series(1, 1500) AS i",
    )
    key = new_key(database.url)
    settings = {"min_bytes_per_second": "1000000", "min_rate_window_s": "1"}
    try:
        with running_server(database.url, tmp_path, 1, **settings) as server:
            with server.client(key) as client:
                response = client.get(
                    "/datasets/trickle.ndjson", headers={"X-Request-Id": "trickle"}
                )
            assert response.status_code == 200
            assert response.content.count(b"\n") == 1500
            assert logged_export(database.url, "trickle")["outcome"] == "completed"
    finally:
        run_sql(database.url, "DROP VIEW public.trickle")


def backend_gone(database: ExportDatabase, request_id: str, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = run_sql(
            database.url,
            f"SELECT 1 FROM pg_stat_activity WHERE application_name = 'exporter {request_id}'",
        )
        if not rows:
            return True
        time.sleep(0.05)
    return False
