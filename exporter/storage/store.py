"""Where background jobs keep their files: a local directory (the default) or an S3-compatible
bucket (exporter/storage/s3.py, when EXPORTER_JOB_S3_BUCKET is set).

A job writes its gzip file into the spool (EXPORTER_JOB_DIR, always local: appending to an
object is not something S3 does, and a local file keeps the database's pace out of the
network's) and, once the export has ended and its snapshot is released, hands it to the store
under its final name. Downloads read a stored file from any byte offset.
"""

import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

# Bytes per read of a stored file.
CHUNK = 64 * 1024
PART_SUFFIX = ".part"
# What the store makes: `<job id>-<attempt>.gz`, and `.part` in the spool. The sweeps delete
# nothing else, in case the directory or the bucket's prefix is shared.
JOB_FILE = re.compile(r"[0-9a-f]{32}-[0-9]{1,9}\.gz")
PART_FILE = re.compile(r"[0-9a-f]{32}-[0-9]{1,9}\.part")


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
