"""Where background jobs keep their files: a local directory (the default) or an S3-compatible
bucket (exporter/storage/s3.py, when EXPORTER_JOB_S3_BUCKET is set).

A job writes its gzip file into the spool (EXPORTER_JOB_DIR, always local: appending to an
object is not something S3 does, and a local file keeps the database's pace out of the
network's) and, once the export has ended and its snapshot is released, hands it to the store
under its final name. Downloads read a stored file from any byte offset.
"""

import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import anyio
import anyio.to_thread

from exporter.settings import Settings

# Bytes per read of a stored file.
CHUNK = 64 * 1024
PART_SUFFIX = ".part"
# What the store makes: `<job id>-<attempt>.gz`, and `.part` in the spool. The sweeps delete
# nothing else, in case the directory or the bucket's prefix is shared.
JOB_FILE = re.compile(r"[0-9a-f]{32}-[0-9]{1,9}\.gz")
_PART_FILE = re.compile(r"[0-9a-f]{32}-[0-9]{1,9}\.part")


class StoreError(Exception):
    """The store failed a request. `transient`: it was unreachable or overloaded (worth
    trying again later); otherwise it refused (a missing bucket, wrong credentials)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class FileGone(StoreError):
    """The file is not in the store (deleted, or expired)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not in the store", transient=False)


class ByteSource(Protocol):
    async def read(self) -> bytes:
        """The next chunk of the file (at most CHUNK bytes); b"" at its end."""
        ...


class FileStore(Protocol):
    async def keep(self, part: Path, name: str) -> None:
        """The spooled file `part` stored as `name` (replacing any file of that name); `part`
        is gone afterwards."""
        ...

    async def size(self, name: str) -> int | None:
        """The stored file's size in bytes; None if there is no such file."""
        ...

    def reader(
        self, name: str, start: int, end: int | None = None
    ) -> AbstractAsyncContextManager[ByteSource]:
        """The file's bytes from offset `start` (to `end`, or beyond: a reader reads what it
        needs); StoreError if it cannot be read."""
        ...

    async def delete(self, name: str) -> None:
        """Idempotent: deleting a file that is not there is no error."""
        ...

    async def orphans(self, in_use: set[str], older_than_s: float) -> list[str]:
        """Names of stored files not in `in_use`, untouched for `older_than_s`: a file stored a
        moment ago may not be recorded by its job yet."""
        ...

    async def aclose(self) -> None: ...


class Spool:
    """The local directory where running jobs write (`<job id>-<attempt>.part`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def part_path(self, job_id: str, attempt: int) -> Path:
        # Names are made here (job ids are generated), never taken from a request.
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{job_id}-{attempt}{PART_SUFFIX}"

    async def orphans(self, in_use: set[str], older_than_s: float) -> list[Path]:
        """Parts no running attempt writes (their writer was killed), untouched for
        older_than_s."""
        return await anyio.to_thread.run_sync(
            _stale_files, self.directory, in_use, older_than_s, True
        )


class LocalStore:
    """Files in a local directory (the spool's: keeping a file is a rename). Every worker
    process of a host shares it; replicas on several hosts need a shared directory, or S3."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / name

    async def keep(self, part: Path, name: str) -> None:
        await anyio.to_thread.run_sync(os.replace, part, self.path(name))

    async def size(self, name: str) -> int | None:
        # One stat of a local file: not worth a thread.
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def reader(
        self, name: str, start: int, end: int | None = None
    ) -> AbstractAsyncContextManager[ByteSource]:
        return self._reader(name, start)

    @asynccontextmanager
    async def _reader(self, name: str, start: int) -> AsyncIterator[ByteSource]:
        opened: list[BinaryIO] = []

        def open_file() -> BinaryIO:
            # Kept where the finally below sees it, even if this await is cancelled.
            opened.append(self.path(name).open("rb"))
            opened[0].seek(start)
            return opened[0]

        try:
            try:
                file = await anyio.to_thread.run_sync(open_file)
            except FileNotFoundError as exc:
                raise FileGone(name) from exc
            yield _FileSource(file)
        finally:
            for file in opened:
                file.close()

    async def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    async def orphans(self, in_use: set[str], older_than_s: float) -> list[str]:
        paths = await anyio.to_thread.run_sync(
            _stale_files, self.directory, in_use, older_than_s, False
        )
        return [path.name for path in paths]

    async def aclose(self) -> None:
        pass


class _FileSource:
    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    async def read(self) -> bytes:
        return await anyio.to_thread.run_sync(self._file.read, CHUNK)


def _stale_files(directory: Path, in_use: set[str], older_than_s: float, parts: bool) -> list[Path]:
    if not directory.is_dir():
        return []
    cutoff = time.time() - older_than_s
    stale = []
    for path in directory.iterdir():
        if not (_PART_FILE if parts else JOB_FILE).fullmatch(path.name) or path.name in in_use:
            continue
        try:
            if path.stat().st_mtime < cutoff:
                stale.append(path)
        except FileNotFoundError:  # deleted meanwhile (by another process's sweep)
            pass
    return stale


def open_store(settings: Settings) -> FileStore:
    """The store the settings name; S3's client is imported only when it is used."""
    if settings.job_s3_bucket:
        from exporter.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    return LocalStore(Path(settings.job_dir))
