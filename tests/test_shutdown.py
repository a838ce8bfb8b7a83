"""A process that begins to shut down (SIGTERM, Ctrl-C) learns it from a handler chained in front
of uvicorn's, and drains at once: it claims no more jobs, hands its running ones back, and ends
its event streams, while uvicorn still waits for direct exports for the grace period. Its own
servers: every job server on the test database shares the jobs table (apart from
tests/test_jobs.py, whose server would claim these jobs too)."""

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

import httpx
import pytest

from exporter.http.shutdown import ShutdownSignal
from tests.support.database import BIG_ROWS, ExportDatabase, run_sql
from tests.support.events import Event, parse_events, read_events
from tests.support.jobs import slow_view, submit, wait_for
from tests.support.server import Server, running_server

# Far longer than any wait below: what ends early does so because it drains, not because the
# grace period ran out.
GRACE_S = "60"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_noted_and_reaches_the_handler_it_chains(sig: signal.Signals) -> None:
    received: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    # Standing in for uvicorn's handler (and keeping asyncio.run's own SIGINT handler out).
    original = signal.signal(sig, previous)
    try:

        async def main() -> None:
            shutdown = ShutdownSignal()
            shutdown.install()
            try:
                assert not shutdown.started.is_set()
                signal.raise_signal(sig)
                async with asyncio.timeout(1):
                    await shutdown.started.wait()
            finally:
                shutdown.uninstall()
            assert signal.getsignal(sig) is previous

        asyncio.run(main())
    finally:
        signal.signal(sig, original)
    assert received == [sig]


def test_a_signal_nobody_handles_is_left_alone() -> None:
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:

        async def main() -> None:
            shutdown = ShutdownSignal()
            shutdown.install()
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            shutdown.uninstall()

        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        async def main() -> None:
            ShutdownSignal().install()

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before


@contextmanager
def held_download(server: Server, key: str) -> Iterator[Iterator[bytes]]:
    """A direct export that has started and waits for its client, which does not read: uvicorn
    waits for it through the grace period. The rest of it, to read once the test is done."""
    with server.client(key) as client, client.stream("GET", "/datasets/big.csv") as download:
        assert download.status_code == 200
        chunks = download.iter_raw()
        first = next(chunks)

        def everything() -> Iterator[bytes]:
            yield first
            yield from chunks

        yield everything()


def read_all(download: Iterator[bytes]) -> int:
    """The lines of the whole download (httpx raises if it is cut off)."""
    return sum(chunk.count(b"\n") for chunk in download)


def stop_accepting(server: Server) -> None:
    """SIGTERM, then wait until the server refuses new connections: it has begun to shut down."""
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:
        try:
            httpx.get(f"{server.base_url}/healthz", timeout=1)
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, "the server still accepts connections"
        time.sleep(0.05)


def job_row(database: ExportDatabase, job_id: str) -> tuple[str, int, str | None]:
    status, attempts, worker = run_sql(
        database.url,
        f"SELECT status, attempts, worker FROM exporter.jobs WHERE id = '{job_id}'",
    )[0]
    return status, attempts, worker


def pid_of(worker: str | None) -> int | None:
    return None if worker is None else int(worker.rpartition(":")[2])


def test_a_stopping_process_claims_no_new_job(database: ExportDatabase, tmp_path: Path) -> None:
    files = str(tmp_path / "files")
    info = None
    try:
        with ExitStack() as servers:
            stopping = servers.enter_context(
                running_server(
                    database.url,
                    tmp_path,
                    job_dir=files,
                    job_concurrency="1",
                    job_poll_s="0.3",
                    shutdown_grace_s=GRACE_S,
                )
            )
            # Takes the submission; claims nothing.
            front = servers.enter_context(running_server(database.url, tmp_path, job_dir=files))
            with held_download(stopping, database.key) as download:
                stop_accepting(stopping)
                with front.client(database.key) as client:
                    info = submit(client, {"dataset": "people", "format": "csv"})
                    # Its NOTIFY, and several polls, reach a process that would claim it.
                    time.sleep(1.5)
                    assert job_row(database, info["id"]) == ("queued", 0, None)
                    assert stopping.process.poll() is None, "the download no longer holds it"
                    # Another process gets it.
                    claimer = servers.enter_context(
                        running_server(
                            database.url,
                            tmp_path,
                            job_dir=files,
                            job_concurrency="1",
                            job_poll_s="0.3",
                        )
                    )
                    wait_for(client, info["id"], "done", timeout_s=10)
                    _, attempts, worker = job_row(database, info["id"])
                    assert (attempts, pid_of(worker)) == (1, claimer.process.pid)
                # The direct export was not cut: it goes on to its end.
                assert read_all(download) == BIG_ROWS + 1
            stopping.process.wait(timeout=10)
    finally:
        if info is not None:
            run_sql(database.url, f"DELETE FROM exporter.jobs WHERE id = '{info['id']}'")


def test_a_stopping_process_hands_its_running_job_back_at_once(
    database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database, seconds=4)
    files = str(tmp_path / "files")
    info = None
    try:
        with ExitStack() as servers:
            stopping = servers.enter_context(
                running_server(
                    database.url,
                    tmp_path,
                    job_dir=files,
                    job_concurrency="1",
                    shutdown_grace_s=GRACE_S,
                )
            )
            with stopping.client(database.key) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                wait_for(client, info["id"], "running")
            assert pid_of(job_row(database, info["id"])[2]) == stopping.process.pid
            other = servers.enter_context(
                running_server(
                    database.url, tmp_path, job_dir=files, job_concurrency="1", job_poll_s="0.3"
                )
            )
            with held_download(stopping, database.key) as download:
                stop_accepting(stopping)
                # Handed back at once, not when the grace period ends: the other process has it.
                deadline = time.monotonic() + 3
                while pid_of(job_row(database, info["id"])[2]) != other.process.pid:
                    assert time.monotonic() < deadline, job_row(database, info["id"])
                    time.sleep(0.05)
                assert stopping.process.poll() is None, "the download no longer holds it"
                with other.client(database.key) as client:
                    done, _ = wait_for(client, info["id"], "done", timeout_s=20)
                assert done["rows"] == 300
                # The interrupted run was not counted.
                assert job_row(database, info["id"])[:2] == ("done", 1)
                assert read_all(download) == BIG_ROWS + 1
            stopping.process.wait(timeout=10)
    finally:
        if info is not None:
            run_sql(database.url, f"DELETE FROM exporter.jobs WHERE id = '{info['id']}'")
        run_sql(database.url, f"DROP VIEW {view}")


@pytest.mark.parametrize(
    ("sig", "workers"), [(signal.SIGTERM, 2), (signal.SIGINT, 1)], ids=["SIGTERM-2", "SIGINT-1"]
)
def test_an_event_stream_ends_at_once_and_resumes_elsewhere(
    database: ExportDatabase, tmp_path: Path, sig: signal.Signals, workers: int
) -> None:
    view = slow_view(database, seconds=5)
    files = str(tmp_path / "files")
    info = None
    try:
        with (
            running_server(
                database.url,
                tmp_path,
                job_dir=files,
                job_concurrency="1",
                progress_interval_s="0.05",
            ) as runner,
            running_server(
                database.url, tmp_path, workers=workers, job_dir=files, shutdown_grace_s=GRACE_S
            ) as watched,
        ):
            with watched.client(database.key) as client:
                info = submit(client, {"dataset": view, "format": "csv"})
                events: list[Event] = []
                with client.stream("GET", info["events_url"]) as response:
                    stream = parse_events(response.iter_lines())
                    events += [next(stream), next(stream)]
                    watched.process.send_signal(sig)
                    signalled = time.monotonic()
                    # To its clean end (httpx raises on one cut off): the export still runs.
                    events += stream
                    ended_after = time.monotonic() - signalled
            assert ended_after < 2, ended_after
            assert [e.event for e in events] == ["progress"] * len(events)
            # Nothing held it any more.
            watched.process.wait(timeout=5)
            with runner.client(database.key) as client:
                _, rest = read_events(client, info["events_url"], last_event_id=events[-1].id)
                _, replay = read_events(client, info["events_url"])
            assert rest[-1].event == "done" and rest[-1].data["rows"] == 300
            assert [(e.id, e.data) for e in events + rest] == [(e.id, e.data) for e in replay]
    finally:
        if info is not None:
            run_sql(database.url, f"DELETE FROM exporter.jobs WHERE id = '{info['id']}'")
        run_sql(database.url, f"DROP VIEW {view}")
