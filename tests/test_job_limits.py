"""A job runs under the per-export caps of a direct export (EXPORTER_MAX_ROWS, _MAX_BYTES,
_MAX_SECONDS): one that passes a cap fails, saying which, and its export log entry is aborted
by it; its event streams are capped too. Apart from tests/test_jobs.py, whose server would
claim the jobs too."""

import contextlib
import time
from pathlib import Path

import httpx
import pytest

from tests.support.database import ExportDatabase, logged_export, new_key, run_sql
from tests.support.events import read_events
from tests.support.jobs import slow_view, submit, wait_for
from tests.support.server import running_server


@pytest.mark.parametrize(
    ("cap", "value", "error"),
    [
        ("max_rows", "10", "max_rows: the export has more than 10 rows"),
        ("max_bytes", "1000", "max_bytes: the export is larger than 1000 bytes"),
    ],
)
def test_a_job_past_a_size_cap_fails(
    database: ExportDatabase, tmp_path: Path, cap: str, value: str, error: str
) -> None:
    with running_server(
        database.url,
        tmp_path,
        1,
        job_dir=str(tmp_path / "files"),
        job_concurrency="1",
        **{cap: value},
    ) as server:
        with server.client(database.key) as client:
            info = submit(client, {"dataset": "big", "format": "csv"})
            failed, _ = wait_for(client, info["id"], "done", "failed")
            assert (failed["status"], failed["error"]) == ("failed", error)
            _, events = read_events(client, info["events_url"])
            assert events[-1].event == "error"
            assert events[-1].data["status"] == 422
            assert events[-1].data["detail"] == error
        logged = logged_export(database.url, info["id"])
        assert (logged["outcome"], logged["aborted_by"]) == ("aborted", cap)
        assert list((tmp_path / "files").iterdir()) == []


def test_a_job_past_max_seconds_fails(database: ExportDatabase, tmp_path: Path) -> None:
    view = slow_view(database, seconds=20)
    try:
        with running_server(
            database.url,
            tmp_path,
            1,
            job_dir=str(tmp_path / "files"),
            job_concurrency="1",
            max_seconds="1.5",
        ) as server:
            with server.client(database.key) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                started = time.monotonic()
                failed, _ = wait_for(client, info["id"], "done", "failed")
                assert time.monotonic() - started < 10
                assert failed["error"] == "max_seconds: the export ran longer than 1.5 s"
            logged = logged_export(database.url, info["id"])
            assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "max_seconds")
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_event_streams_are_capped_per_key_and_in_all(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """Issue 14, defect 3: one key could hold 1,000 streams open and more. Past a cap, a 429
    with Retry-After; a key's streams count for that key only; a closed one frees its slot."""
    view = slow_view(database, seconds=20)
    owner, admin, other_admin = (new_key(database.url, admin=i > 0) for i in range(3))
    try:
        with running_server(
            database.url,
            tmp_path,
            job_dir=str(tmp_path / "files"),
            job_concurrency="1",
            max_event_streams_per_key="2",
            max_event_streams="3",
        ) as server:
            with server.client(owner) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                wait_for(client, info["id"], "running")
            url = info["events_url"]
            with contextlib.ExitStack() as streams:

                def open_stream(key: str) -> httpx.Response:
                    http = streams.enter_context(server.client(key))
                    return streams.enter_context(http.stream("GET", url))

                first, second = open_stream(owner), open_stream(owner)
                assert first.status_code == second.status_code == 200
                refused = open_stream(owner)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
                refused.read()
                assert "this key has 2 event streams open" in refused.json()["detail"]
                assert open_stream(admin).status_code == 200  # another key's: its own count
                full = open_stream(other_admin)
                assert full.status_code == 429, full.status_code
                full.read()
                assert "the service has 3 event streams open" in full.json()["detail"]
                first.close()  # a client that leaves gives its slot back
                deadline = time.monotonic() + 5
                while (again := open_stream(owner)).status_code == 429:
                    assert time.monotonic() < deadline, "the closed stream's slot stayed taken"
                    time.sleep(0.1)
                assert again.status_code == 200
    finally:
        run_sql(database.url, f"DROP VIEW {view}")
