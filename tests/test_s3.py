"""The S3-compatible job store: its request signing (checked against botocore's, the AWS SDK's),
and its operations against a real S3-compatible server (moto's, on a socket): whole and
multipart uploads, ranged reads, deletion, and the sweep of stray objects and abandoned
multipart uploads."""

import asyncio
import hashlib
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials as BotocoreCredentials  # type: ignore[import-untyped]
from pydantic import ValidationError

from exporter.settings import Settings
from exporter.storage.s3 import PART_SIZE, Credentials, S3Store, canonical_query, sign, uri_encode
from exporter.storage.store import FileGone, StoreError
from tests.support.s3 import S3Server
from tests.support.server import free_port

CREDENTIALS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
JOB_FILE = "0123456789abcdef0123456789abcdef-1.gz"


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "body"),
    [
        ("GET", "/bucket/prefix/" + JOB_FILE, [], {}, b""),
        ("GET", "/bucket/prefix/" + JOB_FILE, [], {"Range": "bytes=100-"}, b""),
        ("HEAD", "/bucket/" + uri_encode("odd prefix+é/ ~x", safe="/"), [], {}, b""),
        (
            "PUT",
            "/bucket/k.gz",
            [("partNumber", "3"), ("uploadId", "a+b/c=d~e")],
            {"Content-Length": "11"},
            b"hello world",
        ),
        ("POST", "/bucket/k.gz", [("uploads", "")], {}, b""),
        (
            "GET",
            "/bucket",
            [("list-type", "2"), ("prefix", "exporter jobs/"), ("continuation-token", "1/x==")],
            {},
            b"",
        ),
        ("DELETE", "/k.gz", [("uploadId", "XYZ")], {}, b""),
    ],
)
@pytest.mark.parametrize("session_token", [None, "token/with+odd=chars"])
def test_signatures_match_botocore(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    body: bytes,
    session_token: str | None,
) -> None:
    host = "127.0.0.1:9000"
    url = f"http://{host}{path}" + (f"?{canonical_query(query)}" if query else "")
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    reference = BotocoreCredentials(
        CREDENTIALS.access_key_id, CREDENTIALS.secret_access_key, session_token
    )
    S3SigV4Auth(reference, "s3", "eu-west-3").add_auth(request)
    moment = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    credentials = Credentials(
        CREDENTIALS.access_key_id, CREDENTIALS.secret_access_key, session_token
    )
    ours = sign(
        method,
        host,
        path,
        query,
        headers,
        hashlib.sha256(body).hexdigest(),
        credentials,
        "eu-west-3",
        moment,
    )
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]


def test_a_signature_depends_on_the_secret() -> None:
    # The comparison above cannot pass by both sides ignoring the secret.
    moment = datetime(2026, 12, 1, tzinfo=UTC)
    other = Credentials(CREDENTIALS.access_key_id, CREDENTIALS.secret_access_key + "x")
    signatures = {
        sign("GET", "h", "/b/k", [], {}, "e3b0", credentials, "us-east-1", moment)["authorization"]
        for credentials in (CREDENTIALS, other)
    }
    assert len(signatures) == 2


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


def new_store(s3_server: S3Server, bucket: str, prefix: str = "jobs/") -> S3Store:
    credentials = Credentials(s3_server.ACCESS_KEY_ID, s3_server.SECRET_ACCESS_KEY)
    return S3Store(s3_server.endpoint, bucket, prefix, "us-east-1", True, credentials)


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> Iterator[S3Store]:
    yield new_store(s3_server, bucket)


async def read_all(store: S3Store, name: str, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray()
    async with store.reader(name, start, end) as source:
        while chunk := await source.read():
            out += chunk
    return bytes(out)


async def keep_bytes(store: S3Store, directory: Path, name: str, data: bytes) -> None:
    part = directory / f"{name}.part"
    part.write_bytes(data)
    await store.keep(part, name)
    assert not part.exists()


@pytest.mark.parametrize("size", [0, 1, PART_SIZE, PART_SIZE + 1, 2 * PART_SIZE + 12345])
def test_a_file_is_kept_whole_and_read_from_any_offset(
    store: S3Store, tmp_path: Path, size: int
) -> None:
    data = random.Random(size).randbytes(size)

    async def scenario() -> None:
        try:
            # Beyond PART_SIZE: a multipart upload.
            await keep_bytes(store, tmp_path, JOB_FILE, data)
            assert await store.size(JOB_FILE) == size
            assert await read_all(store, JOB_FILE) == data
            if size > 2:
                middle = size // 2
                assert await read_all(store, JOB_FILE, middle) == data[middle:]
                assert await read_all(store, JOB_FILE, 1, middle) == data[1:middle]
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_names_are_encoded_in_keys(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    store = new_store(s3_server, bucket, prefix="exports of 2026/é+x ~/")

    async def scenario() -> None:
        try:
            await keep_bytes(store, tmp_path, JOB_FILE, b"data")
            assert await read_all(store, JOB_FILE) == b"data"
            await asyncio.sleep(1.1)  # the store's clock (its Date header) counts in seconds
            assert await store.orphans(set(), 0) == [JOB_FILE]
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_deleted_and_missing_files(store: S3Store, tmp_path: Path) -> None:
    async def scenario() -> None:
        try:
            await keep_bytes(store, tmp_path, JOB_FILE, b"x" * 100)
            await store.delete(JOB_FILE)
            await store.delete(JOB_FILE)  # idempotent
            assert await store.size(JOB_FILE) is None
            with pytest.raises(FileGone):
                await read_all(store, JOB_FILE)
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_the_sweep_takes_only_stray_job_files(
    s3_server: S3Server, store: S3Store, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.boto3_client()
    kept = "f" * 32 + "-2.gz"
    # Not the store's (another name, or outside its prefix): never deleted.
    client.put_object(Bucket=bucket, Key="jobs/notes.txt", Body=b"x")
    client.put_object(Bucket=bucket, Key="other/" + JOB_FILE, Body=b"x")
    abandoned = client.create_multipart_upload(Bucket=bucket, Key="jobs/" + JOB_FILE)
    foreign = client.create_multipart_upload(Bucket=bucket, Key="jobs/notes.bin")

    async def scenario() -> list[str]:
        try:
            await keep_bytes(store, tmp_path, JOB_FILE, b"stray")
            await keep_bytes(store, tmp_path, kept, b"kept")
            # Files stored a moment ago are left alone: their job may not have recorded them.
            assert await store.orphans({kept}, 3600) == []
            await asyncio.sleep(1.1)  # the store's clock (its Date header) counts in seconds
            return await store.orphans({kept}, 0)
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == [JOB_FILE]
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [foreign["UploadId"]]
    assert abandoned["UploadId"] != foreign["UploadId"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"jobs/notes.txt", "other/" + JOB_FILE, "jobs/" + JOB_FILE, "jobs/" + kept}


def test_an_unreachable_store_is_a_transient_error(tmp_path: Path) -> None:
    store = S3Store(
        f"http://127.0.0.1:{free_port()}", "bucket", "jobs/", "us-east-1", True, CREDENTIALS
    )

    async def scenario() -> None:
        try:
            with pytest.raises(StoreError) as raised:
                await store.size(JOB_FILE)
            assert raised.value.transient
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_missing_bucket_is_no_transient_error(s3_server: S3Server, tmp_path: Path) -> None:
    store = new_store(s3_server, "no-such-bucket-here")

    async def scenario() -> None:
        try:
            with pytest.raises(StoreError) as raised:
                await keep_bytes(store, tmp_path, JOB_FILE, b"x")
            assert not raised.value.transient
            assert "NoSuchBucket" in str(raised.value)
            # Not taken for a deleted file (a 410): the store is misconfigured (a 503).
            for operation in (store.size(JOB_FILE), read_all(store, JOB_FILE)):
                with pytest.raises(StoreError) as raised:
                    await operation
                assert not isinstance(raised.value, FileGone)
        finally:
            await store.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("prefix", ["/jobs/", "a/../b/", "a/./b/", "a//b/", "./"])
def test_prefixes_that_would_not_be_sent_as_signed_are_refused(prefix: str) -> None:
    with pytest.raises(ValidationError):
        Settings(job_s3_bucket="bucket", job_s3_prefix=prefix)


@pytest.mark.parametrize("prefix", ["", "jobs/", "a/b/c-", "exports of 2026/é+x ~/", "jobs/."])
def test_plain_prefixes_are_taken(prefix: str) -> None:
    assert Settings(job_s3_bucket="bucket", job_s3_prefix=prefix).job_s3_prefix == prefix


def test_the_secret_stays_out_of_repr() -> None:
    credentials = Credentials("AKID", "the-secret", "the-token")
    assert "the-secret" not in repr(credentials) and "the-token" not in repr(credentials)


@pytest.mark.parametrize(
    "endpoint", ["http://user:pass@127.0.0.1:9000", "ftp://127.0.0.1", "http://h:9000/base"]
)
def test_endpoints_are_a_scheme_host_and_port(endpoint: str) -> None:
    with pytest.raises(ValueError):
        S3Store(endpoint, "bucket", "jobs/", "us-east-1", True, CREDENTIALS)
