"""Background jobs with their files in an S3-compatible bucket (moto's server, on a socket),
through real servers: the file goes to the bucket, downloads (ranges and resumption included)
read it from there, DELETE removes it, and a store that fails is a clear error, never a 500 or
a job that looks done."""

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import ExportDatabase
from tests.support.jobs import submit, wait_for
from tests.support.s3 import S3Server
from tests.support.server import Server, free_port, running_server


@pytest.fixture
def s3_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    # The servers started by the test inherit the environment: the store's credentials.
    for name, value in s3_server.credentials().items():
        monkeypatch.setenv(name, value)
    return s3_server


def assert_spool_empties(spool: Path, timeout_s: float = 5) -> None:
    """The spool ends up with nothing: a run removes its part file as it ends, just after it
    records how the job ended, so a client may see the job end a moment before."""
    deadline = time.monotonic() + timeout_s
    while (left := list(spool.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def s3_job_server(
    database: ExportDatabase, directory: Path, s3_server: S3Server, bucket: str, **settings: str
) -> contextlib.AbstractContextManager[Server]:
    """A server that runs jobs and stores their files in `bucket`, for the `with` block."""
    return running_server(
        database.url,
        directory,
        1,
        job_dir=str(directory / "spool"),
        job_poll_s="0.5",
        job_lease_s="3",
        **{"job_concurrency": "1", **s3_server.settings(bucket), **settings},
    )


@pytest.fixture
def bucket_objects(s3_environment: S3Server) -> Iterator[tuple[str, "ObjectLister"]]:
    bucket = s3_environment.create_bucket()
    yield bucket, ObjectLister(s3_environment, bucket)


class ObjectLister:
    def __init__(self, s3_server: S3Server, bucket: str) -> None:
        self.bucket = bucket
        self.client = s3_server.boto3_client()

    def keys(self) -> set[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket)
        return {item["Key"] for item in listed.get("Contents", [])}


def test_a_job_file_goes_to_the_bucket_and_downloads_from_it(
    database: ExportDatabase,
    s3_environment: S3Server,
    bucket_objects: tuple[str, ObjectLister],
    tmp_path: Path,
) -> None:
    bucket, objects = bucket_objects
    with s3_job_server(database, tmp_path, s3_environment, bucket) as server:
        with server.client(database.key) as client:
            direct = client.get("/datasets/big.csv").content
            info = submit(client, {"dataset": "big", "format": "csv"})
            done, _ = wait_for(client, info["id"], "done", "failed")
            assert done["status"] == "done", done
            assert objects.keys() == {f"exporter-jobs/{info['id']}-1.gz"}
            # The spool keeps nothing once the file is stored.
            assert_spool_empties(tmp_path / "spool")

            assert client.get(done["download_url"]).content == direct
            ranged = client.get(done["download_url"], headers={"Range": "bytes=1000-1999"})
            assert (ranged.status_code, ranged.content) == (206, direct[1000:2000])
            target = tmp_path / "big.csv"
            target.write_bytes(direct[: len(direct) // 3])
            subprocess.run(
                [
                    *("curl", "-sS", "-f", "-C", "-", "-o", str(target)),
                    *("-H", f"Authorization: Bearer {database.key}"),
                    server.base_url + done["download_url"],
                ],
                check=True,
                timeout=60,
            )
            assert target.read_bytes() == direct

            # Another process whose store cannot be reached: 503 and Retry-After, not a 500.
            settings = s3_environment.settings(bucket)
            settings["job_s3_endpoint"] = f"http://127.0.0.1:{free_port()}"
            with running_server(database.url, tmp_path, 1, **settings) as unreachable:
                with unreachable.client(database.key) as other:
                    response = other.get(done["download_url"])
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "5"
                    assert "127.0.0.1" not in response.text  # the store's address stays inside
                    # Deleting is recorded all the same; the file is left to a sweep.
                    deleted = other.delete(f"/exports/{info['id']}")
                    assert (deleted.status_code, deleted.json()["status"]) == (200, "expired")
            assert objects.keys() == {f"exporter-jobs/{info['id']}-1.gz"}

            assert client.delete(f"/exports/{info['id']}").json()["status"] == "expired"
            assert objects.keys() == set()
            assert client.get(done["download_url"]).status_code == 410


def test_a_store_that_refuses_fails_the_job(
    database: ExportDatabase, s3_environment: S3Server, tmp_path: Path
) -> None:
    with s3_job_server(database, tmp_path, s3_environment, "no-such-bucket-here") as server:
        with server.client(database.key) as client:
            info = submit(client, {"dataset": "small_copy", "format": "ndjson"})
            failed, _ = wait_for(client, info["id"], "done", "failed")
            assert failed["status"] == "failed"
            assert failed["error"] == "the job's file could not be stored"
            download = client.get(failed["download_url"])
            assert download.status_code == 409
        assert "NoSuchBucket" in server.log()  # the reason, for the operator
        assert_spool_empties(tmp_path / "spool")


def test_a_bucket_without_credentials_is_refused_at_start(
    database: ExportDatabase, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(RuntimeError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        with running_server(database.url, tmp_path, 1, **s3_server.settings("some-bucket")):
            pass


def test_a_store_that_cannot_be_reached_fails_the_job_after_three_runs(
    database: ExportDatabase, s3_environment: S3Server, tmp_path: Path
) -> None:
    with s3_job_server(
        database,
        tmp_path,
        s3_environment,
        "some-bucket",
        job_s3_endpoint=f"http://127.0.0.1:{free_port()}",
    ) as server:
        with server.client(database.key) as client:
            info = submit(client, {"dataset": "small_copy", "format": "ndjson"})
            # Each run tries the upload three times, with pauses; then the job runs again.
            failed, _ = wait_for(client, info["id"], "done", "failed", timeout_s=90)
            assert failed["status"] == "failed"
            assert failed["error"] == "the job's file could not be stored (3 runs)"
        assert_spool_empties(tmp_path / "spool")
