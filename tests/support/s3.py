"""An S3-compatible server (moto's) in a subprocess on a real socket, for the S3 job store."""

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.server import free_port


@dataclass
class S3Server:
    """An S3-compatible server (moto's, in a subprocess on a real socket)."""

    endpoint: str
    process: subprocess.Popen[bytes]

    # moto takes any credentials; the store signs with these all the same.
    ACCESS_KEY_ID = "AKIDEXPORTERTEST"
    SECRET_ACCESS_KEY = "exporter-test-secret"

    def boto3_client(self) -> Any:
        """The AWS SDK's client of the server, to look at the bucket from outside."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY_ID,
            aws_secret_access_key=self.SECRET_ACCESS_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self) -> str:
        name = f"jobs-{uuid.uuid4().hex[:12]}"
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def credentials(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_ACCESS_KEY,
        }

    def settings(self, bucket: str) -> dict[str, str]:
        """running_server's settings for a job store in `bucket`."""
        return {"job_s3_bucket": bucket, "job_s3_endpoint": self.endpoint}


@contextlib.contextmanager
def running_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """moto's server, answering, for the `with` block; its log in `log_dir`."""
    port = free_port()
    log_path = log_dir / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")
            try:
                httpx.get(f"{endpoint}/", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.1)
        yield S3Server(endpoint, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
