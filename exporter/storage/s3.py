"""Job files in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), over HTTP with AWS
Signature Version 4.

Only what the store needs, with httpx (imported only when the store is configured: 3.6 MiB on
top of a serving process, where botocore's S3 client took 22 MiB, measured here): PUT of a
whole file up to PART_SIZE, multipart uploads beyond it, HEAD, ranged GET, DELETE,
ListObjectsV2, and ListMultipartUploads with abort for the uploads of a killed worker. Each part
is hashed before it is sent (a signed payload: an unsigned one may be refused over plain HTTP),
then streamed from the spool file: memory stays at a chunk, whatever the file's size.
"""

import hashlib
import hmac
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread
import httpx

from exporter.settings import Settings
from exporter.storage.store import CHUNK, JOB_FILE, ByteSource, FileGone, StoreError

# Parts of a multipart upload: S3 takes 5 MiB to 5 GiB each, at most 10,000 of them.
PART_SIZE = 16 * 1024 * 1024
MAX_PARTS = 10_000
# Read from the spool file this much at a time, to hash a part and to send it.
_READ = 1024 * 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Statuses and error codes that say "not now" rather than "no": overloaded, throttled, timed
# out.
_TRANSIENT_STATUSES = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"InternalError", "SlowDown", "RequestTimeout", "ServiceUnavailable"}


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    # Kept out of repr(), and so out of tracebacks and logs.
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls) -> "Credentials":
        """The AWS SDKs' variables. (Instance profiles and web identities are not read: set
        the variables from them, e.g. with `aws configure export-credentials --format env`.)"""
        access_key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not access_key_id or not secret:
            raise ValueError(
                "EXPORTER_JOB_S3_BUCKET is set: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                " must be too"
            )
        return cls(access_key_id, secret, os.environ.get("AWS_SESSION_TOKEN") or None)


def uri_encode(value: str, safe: str = "") -> str:
    """SigV4's encoding: every byte but A-Z a-z 0-9 - _ . ~ (and `safe`) percent-encoded."""
    return quote(value, safe="-_.~" + safe)


def sign(
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: dict[str, str],
    payload_sha256: str,
    credentials: Credentials,
    region: str,
    now: datetime,
) -> dict[str, str]:
    """The request's headers with x-amz-date, x-amz-content-sha256 (x-amz-security-token) and
    Authorization added (AWS Signature Version 4, service s3). `path` is already URI-encoded;
    `query` is not. Every header given is signed."""
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    signed = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    signed |= {"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256}
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    names = sorted(signed)
    canonical_request = "\n".join(
        [
            method,
            path,
            canonical_query(query),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope},"
        f" SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    return "&".join(
        f"{name}={value}"
        for name, value in sorted((uri_encode(k), uri_encode(v)) for k, v in query)
    )


class S3Store:
    def __init__(
        self,
        endpoint: str,
        bucket: str,
        prefix: str,
        region: str,
        path_style: bool,
        credentials: Credentials,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("EXPORTER_JOB_S3_ENDPOINT is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            # It would go into every Host header and log line: credentials go in AWS_*.
            raise ValueError("EXPORTER_JOB_S3_ENDPOINT may not carry a user name or password")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("EXPORTER_JOB_S3_ENDPOINT is a scheme, a host and a port only")
        self.host = parts.netloc if path_style else f"{bucket}.{parts.netloc}"
        self._origin = f"{parts.scheme}://{self.host}"
        self._bucket_path = f"/{uri_encode(bucket)}" if path_style else ""
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.credentials = credentials
        self.description = f"s3://{bucket}/{prefix} at {endpoint}"
        # One client for downloads, another for the rest (uploads, HEAD, listings, deletes):
        # slow readers holding connections never starve a job's upload or the sweep.
        self._clients: dict[bool, httpx.AsyncClient] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Store":
        assert settings.job_s3_bucket is not None
        region = (
            settings.job_s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        endpoint = settings.job_s3_endpoint or f"https://s3.{region}.amazonaws.com"
        addressing = settings.job_s3_addressing
        if addressing == "auto":
            # AWS's own endpoint: virtual-hosted, as AWS asks (but a bucket name with dots
            # would not match AWS's certificate); another's (MinIO and the like usually serve
            # one host name): path-style.
            bucket = settings.job_s3_bucket
            addressing = "path" if settings.job_s3_endpoint or "." in bucket else "virtual"
        return cls(
            endpoint,
            settings.job_s3_bucket,
            settings.job_s3_prefix,
            region,
            addressing == "path",
            Credentials.from_environment(),
        )

    # The store (exporter.storage.store.FileStore).

    async def keep(self, part: Path, name: str) -> None:
        key = self.prefix + name
        size = await anyio.to_thread.run_sync(os.path.getsize, part)
        if size <= PART_SIZE:
            await self._put(key, (), part, 0, size)
        else:
            await self._put_in_parts(key, part, size)
        await anyio.to_thread.run_sync(part.unlink)

    async def size(self, name: str) -> int | None:
        response = await self._send("HEAD", self.prefix + name, missing_ok=True)
        if response.status_code == 404:
            # A HEAD's 404 has no body to tell a missing object from a missing bucket.
            await self._send("HEAD", None)
            return None
        length = response.headers.get("content-length", "")
        if not length.isdigit():
            raise StoreError(f"{self.description}: HEAD {name}: no Content-Length", transient=True)
        return int(length)

    def reader(
        self, name: str, start: int, end: int | None = None
    ) -> AbstractAsyncContextManager[ByteSource]:
        return self._reader(name, start, end)

    @asynccontextmanager
    async def _reader(self, name: str, start: int, end: int | None) -> AsyncIterator[ByteSource]:
        ranged = start > 0 or end is not None
        headers = {"range": f"bytes={start}-{'' if end is None else end - 1}"} if ranged else {}
        response = await self._send("GET", self.prefix + name, headers=headers, stream=True)
        try:
            if ranged and response.status_code != 206:
                # A server that ignores Range would send the file from its first byte.
                raise StoreError(
                    f"{self.description}: a range request was answered {response.status_code}",
                    transient=False,
                )
            yield _ResponseSource(response)
        finally:
            await response.aclose()

    async def delete(self, name: str) -> None:
        # S3 answers 204 for an object that is not there; a 404 is a missing bucket.
        await self._send("DELETE", self.prefix + name)

    async def orphans(self, in_use: set[str], older_than_s: float) -> list[str]:
        """Objects no job needs; also aborts the multipart uploads of killed workers (storage
        is charged for their parts until then)."""
        # Ages by the store's clock (its Date header), as its timestamps are: this host's may
        # be minutes off.
        age = timedelta(seconds=older_than_s)
        for key, upload_id in await self._stale_uploads(in_use, age):
            await self._send("DELETE", key, [("uploadId", upload_id)], missing_ok=True)
        names = []
        async for key, modified, now in self._objects():
            name = key[len(self.prefix) :]
            if JOB_FILE.fullmatch(name) and name not in in_use and modified < now - age:
                names.append(name)
        return names

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # Requests.

    async def _put(
        self, key: str, query: Sequence[tuple[str, str]], path: Path, offset: int, length: int
    ) -> httpx.Response:
        digest = await anyio.to_thread.run_sync(_sha256_of, path, offset, length)
        return await self._send(
            "PUT",
            key,
            query,
            headers={"content-length": str(length)},
            content=_file_region(path, offset, length),
            payload_sha256=digest,
        )

    async def _put_in_parts(self, key: str, path: Path, size: int) -> None:
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        started = await self._send("POST", key, [("uploads", "")])
        upload_id = _text(_xml(started.content), "UploadId")
        try:
            etags = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                length = min(part_size, size - offset)
                query = [("partNumber", str(number)), ("uploadId", upload_id)]
                response = await self._put(key, query, path, offset, length)
                etag = response.headers.get("etag")
                if not etag:
                    raise StoreError(f"{self.description}: a part without an ETag", transient=True)
                etags.append(etag)
            body = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{_escape(etag)}</ETag></Part>"
                for n, etag in enumerate(etags, start=1)
            )
            document = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
            completed = await self._send(
                "POST",
                key,
                [("uploadId", upload_id)],
                headers={"content-type": "application/xml"},
                content=document,
                payload_sha256=hashlib.sha256(document).hexdigest(),
            )
            # S3 may answer 200 and report the failure in the body.
            root = _xml(completed.content)
            if root.tag.endswith("Error"):
                raise StoreError(
                    f"{self.description}: {_describe(root)}",
                    transient=_text(root, "Code", "") in _TRANSIENT_CODES,
                )
        except BaseException:
            # Not left for the sweep: the parts cost storage until the upload is aborted.
            with anyio.move_on_after(10, shield=True):
                try:
                    await self._send("DELETE", key, [("uploadId", upload_id)], missing_ok=True)
                except StoreError:
                    pass
            raise

    async def _stale_uploads(self, in_use: set[str], age: timedelta) -> list[tuple[str, str]]:
        stale: list[tuple[str, str]] = []
        markers: list[tuple[str, str]] = []
        while True:
            query = [("uploads", ""), ("prefix", self.prefix), *markers]
            response = await self._send("GET", None, query)
            root, cutoff = _xml(response.content), _server_time(response) - age
            for upload in root.findall("{*}Upload"):
                key, upload_id = _text(upload, "Key"), _text(upload, "UploadId")
                name = key[len(self.prefix) :]
                initiated = _timestamp(_text(upload, "Initiated"))
                if JOB_FILE.fullmatch(name) and name not in in_use and initiated < cutoff:
                    stale.append((key, upload_id))
            following = [
                ("key-marker", _text(root, "NextKeyMarker", "")),
                ("upload-id-marker", _text(root, "NextUploadIdMarker", "")),
            ]
            truncated = _text(root, "IsTruncated", "false") == "true"
            # A listing that says it goes on without saying where: stop rather than loop.
            if not truncated or not following[0][1] or following == markers:
                return stale
            markers = following

    async def _objects(self) -> AsyncIterator[tuple[str, datetime, datetime]]:
        """(key, last modified, the store's time of the listing) under the prefix."""
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("prefix", self.prefix)]
            if token:
                query.append(("continuation-token", token))
            response = await self._send("GET", None, query)
            root, now = _xml(response.content), _server_time(response)
            for item in root.findall("{*}Contents"):
                yield _text(item, "Key"), _timestamp(_text(item, "LastModified")), now
            following = _text(root, "NextContinuationToken", "")
            if _text(root, "IsTruncated", "false") != "true" or following in ("", token):
                return
            token = following

    async def _send(
        self,
        method: str,
        key: str | None,
        query: Sequence[tuple[str, str]] = (),
        *,
        headers: dict[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        payload_sha256: str = EMPTY_SHA256,
        stream: bool = False,
        missing_ok: bool = False,
    ) -> httpx.Response:
        """One signed request; StoreError for a failure (a 404 returned when missing_ok; a
        GET's NoSuchKey raised as FileGone). `stream`: a download's, body unread."""
        path = self._bucket_path + "/" + (uri_encode(key, safe="/") if key is not None else "")
        if key is None and self._bucket_path:
            path = self._bucket_path
        signed = sign(
            method,
            self.host,
            path,
            query,
            headers or {},
            payload_sha256,
            self.credentials,
            self.region,
            datetime.now(UTC),
        )
        url = self._origin + path + (f"?{canonical_query(query)}" if query else "")
        client = self._http(downloads=stream)
        try:
            request = client.build_request(method, url, headers=signed, content=content)
            response = await client.send(request, stream=stream)
            if response.status_code < 300 or (missing_ok and response.status_code == 404):
                return response
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            # Unreachable, timed out, a full pool, a body that does not decode.
            raise StoreError(f"{self.description}: {exc!r}", transient=True) from exc
        detail = f"{method} {key or ''}: {response.status_code}"
        code = ""
        try:
            error = _xml(body)
            code = _text(error, "Code", "")
            detail += f" {_describe(error)}"
        except StoreError:
            pass
        if response.status_code == 404 and key is not None and code in ("NoSuchKey", ""):
            raise FileGone(key)
        raise StoreError(
            f"{self.description}: {detail}",
            transient=response.status_code in _TRANSIENT_STATUSES or code in _TRANSIENT_CODES,
        )

    def _http(self, downloads: bool) -> httpx.AsyncClient:
        client = self._clients.get(downloads)
        if client is None:
            # No retries of httpx's own (an upload is retried by the job runner, a download
            # resumed by its client). A full pool waits 5 s, then is a 503 or a retry. The
            # store's bodies are read as sent: no content coding asked for.
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(60.0, connect=10.0, pool=5.0),
                limits=httpx.Limits(max_connections=100 if downloads else 20),
                headers={"accept-encoding": "identity"},
            )
            self._clients[downloads] = client
        return client


class _ResponseSource:
    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw(CHUNK)

    async def read(self) -> bytes:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as exc:
            raise StoreError(f"reading from the store: {exc!r}", transient=True) from exc


def _sha256_of(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(offset)
        while length:
            data = file.read(min(_READ, length))
            if not data:
                raise StoreError(f"{path} is shorter than it was", transient=False)
            digest.update(data)
            length -= len(data)
    return digest.hexdigest()


async def _file_region(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    file = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        await anyio.to_thread.run_sync(file.seek, offset)
        while length:
            data = await anyio.to_thread.run_sync(file.read, min(_READ, length))
            if not data:
                raise StoreError(f"{path} is shorter than it was", transient=False)
            length -= len(data)
            yield data
    finally:
        file.close()


def _xml(body: bytes) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise StoreError(
            f"the store answered something other than XML: {exc}", transient=True
        ) from exc


def _text(element: ElementTree.Element, name: str, default: str | None = None) -> str:
    # In S3's namespace, or in none (error documents; some servers).
    found = element.find(f"{{*}}{name}")
    if found is None or found.text is None:
        if default is None:
            raise StoreError(f"the store's answer has no {name}", transient=True)
        return default
    return found.text


def _describe(error: Any) -> str:
    return f"{_text(error, 'Code', '?')}: {_text(error, 'Message', '')}".strip()


def _server_time(response: httpx.Response) -> datetime:
    try:
        return parsedate_to_datetime(response.headers["date"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        return datetime.now(UTC)


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
