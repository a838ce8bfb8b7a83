"""A real PostgreSQL for every test run: EXPORTER_TEST_DATABASE_URL if set, else a Docker
container (testcontainers) if Docker answers, else an embedded server. Each run creates its
own database and drops it at the end.

Only fixtures live here; what tests share otherwise is in tests/support/."""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.database import FIXTURE_SQL, ExportDatabase, export_database
from tests.support.docker import docker_answers
from tests.support.s3 import S3Server, running_s3_server
from tests.support.server import Server, running_server


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server URL (any database on it; tests make their own)."""
    url = os.environ.get("EXPORTER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    from exporter.cli.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="exporter-test-pg-") as data_dir:
        postgres = EmbeddedPostgres(Path(data_dir))
        try:
            yield postgres.start()
        finally:
            postgres.stop()


@pytest.fixture(scope="session")
def database(server_url: str) -> Iterator[ExportDatabase]:
    with export_database(server_url, *FIXTURE_SQL) as created:
        yield created


@pytest.fixture(scope="session")
def server(database: ExportDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(database.url, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def client(server: Server, database: ExportDatabase) -> Iterator[httpx.Client]:
    with server.client(database.key) as http:
        yield http


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("s3")) as running:
        yield running
