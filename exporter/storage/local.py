"""Job files in a local directory: the spool where running jobs write, and the default store
(keeping a spooled file is then a rename)."""

import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread

from exporter.storage.store import CHUNK, JOB_FILE, PART_FILE, PART_SUFFIX, ByteSource, FileGone


class Spool:
    """The local directory where running jobs write (`<job id>-<attempt>.part`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def part_path(self, job_id: str, attempt: int) -> Path:
        # Names are made here (job ids are generated), never taken from a request.
        private_directory(self.directory)
        return self.directory / f"{job_id}-{attempt}{PART_SUFFIX}"

    @staticmethod
    def create(part: Path) -> BinaryIO:
        """`part` opened for writing, readable by this user only (0600), whatever the umask;
        renamed into the store, the job's file keeps that mode."""
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a part left by an earlier run keeps its old mode otherwise
            return os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise

    async def orphans(self, in_use: set[str], older_than_s: float) -> list[Path]:
        """Parts no running attempt writes (their writer was killed), untouched for
        older_than_s."""
        return await anyio.to_thread.run_sync(
            _stale_files, self.directory, in_use, older_than_s, True
        )


def private_directory(directory: Path) -> None:
    """`directory`, made 0700 if this process creates it (whatever the umask): job files are
    exports, for their keys only. One that exists keeps the mode its operator gave it."""
    if directory.is_dir():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        return  # another worker made it a moment ago
    os.chmod(directory, 0o700)


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
        if not (PART_FILE if parts else JOB_FILE).fullmatch(path.name) or path.name in in_use:
            continue
        try:
            if path.stat().st_mtime < cutoff:
                stale.append(path)
        except FileNotFoundError:  # deleted meanwhile (by another process's sweep)
            pass
    return stale
