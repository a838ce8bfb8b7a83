"""Pure ASGI middleware: it sees streaming responses' headers without buffering their bodies
(Starlette's BaseHTTPMiddleware would put a queue in the middle of every stream)."""

import contextvars
import logging
import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.errors import (
    ContentTooLarge,
    ExporterError,
    HeaderFieldsTooLarge,
    InvalidRequest,
    LengthRequired,
)
from exporter.http.problems import send_problem

REQUEST_ID_HEADER = "X-Request-Id"
# What a request id may be (and so an export's id: a job's is a generated hex string): what
# is not, names no export.
REQUEST_ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
_WELL_FORMED_REQUEST_ID = re.compile(REQUEST_ID_PATTERN.encode())

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestIdMiddleware:
    """Accept a well-formed incoming X-Request-Id, else make one; echo it on every response
    and put it in the logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"")
        if _WELL_FORMED_REQUEST_ID.fullmatch(incoming):
            request_id = incoming.decode()
        else:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


# The interactive docs load scripts and styles; every other response is data.
_DOCS_PATHS = ("/docs", "/redoc")
_API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_docs = str(scope.get("path", "")).startswith(_DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if not is_docs:
                    headers.setdefault("Content-Security-Policy", _API_CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# What no client of this API sends. uvicorn's default parser (httptools) bounds the request
# line (~64 KiB) but not the header section: a 30 MB header reached the app. Past these
# bounds a request is refused before anything else is done for it (a key lookup, say).
MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 32 * 1024


# Far above any job request (POST /exports), the only route that reads a body.
MAX_BODY_BYTES = 64 * 1024
BODY_ROUTES = frozenset({"/exports", "/exports/"})


class HeaderLimitsMiddleware:
    """431 for too many or too large header fields; 400 for two Authorization fields, where a
    proxy in front might have judged one and the app would read the other; 411 and 413 for a
    request body of unknown or excessive length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > MAX_HEADER_FIELDS:
            await send_problem(
                send, scope, HeaderFieldsTooLarge(f"at most {MAX_HEADER_FIELDS} header fields")
            )
            return
        if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
            await send_problem(
                send,
                scope,
                HeaderFieldsTooLarge(
                    f"at most {MAX_HEADER_BYTES} bytes of header names and values"
                ),
            )
            return
        if sum(1 for name, _ in headers if name == b"authorization") > 1:
            await send_problem(
                send,
                scope,
                InvalidRequest("more than one Authorization header", title="Bad Request"),
            )
            return
        if scope["method"] == "POST" and scope["path"] in BODY_ROUTES:
            # A body is parsed whole, before the key is checked: its size is known and bounded
            # first (a chunked body of unknown length is refused). Other methods and paths
            # take no body: routing answers them (405, 404).
            lengths = [value for name, value in headers if name == b"content-length"]
            if len(lengths) != 1 or not lengths[0].isdigit():
                await send_problem(send, scope, LengthRequired("send one Content-Length"))
                return
            if int(lengths[0]) > MAX_BODY_BYTES:
                await send_problem(
                    send,
                    scope,
                    ContentTooLarge(f"a request body is at most {MAX_BODY_BYTES} bytes"),
                )
                return
        await self.app(scope, receive, send)


class UnexpectedErrorMiddleware:
    """Turn an unexpected exception into a problem+json 500 inside the other middleware, so
    that it carries the request id and security headers. Once a response has started, the
    exception is re-raised: the server then aborts the response, the only honest signal left."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if started:
                raise
            logging.getLogger("exporter").exception("unhandled error")
            await send_problem(send, scope, ExporterError())
