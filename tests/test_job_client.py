"""`exporter export --job` following a job's events across streams that end early, as those of a
process shutting down do (the service's side: tests/test_shutdown.py). A stand-in service:
only the client's reconnections are under test."""

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exporter.cli import job_client
from exporter.cli.file_export import Progress
from tests.support.server import free_port

# More streams ended early than the client's attempts: only failures may use those up.
STREAMS = job_client.ATTEMPTS + 2


def serve_events(port: int = 0) -> tuple[ThreadingHTTPServer, list[str | None]]:
    """Each stream sends the next progress event, then ends cleanly; the last one `done`."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            last = self.headers.get("Last-Event-ID")
            seen.append(last)
            n = int(last or 0) + 1
            event = "done" if n == STREAMS else "progress"
            body = f"retry: 2000\n\nid: {n}\nevent: {event}\ndata: {json.dumps({'rows': n})}\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler), seen


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def draining_service() -> Iterator[tuple[str, list[str | None]]]:
    server, seen = serve_events()
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}", seen


def test_streams_ended_with_events_are_followed_without_giving_up(
    draining_service: tuple[str, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = draining_service
    monkeypatch.setattr(job_client, "RECONNECT_S", 0)
    service = job_client._Service(url, "key")
    done = job_client._follow(service, "/exports/x/events", Progress(io.StringIO()))
    assert done == {"rows": STREAMS}
    # Each reconnection resumed after the last event received.
    assert seen == [None, *(str(n) for n in range(1, STREAMS))]


def test_a_service_that_restarts_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at first (a restart): the client tries again instead of giving up."""
    monkeypatch.setattr(job_client, "RECONNECT_S", 0)
    port = free_port()
    service = job_client._Service(f"http://127.0.0.1:{port}", "key")
    server: list[ThreadingHTTPServer] = []

    def start_late() -> None:
        time.sleep(1.5)
        server.append(serve_events(port)[0])
        server[0].serve_forever()

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        done = job_client._follow(service, "/exports/x/events", Progress(io.StringIO()))
        assert done == {"rows": STREAMS}
    finally:
        while not server:
            time.sleep(0.05)
        server[0].shutdown()
        server[0].server_close()
        thread.join()


def test_a_stream_cut_inside_a_chunk_is_followed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed mid-write leaves a chunked stream cut inside a chunk (an
    http.client.IncompleteRead, not an OSError): the client reconnects."""
    monkeypatch.setattr(job_client, "RECONNECT_S", 0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for n in (1, 2, 3):
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                event = "done" if n == 3 else "progress"
                body = f"id: {n}\nevent: {event}\ndata: {json.dumps({'rows': n})}\n\n".encode()
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                chunk = b"%x\r\n%s\r\n" % (len(body), body)
                # The last stream ends properly; the others are cut inside their next chunk.
                tail = b"0\r\n\r\n" if n == 3 else b"40\r\nid: 9"
                connection.sendall(head + chunk + tail)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        service = job_client._Service(f"http://127.0.0.1:{port}", "key")
        done = job_client._follow(service, "/exports/x/events", Progress(io.StringIO()))
        assert done == {"rows": 3}
    finally:
        thread.join(10)
        listener.close()
