"""A job runs under the per-export caps of a direct export (EXPORTER_MAX_ROWS, _MAX_BYTES,
_MAX_SECONDS): one that passes a cap fails, saying which, and its export log entry is aborted
by it. Apart from tests/test_jobs.py, whose server would claim the jobs too."""

import time
from pathlib import Path

import pytest

from tests.support.database import ExportDatabase, logged_export, run_sql
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
