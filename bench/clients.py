"""The clients, each a subprocess timed by wall clock, with its own CPU time (wait4) to show
that the client is not what limits a run: curl discarding the body, psql running \\copy."""

import os
import subprocess
import time
from dataclasses import dataclass
from typing import IO

CURL_FORMAT = (
    "%{http_code} %{time_starttransfer} %{time_total} %{size_download} %header{content-encoding}"
)


@dataclass(frozen=True)
class Finished:
    wall_s: float
    cpu_s: float  # user + system of the client process
    max_rss_bytes: int
    stdout: bytes
    stderr: bytes


class Running:
    """A started client; `finish()` waits for it and reads its resource usage."""

    def __init__(self, argv: list[str], stdout: int | IO[bytes] = subprocess.PIPE) -> None:
        self.argv = argv
        self.started = time.perf_counter()
        self.process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE)

    def finish(self) -> Finished:
        out, err = self._read()
        _, status, usage = os.wait4(self.process.pid, 0)
        ended = time.perf_counter()
        # Reaped here, so that Popen does not wait for it again.
        self.process.returncode = os.waitstatus_to_exitcode(status)
        if self.process.returncode != 0:
            raise RuntimeError(
                f"{self.argv[0]} exited with {self.process.returncode}: "
                f"{err.decode(errors='replace').strip()}"
            )
        return Finished(
            wall_s=ended - self.started,
            cpu_s=usage.ru_utime + usage.ru_stime,
            max_rss_bytes=usage.ru_maxrss * 1024,
            stdout=out,
            stderr=err,
        )

    def _read(self) -> tuple[bytes, bytes]:
        out = self.process.stdout.read() if self.process.stdout else b""
        err = self.process.stderr.read() if self.process.stderr else b""
        return out, err


@dataclass(frozen=True)
class HttpRun:
    wall_s: float
    client_cpu_s: float
    ttfb_s: float
    total_s: float
    bytes: int
    content_encoding: str


def curl(url: str, key: str, coding: str | None = None) -> Running:
    """Starts curl fetching `url`, writing the body to /dev/null. With a coding, as
    `curl --compressed` but asking for that coding alone: curl decodes the body (its CPU time
    includes that), and `size_download` counts the compressed bytes received."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "1800", "-o", os.devnull]
    argv += ["-H", f"Authorization: Bearer {key}", "-w", CURL_FORMAT]
    if coding:
        argv += ["--compressed", "-H", f"Accept-Encoding: {coding}"]
    return Running([*argv, url])


def http_result(done: Finished, url: str) -> HttpRun:
    fields = done.stdout.decode().split()
    code, ttfb, total, size = fields[:4]
    if code != "200":
        raise RuntimeError(f"GET {url}: HTTP {code}")
    return HttpRun(
        wall_s=done.wall_s,
        client_cpu_s=done.cpu_s,
        ttfb_s=float(ttfb),
        total_s=float(total),
        bytes=int(size),
        content_encoding=fields[4] if len(fields) > 4 else "",
    )


def curl_decodes(coding: str) -> bool:
    """Whether this curl can decode the coding (`curl -V` lists libz for gzip, zstd for zstd)."""
    done = subprocess.run(["curl", "-V"], capture_output=True, text=True)
    features = next((line for line in done.stdout.splitlines() if line.startswith("Features:")), "")
    return {"gzip": "libz", "zstd": "zstd"}[coding] in features.split()


def fetch(url: str, key: str, coding: str | None = None) -> HttpRun:
    return http_result(curl(url, key, coding).finish(), url)


def fetch_concurrently(urls: list[str], key: str) -> tuple[float, list[HttpRun]]:
    """All at once; the wall time from the first start until the last one ends."""
    started = time.perf_counter()
    running = [curl(url, key) for url in urls]
    results = [http_result(r.finish(), r.argv[-1]) for r in running]
    return time.perf_counter() - started, results


@dataclass(frozen=True)
class PsqlRun:
    wall_s: float
    client_cpu_s: float


def psql_argv(database_url: str, command: str) -> list[str]:
    return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database_url, "-c", command]


def psql_copy(database_url: str, command: str) -> PsqlRun:
    """psql's \\copy to stdout, into /dev/null, timed."""
    with open(os.devnull, "wb") as sink:
        done = Running(psql_argv(database_url, command), stdout=sink).finish()
    return PsqlRun(wall_s=done.wall_s, client_cpu_s=done.cpu_s)


def psql_copy_bytes(database_url: str, command: str) -> int:
    """The size of psql's output, counted through a pipe (an untimed run)."""
    process = subprocess.Popen(psql_argv(database_url, command), stdout=subprocess.PIPE)
    assert process.stdout is not None
    total = 0
    while chunk := process.stdout.read(1 << 20):
        total += len(chunk)
    if process.wait() != 0:
        raise RuntimeError(f"psql failed: {command}")
    return total
