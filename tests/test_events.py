"""Progress over Server-Sent Events (GET /exports/{id}/events), through real servers: a job's and
a direct export's events, resuming with Last-Event-ID, and events published by one worker
process reaching a subscriber connected to another."""

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.database import ExportDatabase, new_key, run_sql
from tests.support.events import read_events
from tests.support.jobs import job_worker_pid, slow_view, submit, wait_for
from tests.support.server import Server, running_server


@pytest.fixture(scope="module")
def events_server(
    database: ExportDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("events")
    with running_server(
        database.url,
        directory,
        job_dir=str(directory / "files"),
        job_poll_s="0.5",
        job_lease_s="3",
        job_concurrency="1",
        # Often enough for a few progress events in a job that takes half a second.
        progress_interval_s="0.05",
    ) as server:
        yield server


def test_a_jobs_events_count_up_to_done(events_server: Server, database: ExportDatabase) -> None:
    with events_server.client(database.key) as client:
        info = submit(client, {"dataset": "big", "format": "csv"})
        response, events = read_events(client, info["events_url"])
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    *progress, done = events
    assert done.event == "done", done
    assert done.data["rows"] == 1_000_000 and done.data["download_url"] == info["download_url"]
    assert progress and all(e.event == "progress" for e in progress)
    rows = [e.data["rows"] for e in progress]
    assert rows == sorted(rows) and rows[-1] <= 1_000_000
    assert len(set(rows)) >= 3, rows  # counts seen increasing while it ran
    assert set(progress[0].data) == {"rows", "bytes", "elapsed_s", "estimated_rows"}
    assert done.data["estimated_rows"] == 1_000_000


def test_a_reconnecting_subscriber_misses_no_event(
    events_server: Server, database: ExportDatabase
) -> None:
    view = slow_view(database, seconds=4)
    try:
        with events_server.client(database.key) as client:
            info = submit(client, {"dataset": view, "format": "ndjson"})
            _, first = read_events(client, info["events_url"], limit=2)
            assert len(first) == 2
            time.sleep(1)  # events go on while the subscriber is away
            _, rest = read_events(client, info["events_url"], last_event_id=first[-1].id)
            # A subscriber arriving after the end still gets all of it.
            _, replay = read_events(client, info["events_url"])
        events = first + rest
        ids = [e.id for e in events]
        assert ids == sorted(set(ids))
        assert events[-1].event == "done" and events[-1].data["rows"] == 300
        assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in events]
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_a_direct_exports_events(events_server: Server, database: ExportDatabase) -> None:
    export_id = f"watched-{uuid.uuid4().hex[:8]}"
    with events_server.client(database.key) as client:
        with client.stream(
            "GET", "/datasets/big.csv", headers={"X-Request-Id": export_id}
        ) as export:
            chunks = export.iter_raw()
            next(chunks)
            # The export has started and waits for its client: progress, no end yet.
            _, events = read_events(client, f"/exports/{export_id}/events", limit=1)
            assert events[0].event == "progress"
            for _ in chunks:
                pass
        _, events = read_events(client, f"/exports/{export_id}/events")
    assert events[-1].event == "done" and events[-1].data["rows"] == 1_000_000


def test_a_direct_export_its_client_left_ends_with_an_error_event(
    events_server: Server, database: ExportDatabase
) -> None:
    export_id = f"left-{uuid.uuid4().hex[:8]}"
    with events_server.client(database.key) as client:
        with client.stream(
            "GET", "/datasets/big.csv", headers={"X-Request-Id": export_id}
        ) as export:
            next(export.iter_raw())
        # The client has gone, its export with it.
        _, events = read_events(client, f"/exports/{export_id}/events")
    assert events[-1].event == "error", events[-1]
    problem = events[-1].data
    assert set(problem) == {"type", "title", "status", "detail", "aborted_by"}, problem
    assert (problem["title"], problem["status"]) == ("Export disconnected", 499)
    # No limit ended it: said as null, not left out.
    assert problem["aborted_by"] is None


def test_only_the_exports_key_may_watch(events_server: Server, database: ExportDatabase) -> None:
    with events_server.client(database.key) as client:
        info = submit(client, {"dataset": "people", "format": "csv"})
        wait_for(client, info["id"], "done")
    with events_server.client(new_key(database.url)) as other:
        assert other.get(info["events_url"]).status_code == 404
        assert other.get("/exports/nothing-like-this/events").status_code == 404
    with events_server.client(new_key(database.url, admin=True)) as admin:
        response, events = read_events(admin, info["events_url"])
        assert response.status_code == 200 and events[-1].event == "done"
    with events_server.client(None) as anonymous:
        assert anonymous.get(info["events_url"]).status_code == 401


def _serving_pid(server: Server, local_port: int) -> int:
    server_port = int(server.base_url.rpartition(":")[2])
    for connection in psutil.net_connections("tcp"):
        if (
            connection.laddr
            and connection.raddr
            and connection.laddr.port == server_port
            and connection.raddr.port == local_port
            and connection.pid
        ):
            return int(connection.pid)
    raise AssertionError("no process serves this connection")


def test_events_reach_a_subscriber_of_another_worker(
    database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database, seconds=8)
    try:
        with running_server(
            database.url,
            tmp_path,
            workers=2,
            job_dir=str(tmp_path / "files"),
            job_poll_s="0.5",
            job_concurrency="1",
        ) as server:
            with server.client(database.key) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                wait_for(client, info["id"], "running")
            runner = job_worker_pid(database, info["id"])
            host, _, server_port = server.base_url.removeprefix("http://").rpartition(":")
            # Connections land on either worker: keep one that the other worker serves.
            for _ in range(50):
                sock = socket.create_connection((host, int(server_port)))
                sock.sendall(
                    f"GET {info['events_url']} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {database.key}\r\n"
                    "Accept: text/event-stream\r\n\r\n".encode()
                )
                time.sleep(0.05)
                if _serving_pid(server, sock.getsockname()[1]) != runner:
                    break
                sock.close()
            else:
                pytest.fail("every connection landed on the job's worker")
            with sock, sock.makefile("rb") as stream:
                body = b""
                deadline = time.monotonic() + 60
                while b"event: done" not in body:
                    assert time.monotonic() < deadline, body[-500:]
                    line = stream.readline()
                    assert line, body[-500:]
                    body += line
            assert body.count(b"event: progress") >= 2, body[-500:]
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_an_export_that_ended_without_events_still_ends_its_stream(
    events_server: Server, database: ExportDatabase
) -> None:
    export_id = f"refused-{uuid.uuid4().hex[:8]}"
    with events_server.client(database.key) as client:
        refused = client.get("/datasets/big.csv?nope=eq.1", headers={"X-Request-Id": export_id})
        assert refused.status_code == 400
        response, events = read_events_without_ids(client, f"/exports/{export_id}/events")
    assert response.status_code == 200
    assert events[-1][0] == "error" and events[-1][1]["status"] == 400


def read_events_without_ids(client: httpx.Client, path: str) -> tuple[httpx.Response, list[Any]]:
    """(event, data) pairs, ids or not (an end made from an export's record has none)."""
    events: list[Any] = []
    fields: dict[str, str] = {}
    with client.stream("GET", path) as response:
        for line in response.iter_lines():
            if line == "" and "data" in fields:
                events.append((fields.get("event"), json.loads(fields["data"])))
                if fields.get("event") in ("done", "error"):
                    break
                fields = {}
            elif line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return response, events


def test_a_cancelled_jobs_stream_ends(database: ExportDatabase, tmp_path: Path) -> None:
    view = slow_view(database, seconds=4)
    # Queued, or already claimed by events_server: cancelled either way, and its stream ends.
    try:
        with running_server(database.url, tmp_path) as server:
            with server.client(new_key(database.url)) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                assert client.delete(info["status_url"]).json()["status"] in (
                    "cancelled",
                    "running",
                )
                _, events = read_events_without_ids(client, info["events_url"])
                assert events[-1][0] == "error" and "cancelled" in events[-1][1]["title"]
                # An odd Last-Event-ID is ignored, not a 500.
                odd = client.get(
                    info["events_url"], headers=[(b"Last-Event-ID", "\u00b2".encode("latin-1"))]
                )
                assert odd.status_code == 200
    finally:
        run_sql(database.url, f"DROP VIEW {view}")
