"""`exporter serve` in a subprocess on a real socket, as users run it: started, waited for and
stopped by `running_server`, a context manager, so that no test writes its own try/finally."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# `exporter serve` with Python's cyclic garbage collector off: cleanup must not wait for it.
WITHOUT_GC = "import gc, sys; gc.disable(); from exporter.cli.main import main; main(sys.argv[1:])"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """`exporter serve` in a subprocess on a real socket, as users run it."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, key: str | None, **kwargs: Any) -> httpx.Client:
        # httpx asks for gzip and zstd by default; tests read the export as it is written
        # (iter_raw included) unless they ask for a coding themselves (test_compression).
        headers = {"Accept-Encoding": "identity"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base_url, headers=headers, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(database_url: str, tmp_path: Path, workers: int = 1, **settings: str) -> Server:
    """A started server, answering /healthz; `settings` become its EXPORTER_ variables. Prefer
    `running_server`, which also stops it."""
    return launch(database_url, tmp_path, workers, settings, ["-m", "exporter"])


def launch(
    database_url: str,
    tmp_path: Path,
    workers: int,
    settings: dict[str, str],
    program: list[str],
) -> Server:
    """`python <program> serve ...` on a free port, once it answers /healthz."""
    port = free_port()
    env = {**os.environ, "EXPORTER_DATABASE_URL": database_url}
    # Background jobs are run only by the servers of the tests about them: every server shares
    # the jobs table, and one that claimed another test's job would run it elsewhere.
    settings = {"job_concurrency": "0", **settings}
    env.update({f"EXPORTER_{name.upper()}": value for name, value in settings.items()})
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *program,
                *("serve", "--port", str(port), "--workers", str(workers)),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server did not start:\n{server.log()}")


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL after 10 s; a server that has exited already is left as it is."""
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextlib.contextmanager
def stopping(server: Server) -> Iterator[Server]:
    """`server` for the `with` block, stopped at its end however it ends."""
    try:
        yield server
    finally:
        stop_server(server)


@contextlib.contextmanager
def running_server(
    database_url: str, tmp_path: Path, workers: int = 1, **settings: str
) -> Iterator[Server]:
    """A server for the `with` block (see start_server), stopped at its end however it ends."""
    with stopping(start_server(database_url, tmp_path, workers, **settings)) as server:
        yield server


@contextlib.contextmanager
def running_server_without_gc(
    database_url: str, tmp_path: Path, **settings: str
) -> Iterator[Server]:
    """As running_server, with Python's cyclic garbage collector off in the server, so that a
    test sees cleanup that does not wait for it."""
    with stopping(launch(database_url, tmp_path, 1, settings, ["-c", WITHOUT_GC])) as server:
        yield server
