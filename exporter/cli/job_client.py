"""`exporter export ... --job`: submit a background job to a running service, show its progress
from the event stream, and download the file, resuming where a broken connection left it.

Standard library only (urllib): the CLI's other commands need no HTTP client, and this one
needs little of one.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from exporter.cli.file_export import Output, Progress, export_params
from exporter.errors import BAD_INPUT, FAILED, ExporterError, InvalidRequest, ServiceUnavailable

# Reconnections of the event stream, and resumptions of the download, before giving up.
ATTEMPTS = 5
# The pause before reconnecting to an event stream that ended with events but without the
# job's end: its process began to shut down (as the service's retry: field).
RECONNECT_S = 2.0
CHUNK = 64 * 1024


class _Unreachable(ServiceUnavailable):
    """The service could not be reached, or answered 502/503/504: a restart or an overload,
    worth trying again (a bounded number of times)."""


class _Service:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        code: int = FAILED,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.key}")
        request.add_header("Accept-Encoding", "identity")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            return urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as exc:
            if exc.code in (502, 503, 504):
                raise _Unreachable(_problem_text(exc)) from None
            raise ExporterError(_problem_text(exc), exit_code=code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _Unreachable(f"cannot reach {self.url}: {exc}", exit_code=BAD_INPUT) from None


def _problem_text(exc: urllib.error.HTTPError) -> str:
    try:
        problem = json.loads(exc.read())
        return f"{exc.code} {problem.get('title', '')}: {problem.get('detail', '')}"
    except (ValueError, OSError):
        return f"{exc.code} {exc.reason}"


def _events(response: BinaryIO) -> Iterator[tuple[int, str, dict[str, Any]]]:
    fields: dict[str, str] = {}
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if "data" in fields:
                yield (
                    int(fields.get("id", "0")),
                    fields.get("event", ""),
                    json.loads(fields["data"]),
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def _follow(service: _Service, events_url: str, progress: Progress) -> dict[str, Any]:
    """The job's `done` event, showing progress on the way; reconnects with Last-Event-ID."""
    last = 0
    failures = 0
    while failures < ATTEMPTS:
        headers = {"Accept": "text/event-stream"}
        if last:
            headers["Last-Event-ID"] = str(last)
        before = last
        try:
            with service.request("GET", events_url, headers=headers) as response:
                for seq, event, data in _events(response):
                    last = seq
                    if event == "progress":
                        progress.total = data.get("estimated_rows") or progress.total
                        progress.update(int(data["rows"]))
                    elif event == "done":
                        return data
                    elif event == "error":
                        raise ExporterError(f"the job failed: {data.get('detail')}")
        except (OSError, ValueError, http.client.HTTPException, _Unreachable):
            # A broken stream (cut inside a chunk, say), or a service restarting: follow it
            # again.
            pass
        if last != before:
            # Events came: a stream ended by a process shutting down (the service ends them
            # at once, to be followed elsewhere) is no failure, however many a job outlives.
            failures = 0
            time.sleep(RECONNECT_S)
        else:
            time.sleep(min(2**failures, 10))
            failures += 1
    raise ExporterError("lost the job's event stream")


def _download(service: _Service, url: str, output: Output, size: int) -> None:
    """The file into `output`, resuming after a broken connection with a Range request."""
    written = 0
    for attempt in range(ATTEMPTS):
        headers = {"Range": f"bytes={written}-"} if written and output.target else {}
        try:
            with service.request("GET", url, headers=headers) as response:
                if written and response.status != 206:
                    raise ExporterError("the service did not resume the download")
                while chunk := response.read(CHUNK):
                    output.write(chunk)
                    written += len(chunk)
            if written == size:
                return
        except (OSError, http.client.HTTPException, _Unreachable):
            if output.target is None and written:
                # stdout cannot be rewound: what was written stays written.
                raise ExporterError(f"the download broke after {written} bytes") from None
        time.sleep(min(2**attempt, 10))
    raise ExporterError(f"the download stopped at {written} of {size} bytes")


def export_as_job(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("EXPORTER_URL", "http://127.0.0.1:8000")
    key = os.environ.get("EXPORTER_KEY")
    if not key:
        raise InvalidRequest("--job needs the service's key in EXPORTER_KEY")
    service = _Service(url, key)
    params: dict[str, list[str]] = {}
    for name, value in export_params(args):
        params.setdefault(name, []).append(value)
    body = {"dataset": args.dataset, "format": args.format, "params": params}
    # Refused (a bad dataset, column or value): the export could not start.
    with service.request("POST", "/exports", body, code=BAD_INPUT) as response:
        job = json.loads(response.read())
    progress = Progress(sys.stderr)
    progress.start()
    try:
        done = _follow(service, job["events_url"], progress)
        with Output(args.output) as output:
            _download(service, job["download_url"], output, int(done["bytes"]))
            output.commit()
        progress.update(int(done["rows"]), final=True)
    finally:
        progress.close()
    where = "" if args.output == "-" else f" to {Path(args.output)}"
    print(f"{done['rows']} rows, {done['bytes']} bytes{where} (job {job['id']})", file=sys.stderr)
    return 0
