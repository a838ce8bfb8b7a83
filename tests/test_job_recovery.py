"""A background job whose worker process dies is claimed again and finished by another (its
lease runs out). Apart from tests/test_jobs.py, whose server would claim the job too."""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.support.database import ExportDatabase, export_database, run_sql
from tests.support.events import read_events
from tests.support.jobs import job_worker_pid, slow_view, submit, wait_for
from tests.support.server import running_server


def test_a_job_whose_worker_dies_finishes_elsewhere(
    database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database)
    try:
        with running_server(
            database.url,
            tmp_path,
            workers=2,
            job_dir=str(tmp_path / "files"),
            job_poll_s="0.5",
            job_concurrency="1",
            job_lease_s="1.5",
        ) as server:
            with server.client(database.key) as client:
                direct = client.get(f"/datasets/{view}.csv").content
                info = submit(client, {"dataset": view, "format": "csv"})
                wait_for(client, info["id"], "running")
                # The worker process running the job's export.
                worker = job_worker_pid(database, info["id"])
                # One of this server's worker processes, not the supervisor.
                assert psutil.Process(worker).ppid() == server.process.pid
                os.kill(worker, signal.SIGKILL)
            # A new client: the old one's kept-alive connection may have been the dead worker's.
            with server.client(database.key) as client:
                done, _ = wait_for(client, info["id"], "done", "failed", timeout_s=90)
                assert done["status"] == "done", done
                assert client.get(done["download_url"]).content == direct
                # Both runs' events, in order, with distinct ids, ending with the second's done.
                _, events = read_events(client, info["events_url"])
                assert [e.id for e in events] == sorted({e.id for e in events})
                assert events[-1].event == "done" and events[-1].data["rows"] == 300
            # The dead attempt's partial file is swept; the finished file stays.
            files = tmp_path / "files"
            wait_until(
                lambda: [p.name for p in files.iterdir()] == [done_file(database, info["id"])]
            )
            (attempts,) = run_sql(
                database.url, f"SELECT attempts FROM exporter.jobs WHERE id = '{info['id']}'"
            )[0]
            assert attempts == 2
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_a_lost_listen_connection_comes_back(server_url: str, tmp_path: Path) -> None:
    """With a poll of a minute, only NOTIFY can start a job quickly: after PostgreSQL ended the
    LISTEN connections, a job still starts at once."""
    # A database of its own, so that every LISTEN connection to it is this server's: the
    # session's other servers listen on theirs, and a backend does not say which process is
    # its client (its client port, on TCP only, would).
    with export_database(server_url, "CREATE TABLE people (id integer PRIMARY KEY)") as database:
        with running_server(
            database.url,
            tmp_path,
            job_dir=str(tmp_path / "files"),
            job_poll_s="60",
            job_concurrency="1",
        ) as server:
            # The server's three (events, jobs, key revocations).
            wait_until(lambda: len(listeners(database)) == 3)
            ended = listeners(database)
            for pid in ended:
                run_sql(database.url, f"SELECT pg_terminate_backend({pid})")
            # Three new connections, not the ended ones still on their way out.
            wait_until(lambda: len(now := listeners(database)) == 3 and not set(now) & set(ended))
            with server.client(database.key) as client:
                info = submit(client, {"dataset": "people", "format": "csv"})
                # Within a third of the poll: woken by NOTIFY, through the new connection.
                wait_for(client, info["id"], "done", timeout_s=20)


def listeners(database: ExportDatabase) -> list[int]:
    """The backends of the LISTEN connections to the database."""
    rows = run_sql(
        database.url,
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'exporter listen' AND datname = current_database()",
    )
    return [pid for (pid,) in rows]


def done_file(database: ExportDatabase, job_id: str) -> str:
    (name,) = run_sql(database.url, f"SELECT file_name FROM exporter.jobs WHERE id = '{job_id}'")[0]
    return str(name)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)
