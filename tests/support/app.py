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

import anyio
import anyio.from_thread
import httpx
from anyio.from_thread import BlockingPortal

from exporter.http.app import create_app
from exporter.settings import Settings


class PortalTransport(httpx.BaseTransport):
    """httpx.ASGITransport for a synchronous client: each request runs on the portal's loop,
    within the client's read timeout (the ASGI transport keeps none: a hung app would hang
    the test)."""

    def __init__(self, portal: BlockingPortal, transport: httpx.ASGITransport) -> None:
        self.portal = portal
        self.transport = transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout_s = request.extensions.get("timeout", {}).get("read")

        async def send() -> httpx.Response:
            try:
                with anyio.fail_after(timeout_s):
                    response = await self.transport.handle_async_request(request)
                    # The bytes as the app sent them: the client decodes a Content-Encoding
                    # (as it would from a socket), and iter_raw() shows them undecoded.
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
            except TimeoutError:
                raise httpx.ReadTimeout("the app did not answer in time", request=request) from None
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(raw),
                extensions=response.extensions,
                request=request,
            )

        return self.portal.call(send)


@contextlib.contextmanager
def in_process_app(
    database_url: str, tmp_path: Path, key: str | None = None, **settings: str
) -> Iterator[httpx.Client]:
    """A client of the app, its lifespan run (pools opened, and closed at the block's end).
    `settings` are Settings' field names, values as strings (`use_copy="false"`), which win
    over the environment; unlike running_server's, an alias (`job_retention`) is not one."""
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
