"""The app in the test's own process, for routing, error and value cases that need settings of
their own but no socket: no `exporter serve` subprocess to start (about 2.5 s each on the
2-core machine), and tracebacks in the test's own output. Streaming, disconnects, truncation
and anything across processes stay on a real socket (tests/support/server.py): this client
reads a whole response before it returns.

Starlette's TestClient would do, but Starlette 1.x builds it on httpx2 (with httpx it warns
that this is deprecated) and the tests' helpers take an httpx.Client: so an httpx.Client over
httpx's own ASGITransport, its async calls made on the event loop of an anyio blocking portal
(a thread), which also runs the app's lifespan and its background tasks."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import anyio.from_thread
import httpx
from anyio.from_thread import BlockingPortal

from exporter.http.app import create_app
from exporter.settings import Settings


class PortalTransport(httpx.BaseTransport):
    """httpx.ASGITransport for a synchronous client: each request runs on the portal's loop."""

    def __init__(self, portal: BlockingPortal, transport: httpx.ASGITransport) -> None:
        self.portal = portal
        self.transport = transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self.transport.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                content=content,
                extensions=response.extensions,
                request=request,
            )

        return self.portal.call(send)


@contextlib.contextmanager
def in_process_app(
    database_url: str, tmp_path: Path, key: str | None = None, **settings: str
) -> Iterator[httpx.Client]:
    """A client of the app, its lifespan run (pools opened, and closed at the block's end);
    `settings` as for running_server (EXPORTER_ names in lower case, without the prefix)."""
    values = {
        "database_url": database_url,
        "job_dir": str(tmp_path / "jobs"),
        # As running_server: jobs are run only by the servers of the tests about them.
        "job_concurrency": "0",
        **settings,
    }
    app = create_app(Settings.model_validate(values))
    headers = {"Accept-Encoding": "identity"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            transport = PortalTransport(portal, httpx.ASGITransport(app=app))
            with httpx.Client(
                transport=transport, base_url="http://testserver", headers=headers, timeout=60
            ) as client:
                yield client
