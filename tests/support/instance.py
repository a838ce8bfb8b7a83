"""A PostgreSQL server of a test's own, from the machine's PostgreSQL binaries (`initdb`,
`pg_ctl`), which the test may stop, restart and shut down as an operator would. Tests that need
one skip, saying why, where the binaries are missing."""

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.server import free_port


def binaries() -> Path | None:
    """The directory of `initdb` and `pg_ctl`: on the PATH, or Debian's newest."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


@dataclass
class Instance:
    """A running server on 127.0.0.1:`port`, its cluster in `data_dir`."""

    bin_dir: Path
    data_dir: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
        command = [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if wait:
            try:
                _, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise
            if process.returncode != 0:
                raise RuntimeError(f"pg_ctl {' '.join(args)}: {stderr.decode(errors='replace')}")
        return process

    def start(self) -> None:
        log = self.data_dir.parent / "postgres.log"
        self.pg_ctl("-w", "-l", str(log), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "stop")


@contextlib.contextmanager
def private_instance() -> Iterator[Instance]:
    """A fresh cluster (trust authentication, TCP on a free port, its socket in its own
    directory), started; stopped (immediately) and deleted at the end."""
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (Debian: postgresql)")
    run_as: list[str] = []
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as another user")
    # Under the system's temporary directory, not pytest's (0700, which another user cannot
    # enter).
    root = Path(tempfile.mkdtemp(prefix="exporter-instance-"))
    try:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: as root, the cluster belongs to `postgres`.
            run_as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        with _started(bin_dir, root, run_as) as instance:
            yield instance
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _started(bin_dir: Path, root: Path, run_as: list[str]) -> Iterator[Instance]:
    data_dir = root / "data"
    subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{root}'\nfsync = off\n"
        )
    instance = Instance(bin_dir, data_dir, port, run_as)
    try:
        # Inside: a start that fails half-way (or times out) still stops what did start.
        instance.start()
        yield instance
    finally:
        with contextlib.suppress(Exception):
            instance.stop("immediate")
