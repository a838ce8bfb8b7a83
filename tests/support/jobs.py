"""Background jobs as the tests drive them: submitting and watching jobs, slow datasets, the
worker running a job."""

import socket
import time
import uuid
from typing import Any

import httpx

from tests.support.database import ExportDatabase, run_sql


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/exports", json=body)
    assert response.status_code == 202, response.text
    info: dict[str, Any] = response.json()
    assert response.headers["location"] == info["status_url"] == f"/exports/{info['id']}"
    return info


def wait_for(client: httpx.Client, job_id: str, *statuses: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = []
    while True:
        info = client.get(f"/exports/{job_id}").json()
        seen.append((info["status"], info["rows"]))
        if info["status"] in statuses:
            return info, seen
        assert time.monotonic() < deadline, f"job still {info['status']}: {seen[-5:]}"
        time.sleep(0.05)


def slow_view(database: ExportDatabase, seconds: float = 6) -> str:
    """A dataset that takes `seconds` to export: a job on it runs long enough to be watched."""
    name = f"slow_{uuid.uuid4().hex[:8]}"
    rows = 300
    run_sql(
        database.url,
        f"CREATE VIEW {name} AS SELECT g AS id, pg_sleep({seconds / rows})::text AS nap"
        f" FROM generate_series(1, {rows}) AS g",
    )
    return name


def job_worker_pid(database: ExportDatabase, job_id: str) -> int:
    """The pid of the worker process running a job, once the job's export has started: its
    claim names the process (`<host>:<pid>`, written by the worker itself). Not found through
    the export's database connection, whose client port only a TCP connection has."""
    deadline = time.monotonic() + 30
    while True:
        rows = run_sql(
            database.url,
            f"SELECT worker FROM exporter.jobs WHERE id = '{job_id}' AND status = 'running'"
            " AND EXISTS (SELECT FROM pg_stat_activity"
            f" WHERE application_name = 'exporter job {job_id}')",
        )
        if rows:
            host, _, pid = rows[0]["worker"].rpartition(":")
            assert host == socket.gethostname(), rows
            return int(pid)
        assert time.monotonic() < deadline, "the job's export never started"
        time.sleep(0.05)
