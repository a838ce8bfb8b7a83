"""A job's file: written from its export into the spool (gzip with seek points), moved into
the store, deleted with its job, and swept when nothing needs it any more."""

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio

from exporter.db.pool import Pool
from exporter.jobs import records as job_records
from exporter.jobs.events import prune as prune_events
from exporter.jobs.records import Job
from exporter.jobs.seekable_gzip import SeekableGzipWriter
from exporter.pipeline.stream import ExportStream
from exporter.settings import Settings
from exporter.storage import open_store
from exporter.storage.local import Spool
from exporter.storage.store import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Level 1: about 110 MB/s of one core on the benchmark's CSV (exporter/http/compression.py),
# faster than an export runs; a job's file is read back by downloads, where size matters less
# than the database's time.
GZIP_LEVEL = 1

# Pauses between tries to store a job's file in a store that cannot be reached.
STORE_RETRY_PAUSES_S = (1.0, 3.0)


class SpoolError(Exception):
    """The job's file could not be written on this server (its directory, its disk): the
    server's fault, not the job's. The message, with paths, is for the server's log."""


def file_name(job: Job) -> str:
    # Made here (job ids are generated), never taken from a request. One name per attempt:
    # a run again under the same attempt number writes the same name.
    return f"{job.id}-{job.attempts}.gz"


class JobFiles:
    """The spool a process writes job files into and the store they are kept in (one store,
    and for S3 one connection pool, per process)."""

    def __init__(self, state: Pool, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        self.spool = Spool(Path(settings.job_dir))
        self.store = open_store(settings)

    async def aclose(self) -> None:
        await self.store.aclose()

    def part_path(self, job: Job) -> Path:
        try:
            return self.spool.part_path(job.id, job.attempts)
        except OSError as exc:
            raise SpoolError(exc) from exc

    async def write(
        self, stream: ExportStream, part: Path, give_up_at: float, too_long: str
    ) -> SeekableGzipWriter:
        """The export into `part`, gzip-compressed with seek points (aborted at
        `give_up_at`)."""
        compressor = SeekableGzipWriter(GZIP_LEVEL)
        file: BinaryIO = await _on_disk(Spool.create, part)
        try:
            chunks = stream.chunks()
            try:
                with anyio.move_on_at(give_up_at) as deadline:
                    async for chunk in chunks:
                        data = compressor.compress(chunk)
                        if data:
                            await _on_disk(file.write, data)
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            # (A deadline that struck as the export completed is no abort.)
            if deadline.cancelled_caught and not stream.completed:
                stream.abort("max_seconds", too_long.removeprefix("max_seconds: "))
            if not stream.completed:
                raise RuntimeError(str(stream.error) if stream.error else "the export stopped")
            await _on_disk(file.write, compressor.finish())
            await _on_disk(_sync, file)
            return compressor
        finally:
            file.close()

    async def keep(self, part: Path, name: str, job: Job) -> None:
        """The file into the store; a store that cannot be reached is tried again a few
        times, with pauses, before the job is (its export would be run again for nothing)."""
        for pause_s in STORE_RETRY_PAUSES_S:
            try:
                await self.store.keep(part, name)
                return
            except StoreError as exc:
                if not exc.transient:
                    raise
                log.warning("job %s: storing its file failed, trying again: %s", job.id, exc)
            await asyncio.sleep(pause_s)
        await self.store.keep(part, name)

    async def delete(self, name: str) -> None:
        """Best effort: a file left behind is the sweep's (no job needs it)."""
        try:
            await self.store.delete(name)
        except StoreError as exc:
            log.warning("could not delete %s from the store (the sweep will): %s", name, exc)

    async def expire_forever(self) -> None:
        """Expired and orphaned files deleted, every poll interval (each process; deletion is
        idempotent)."""
        stale_s = self.settings.job_lease_s * 2
        # Listing a bucket costs requests (and money): not every poll.
        store_sweep_s = max(stale_s, 60.0)
        last_store_sweep = -math.inf
        while True:
            await asyncio.sleep(max(self.settings.job_poll_s, 1.0))
            try:
                for job in await job_records.expire(self.state):
                    if job.file_name:
                        await self.delete(job.file_name)
                in_use = await job_records.files_in_use(self.state)
                for path in await self.spool.orphans(in_use, stale_s):
                    log.info("deleting %s: no job writes it", path.name)
                    path.unlink(missing_ok=True)
                if time.monotonic() - last_store_sweep >= store_sweep_s:
                    last_store_sweep = time.monotonic()
                    for name in await self.store.orphans(in_use, stale_s):
                        log.info("deleting %s from the store: no job needs it", name)
                        await self.delete(name)
                await prune_events(self.state, self.settings.job_retention_s)
            except Exception as exc:
                log.warning("could not expire job files: %s", exc)


async def _on_disk(call: Callable[..., T], *args: object) -> T:
    """`call(*args)` in a worker thread; its OSError (a full disk, say) a SpoolError. Only the
    file's own calls: an OSError of the database's connection is the database's."""
    try:
        return await anyio.to_thread.run_sync(call, *args)
    except OSError as exc:
        raise SpoolError(exc) from exc


def _sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
