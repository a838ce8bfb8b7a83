"""Runs background export jobs in every `exporter serve` process.

Each process claims jobs (records.claim) up to EXPORTER_JOB_CONCURRENCY at a time, woken
by NOTIFY when one is submitted and by a poll that also reclaims jobs whose worker died. A job
runs through the same pipeline as an HTTP export (the key's scope, role, export slots and
caps), reading from the database as fast as it allows into a gzip file: no client's pace in
the loop, so its snapshot is held no longer than the database needs. From the moment the
process begins to shut down (drain), it claims nothing more and hands its running jobs back.
"""

import asyncio
import contextlib
import logging
import math
import os
import socket
from pathlib import Path

import anyio
import asyncpg

from exporter.access import export_log
from exporter.access.exports import KeyExport
from exporter.access.keys import key_by_id
from exporter.access.revocations import JOB_REVOKED, REVOKED, Revocations
from exporter.db.failures import ENCODING_ERRORS
from exporter.db.listen import Listener
from exporter.db.pool import UNREACHABLE, Databases, PoolTimeout
from exporter.db.slots import TooManyExports
from exporter.errors import (
    ClientClosedRequest,
    ExporterError,
    InvalidRequest,
    LimitExceeded,
    ServiceUnavailable,
)
from exporter.incremental.pulls import CursorsUnavailable, pull_cursor
from exporter.jobs import records as job_records
from exporter.jobs.events import Publisher
from exporter.jobs.files import JobFiles, SpoolError, file_name
from exporter.jobs.records import Job
from exporter.jobs.seekable_gzip import SeekableGzipWriter
from exporter.pipeline.catalog import find_dataset
from exporter.pipeline.encoders import ENCODERS
from exporter.pipeline.query import QueryError, estimated_rows, parse_query
from exporter.pipeline.stream import ExportStream
from exporter.settings import Settings
from exporter.storage.store import StoreError

log = logging.getLogger(__name__)

# Failures of the database rather than of the job.
TRANSIENT = (PoolTimeout, asyncpg.exceptions.QueryCanceledError, *UNREACHABLE)


class JobFailed(Exception):
    """The job cannot run: its key, dataset or parameters are no longer valid."""


class _Watch:
    """What the heartbeat sees of a run, and why it stopped it ("cancelled", "lost", or
    "revoked": its key was)."""

    def __init__(self) -> None:
        self.stream: ExportStream | None = None
        self.stopped: str | None = None
        # Set before the run records its end: a renewal that loses to it is no lost claim.
        self.finishing = False


class JobRunner:
    def __init__(
        self, databases: Databases, settings: Settings, revocations: Revocations | None = None
    ) -> None:
        self.databases = databases
        self.settings = settings
        # A run of a key revoked meanwhile stops at the notice, not at its next heartbeat.
        self.revocations = revocations or Revocations()
        self.files = JobFiles(databases.state, settings)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._slots = asyncio.Semaphore(settings.job_concurrency)
        self._wake = asyncio.Event()
        # Every run's task, and the cancel scopes of those that have started. A drain cancels
        # through the scopes: anyio's shields then hold (a task's own cancel() would break
        # into a run's shielded hand-back), and a run not started yet hands its job back
        # itself.
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[anyio.CancelScope] = set()
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """This process is shutting down: claim no more jobs, and hand the running ones back
        to the queue now, uncounted (records.requeue), rather than at the lifespan's end.
        The grace period is for HTTP clients; a job restarts from scratch wherever it runs
        again, so running on here could only waste the work, and keep the job from a process
        that is not stopping for as long as the grace period lasts."""
        self._draining.set()
        self._wake.set()
        for scope in list(self._running):
            scope.cancel()

    async def run_forever(self) -> None:
        # Submissions wake the claimants at once; while the listener is down, the poll finds
        # them.
        listener = Listener(
            self.settings.state_url,
            job_records.CHANNEL,
            lambda _payload: self._wake.set(),
            self._wake.set,
        )
        listening = asyncio.create_task(listener.run_forever())
        try:
            while not self._draining.is_set():
                await self._slots.acquire()
                if self._draining.is_set():
                    self._slots.release()
                    break
                # Before looking: a submission notified while we look is not lost.
                self._wake.clear()
                try:
                    await job_records.fail_exhausted(self.databases.state)
                    job = await job_records.claim(
                        self.databases.state,
                        self.worker,
                        self.settings.job_lease_s,
                        self.settings.max_exports_per_key,
                    )
                except Exception as exc:
                    self._slots.release()
                    log.warning("could not claim a job: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.job_poll_s):
                            await self._draining.wait()
                    continue
                if job is None:
                    self._slots.release()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.job_poll_s):
                            await self._wake.wait()
                    continue
                # Claimed while draining began, it is handed back by its run (_run_and_release).
                task = asyncio.create_task(self._run_and_release(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self.drain()
            for task in list(self._tasks):
                with contextlib.suppress(BaseException):
                    await task
            listening.cancel()
            with contextlib.suppress(BaseException):
                await listening

    async def aclose(self) -> None:
        await self.files.aclose()

    async def _run_and_release(self, job: Job) -> None:
        try:
            if self._draining.is_set():
                # Claimed as the process began to stop: handed back as a stopped run is.
                await job_records.requeue(self.databases.state, job, counts=False)
                return
            await self.run(job)
        except Exception:
            log.exception("job %s", job.id)
        finally:
            self._slots.release()

    async def run(self, job: Job) -> None:
        """Run a claimed job. A heartbeat renews the claim from the start (opening a slow
        query included) and notes the progress; when the job is cancelled or its claim lost,
        it cancels the run."""
        watch = _Watch()
        with self.revocations.watch(job.key_id) as revoked:
            async with anyio.create_task_group() as group:
                self._running.add(group.cancel_scope)
                if self._draining.is_set():
                    group.cancel_scope.cancel()
                group.start_soon(self._heartbeat, job, watch, group.cancel_scope)
                group.start_soon(self._stop_if_revoked, revoked, watch, group.cancel_scope)
                try:
                    await self._execute(job, watch)
                finally:
                    self._running.discard(group.cancel_scope)
                    group.cancel_scope.cancel()

    async def _stop_if_revoked(
        self, revoked: anyio.Event, watch: "_Watch", scope: anyio.CancelScope
    ) -> None:
        await revoked.wait()
        if not watch.finishing:
            watch.stopped = "revoked"
            scope.cancel()

    async def _heartbeat(self, job: Job, watch: "_Watch", scope: anyio.CancelScope) -> None:
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            stream = watch.stream
            try:
                ours, cancel = await job_records.renew(
                    self.databases.state,
                    job,
                    self.settings.job_lease_s,
                    stream.rows if stream else 0,
                    stream.bytes if stream else 0,
                )
            except Exception as exc:
                # The claim lapses if this goes on; the job then runs again elsewhere.
                log.warning("job %s: could not renew its claim: %s", job.id, exc)
                continue
            if watch.finishing:
                # The run is recording its end (which this renewal may have raced): let it.
                return
            if not ours or cancel:
                watch.stopped = "lost" if not ours else "cancelled"
                scope.cancel()
                return

    async def _execute(self, job: Job, watch: "_Watch") -> None:
        publisher = Publisher(
            self.databases.state,
            job.id,
            job.key_name,
            lambda: _counts(watch.stream),
            None,
            self.settings.progress_interval_s,
        )
        # From the claim on: a slow query shows its elapsed time before its first row.
        publisher.start()
        try:
            await self._execute_publishing(job, watch, publisher)
        finally:
            with anyio.CancelScope(shield=True):
                await publisher.stop()

    async def _execute_publishing(self, job: Job, watch: "_Watch", publisher: Publisher) -> None:
        state = self.databases.state
        logged = export_log.ExportRequest(
            request_id=job.id,
            dataset=job.dataset,
            format=job.format,
            parameters=export_log.bounded_parameters(list(job.params)),
            client_addr=None,
            key_name=job.key_name,
        )
        # EXPORTER_MAX_SECONDS, as for a direct export: how long the export may hold a
        # snapshot and a connection (its first rows included; storing the file excluded).
        max_seconds = self.settings.max_seconds
        give_up_at = math.inf if max_seconds is None else anyio.current_time() + max_seconds
        too_long = f"max_seconds: the export ran longer than {max_seconds or 0:g} s"
        try:
            with anyio.move_on_at(give_up_at) as opening:
                stream = await self._open(job)
            if opening.cancelled_caught:
                await export_log.record_start(state, logged)
                await export_log.record_end(
                    state,
                    logged,
                    outcome="aborted",
                    status=200,
                    rows=0,
                    bytes_sent=0,
                    error=too_long,
                    aborted_by="max_seconds",
                )
                await job_records.end(state, job, "failed", too_long)
                await publisher.error(LimitExceeded(too_long).problem())
                return
        except TooManyExports:
            # Slots are the key's and the service's, as for HTTP exports: wait for one.
            await job_records.requeue(state, job, counts=False)
            # Handed back: nothing to publish while this process's slot waits.
            await publisher.stop()
            await asyncio.sleep(self.settings.job_poll_s)
            return
        except (JobFailed, QueryError, CursorsUnavailable, *ENCODING_ERRORS) as exc:
            # (ENCODING_ERRORS: a filter value the exported database's encoding cannot hold.)
            await export_log.record_refusal(state, logged, 400, str(exc))
            await job_records.end(state, job, "failed", str(exc))
            await publisher.error(InvalidRequest(str(exc), title="Job failed").problem())
            return
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._stopped(job, watch, publisher)
            raise
        except TRANSIENT as exc:
            # The database, not the job: run it again later (a bounded number of times).
            log.warning("job %s could not start: %s", job.id, exc)
            await self._later(job, publisher, "the database could not be reached")
            return
        except Exception as exc:
            log.warning("job %s could not start: %s", job.id, exc)
            await job_records.end(state, job, "failed", f"could not start: {exc}")
            await publisher.error(
                ExporterError(f"could not start: {exc}", title="Job failed").problem()
            )
            return
        watch.stream = stream
        publisher.estimated_rows = estimated_rows(stream.query)
        await export_log.record_start(state, logged)
        name = file_name(job)
        part: Path | None = None
        outcome, error = "failed", None
        try:
            # Inside the try: a spool that cannot be written (its directory cannot be made, a
            # full disk) fails the job like any other failure, and the stream is released.
            part = self.files.part_path(job)
            written = await self.files.write(stream, part, give_up_at, too_long)
            # The export has ended and released its snapshot: the store's pace is no longer
            # the database's concern.
            await self.files.keep(part, name, job)
            # From here the run ends as it finished: a drain's cancel waits (the file is
            # stored, and recording it takes a moment), as DELETE and a lost claim do (the
            # heartbeat stands back, and finish() checks both).
            watch.finishing = True
            with anyio.CancelScope(shield=True):
                outcome, error = await self._record_finish(job, stream, written, name, publisher)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                outcome, error = await self._stopped(job, watch, publisher)
            raise
        except SpoolError as exc:
            log.warning("job %s: its file could not be written: %s", job.id, exc)
            error = "the job's file could not be written on the server"
            await job_records.end(state, job, "failed", error)
            await publisher.error(ExporterError(error, title="Job failed").problem())
        except StoreError as exc:
            log.warning("job %s: the file store failed: %s", job.id, exc)
            error = "the job's file could not be stored"
            if exc.transient:
                # The store, not the job: run it again later (a bounded number of times).
                await self._later(job, publisher, error)
            else:
                await job_records.end(state, job, "failed", error)
                await publisher.error(ExporterError(error, title="Job failed").problem())
        except Exception as exc:
            error = str(exc)[:1000]
            await job_records.end(state, job, "failed", error)
            if stream.aborted_by is not None:
                outcome = "aborted"
                await publisher.error(LimitExceeded(error).problem())
            else:
                await publisher.error(ExporterError(error, title="Job failed").problem())
        finally:
            with anyio.CancelScope(shield=True):
                # Idempotent: released already unless the file could not be opened.
                await stream.aclose()
                if part is not None:
                    await anyio.to_thread.run_sync(part.unlink, True)
                await export_log.record_end(
                    state,
                    logged,
                    outcome=outcome,
                    status=200,
                    rows=stream.rows,
                    bytes_sent=stream.bytes,
                    error=error,
                    aborted_by=stream.aborted_by,
                )

    async def _record_finish(
        self,
        job: Job,
        stream: KeyExport,
        written: SeekableGzipWriter,
        name: str,
        publisher: Publisher,
    ) -> tuple[str, str | None]:
        """The stored file recorded as the job's; (outcome, error) for the export log."""
        state = self.databases.state
        kept = await job_records.finish(
            state,
            job,
            rows=stream.rows,
            size=stream.bytes,
            file_name=name,
            file_bytes=written.size,
            seek_points=written.seek_points,
            cursor=stream.pull.next_cursor,
            retention_s=self.settings.job_retention_s,
        )
        if kept:
            await publisher.done(download_url=f"/exports/{job.id}/download")
            return "completed", None
        await self.files.delete(name)
        if await job_records.end(state, job, "cancelled", None):
            # Asked to stop after the last heartbeat: cancelled all the same.
            await publisher.error(ClientClosedRequest("cancelled", title="Job cancelled").problem())
            return "disconnected", "cancelled"
        return "failed", "the job's claim was lost (it runs again elsewhere)"

    async def _stopped(self, job: Job, watch: "_Watch", publisher: Publisher) -> tuple[str, str]:
        """A run cancelled: by DELETE, by the loss of its claim, or by this process shutting
        down (the job is handed back at once rather than after its lease, uncounted)."""
        state = self.databases.state
        if watch.stopped == "revoked":
            # `keys revoke` has ended the job already (this makes sure, if it raced a claim).
            await job_records.end(state, job, "failed", JOB_REVOKED)
            await publisher.error(ExporterError(JOB_REVOKED, title="Job failed").problem())
            return "failed", REVOKED
        if watch.stopped == "cancelled":
            await job_records.end(state, job, "cancelled", None)
            await publisher.error(ClientClosedRequest("cancelled", title="Job cancelled").problem())
            return "disconnected", "cancelled"
        if watch.stopped is None:
            if not watch.finishing:
                # Perhaps stored, not recorded: the run again (under the same attempt number,
                # uncounted) writes the same name, which a sweep must not find stale.
                await self.files.delete(file_name(job))
            await job_records.requeue(state, job, counts=False)
            return "disconnected", "this process stopped; the job runs again"
        return "failed", "the job's claim was lost (it runs again elsewhere)"

    async def _later(self, job: Job, publisher: Publisher, reason: str) -> None:
        """A run that met a failure of the database or the store: queued again (counted), or
        failed once it has had MAX_ATTEMPTS runs."""
        if job.attempts >= job_records.MAX_ATTEMPTS:
            error = f"{reason} ({job.attempts} runs)"
            await job_records.end(self.databases.state, job, "failed", error)
            await publisher.error(ServiceUnavailable(error, title="Job failed").problem())
            return
        await job_records.requeue(self.databases.state, job, counts=True)
        # This process's slot waits a little before it claims again, publishing nothing.
        await publisher.stop()
        await asyncio.sleep(self.settings.job_poll_s)

    async def _open(self, job: Job) -> KeyExport:
        settings, databases = self.settings, self.databases
        key = await key_by_id(databases.state, job.key_id)
        if key is None:
            raise JobFailed("the job's key has been revoked or has expired")
        dataset = None
        if key.may_read(job.dataset):
            dataset = await find_dataset(
                databases.catalog, settings.exposed_schemas, job.dataset, role=key.role
            )
        if dataset is None:
            raise JobFailed(f"no dataset named {job.dataset!r}")
        encoder = ENCODERS[job.format]
        query = parse_query(
            dataset, job.params, max_limit=settings.max_limit, max_in_items=settings.max_in_items
        )
        secret = await databases.cursor_secret()
        # Without a secret, a since= job would have run as a whole export: it fails instead.
        since = pull_cursor(query, job.format, key.role, secret)
        stream = KeyExport(
            query, encoder, key, databases, settings, f"exporter job {job.id}", secret, since
        )
        await stream.open()
        return stream


def _counts(stream: ExportStream | None) -> tuple[int, int]:
    return (stream.rows, stream.bytes) if stream is not None else (0, 0)
