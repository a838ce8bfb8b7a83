"""The job queue: shared fairly (a key at its limit of concurrent exports does not hold up
another key's jobs), jobs handed back by a process that stops, a job that cannot run here
failing and letting go. Apart from tests/test_jobs.py, whose server would claim the jobs too."""

import time
from pathlib import Path

from tests.support.database import ExportDatabase, logged_export, new_key, run_sql
from tests.support.jobs import slow_view, submit, wait_for
from tests.support.server import running_server


def test_a_key_at_its_limit_does_not_hold_up_another(
    database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database, seconds=6)
    try:
        with running_server(
            database.url,
            tmp_path,
            job_dir=str(tmp_path / "files"),
            job_poll_s="0.3",
            job_concurrency="2",
            max_exports_per_key="1",
        ) as server:
            with (
                server.client(new_key(database.url)) as busy,
                server.client(new_key(database.url)) as other,
            ):
                first = submit(busy, {"dataset": view, "format": "csv"})
                wait_for(busy, first["id"], "running")
                second = submit(busy, {"dataset": view, "format": "csv"})
                quick = submit(other, {"dataset": "people", "format": "csv"})
                wait_for(other, quick["id"], "done", timeout_s=5)
                # The busy key's second job waits for its first, unclaimed.
                assert busy.get(second["status_url"]).json()["status"] == "queued"
                assert busy.get(first["status_url"]).json()["status"] == "running"
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_a_process_that_stops_hands_its_job_back(database: ExportDatabase, tmp_path: Path) -> None:
    view = slow_view(database, seconds=6)
    with running_server(
        database.url, tmp_path, job_dir=str(tmp_path / "files"), job_concurrency="1"
    ) as server:
        with server.client(database.key) as client:
            info = submit(client, {"dataset": view, "format": "csv"})
            wait_for(client, info["id"], "running")
    try:
        # Back in the queue at once, the interrupted run not counted as an attempt.
        (status, attempts, worker) = run_sql(
            database.url,
            f"SELECT status, attempts, worker FROM exporter.jobs WHERE id = '{info['id']}'",
        )[0]
        assert (status, attempts, worker) == ("queued", 0, None)
    finally:
        run_sql(
            database.url,
            f"DELETE FROM exporter.jobs WHERE id = '{info['id']}'",
            f"DROP VIEW {view}",
        )


def test_a_job_waiting_for_its_keys_slot_publishes_nothing(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """The key's only export slot is held by its direct export (a client that does not read):
    its job is claimed and handed back each poll, silently, and runs once the slot is free."""
    key = new_key(database.url)
    with running_server(
        database.url,
        tmp_path,
        job_dir=str(tmp_path / "files"),
        # The default poll (2 s), longer than the progress interval: a run handed back waits
        # that long in its slot, and must publish nothing meanwhile.
        job_concurrency="1",
        max_exports_per_key="1",
    ) as server:
        with server.client(key) as client:
            with client.stream("GET", "/datasets/big.csv") as direct:
                assert direct.status_code == 200
                info = submit(client, {"dataset": "people", "format": "csv"})
                time.sleep(5)
                (count,) = run_sql(
                    database.url,
                    f"SELECT count(*) FROM exporter.export_events WHERE export_id = '{info['id']}'",
                )[0]
                assert count == 0
                assert client.get(info["status_url"]).json()["status"] in ("queued", "running")
            # The direct export's client has left: its slot is free.
            done, _ = wait_for(client, info["id"], "done", timeout_s=10)
            assert done["rows"] > 0
            (attempts,) = run_sql(
                database.url, f"SELECT attempts FROM exporter.jobs WHERE id = '{info['id']}'"
            )[0]
            assert attempts == 1  # the runs handed back for want of a slot are not counted


def test_a_job_whose_file_cannot_be_written_fails_and_lets_go(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """The spool cannot be made (its parent is a file): the job fails saying so, without the
    server's paths, and its run releases the key's only export slot and ends its log entry."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    key = new_key(database.url)
    with running_server(
        database.url,
        tmp_path,
        job_dir=str(blocker / "jobs"),
        job_concurrency="1",
        job_poll_s="0.5",
        max_exports_per_key="1",
    ) as server:
        with server.client(key) as client:
            info = submit(client, {"dataset": "people", "format": "csv"})
            failed, _ = wait_for(client, info["id"], "done", "failed", timeout_s=20)
            assert failed["status"] == "failed", failed
            assert failed["error"] == "the job's file could not be written on the server"
            assert client.get("/datasets/people.csv").status_code == 200
        assert "its file could not be written" in server.log()
    assert logged_export(database.url, info["id"])["outcome"] == "failed"
