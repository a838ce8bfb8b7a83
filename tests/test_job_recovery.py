"""A background job whose worker process dies is claimed again and finished by another (its
lease runs out). Apart from tests/test_jobs.py, whose server would claim the job too."""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import ExportDatabase, Server, run_sql, start_server, stop_server
from tests.job_helpers import (
    export_connection_port,
    read_events,
    slow_view,
    submit,
    wait_for,
)


def test_a_job_whose_worker_dies_finishes_elsewhere(
    database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database)
    server = start_server(
        database.url,
        tmp_path,
        workers=2,
        job_dir=str(tmp_path / "files"),
        job_poll_s="0.5",
        job_concurrency="1",
        job_lease_s="1.5",
    )
    try:
        with server.client(database.key) as client:
            direct = client.get(f"/datasets/{view}.csv").content
            info = submit(client, {"dataset": view, "format": "csv"})
            wait_for(client, info["id"], "running")
            # The worker process whose connection runs the job's export.
            port = export_connection_port(database, info["id"])
            worker = next(
                c.pid
                for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.pid
            )
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
        wait_until(lambda: [p.name for p in files.iterdir()] == [done_file(database, info["id"])])
        (attempts,) = run_sql(
            database.url, f"SELECT attempts FROM exporter.jobs WHERE id = '{info['id']}'"
        )[0]
        assert attempts == 2
    finally:
        stop_server(server)
        run_sql(database.url, f"DROP VIEW {view}")


def test_a_lost_listen_connection_comes_back(database: ExportDatabase, tmp_path: Path) -> None:
    """With a poll of a minute, only NOTIFY can start a job quickly: after PostgreSQL ended the
    LISTEN connections, a job still starts at once."""
    server = start_server(
        database.url,
        tmp_path,
        job_dir=str(tmp_path / "files"),
        job_poll_s="60",
        job_concurrency="1",
    )
    try:
        # This server's two (events, jobs); other servers of the session have their own.
        wait_until(lambda: len(listeners(database, server)) == 2)
        ended = listeners(database, server)
        for pid in ended:
            run_sql(database.url, f"SELECT pg_terminate_backend({pid})")
        # Two new connections, not the ended ones still on their way out.
        wait_until(
            lambda: len(now := listeners(database, server)) == 2 and not set(now) & set(ended)
        )
        with server.client(database.key) as client:
            info = submit(client, {"dataset": "people", "format": "csv"})
            # Within a third of the poll: woken by NOTIFY, through the new connection.
            wait_for(client, info["id"], "done", timeout_s=20)
    finally:
        stop_server(server)


def listeners(database: ExportDatabase, server: Server) -> list[int]:
    """The backends of the server's LISTEN connections."""
    rows = run_sql(
        database.url,
        "SELECT pid, client_port FROM pg_stat_activity"
        " WHERE application_name = 'exporter listen' AND datname = current_database()",
    )
    ours = {
        c.laddr.port
        for c in psutil.net_connections("tcp")
        if c.pid == server.process.pid and c.laddr
    }
    return [pid for pid, port in rows if port in ours]


def done_file(database: ExportDatabase, job_id: str) -> str:
    (name,) = run_sql(database.url, f"SELECT file_name FROM exporter.jobs WHERE id = '{job_id}'")[0]
    return str(name)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)
