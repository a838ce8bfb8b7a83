"""A real PostgreSQL for every test run: EXPORTER_TEST_DATABASE_URL if set, else a Docker
container (testcontainers) if Docker answers, else an embedded server. Each run creates its
own database and drops it at the end."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from exporter.access.keys import create_key
from exporter.db.pool import Pool
from exporter.schema.migrate import upgrade

BIG_ROWS = 1_000_000


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server URL (any database on it; tests make their own)."""
    url = os.environ.get("EXPORTER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
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


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_sql(url: str, *statements: str) -> list[Any]:
    """Run statements on a fresh connection; returns the rows of the last one."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(_asyncpg_dsn(url))
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = await conn.fetch(statement)
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


FIXTURE_SQL = [
    """
    CREATE TABLE public.people (
        id integer PRIMARY KEY,
        name text,
        age integer,
        score numeric(10, 3),
        height real,
        active boolean,
        born date,
        seen_at timestamptz,
        tag uuid,
        code char(4),
        doc jsonb
    )
    """,
    """
    INSERT INTO public.people VALUES
      (1, 'Ada', 36, 99.5, 1.65, true, '1815-12-10', '2024-01-01 10:00:00+00',
       '00000000-0000-0000-0000-000000000001', 'AB', '{"a": 1}'),
      (2, 'Bob, "the builder"', 45, 12.125, 1.8, false, '1980-02-29', NULL,
       '00000000-0000-0000-0000-000000000002', NULL, '[1, 2]'),
      (3, '', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      (4, NULL, 20, -1.5, 1.7, true, '2000-01-01', '2024-06-01 12:30:00+02',
       NULL, 'Z', 'null'),
      (5, E'multi\\nline', 20, 100000.001, 2.1, false, '2001-01-01', '2024-06-02 00:00:00+00',
       NULL, 'ABCD', '{"nested": {"k": [1, "x"]}}')
    """,
    "CREATE VIEW public.adults AS SELECT id, name, age FROM public.people WHERE age >= 21",
    f"""
    CREATE TABLE public.big AS
    SELECT i AS id, 'row ' || i AS label, (i % 1000)::numeric / 7 AS amount,
           timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second' AS at
    FROM generate_series(1, {BIG_ROWS}) AS i
    """,
    "ALTER TABLE public.big ADD PRIMARY KEY (id)",
    "CREATE TABLE public.small_copy AS SELECT * FROM public.big WHERE id <= 100000",
    "ALTER TABLE public.small_copy ADD PRIMARY KEY (id)",
    "CREATE SCHEMA sales",
    "CREATE TABLE sales.orders (id integer PRIMARY KEY, total numeric)",
    "INSERT INTO sales.orders VALUES (1, 10.5), (2, 20)",
    "ANALYZE",
]


def logged_export(url: str, request_id: str, timeout_s: float = 5) -> dict[str, Any]:
    """The export log entry of a request, once it has ended: the client may hold the whole
    response a moment before the server has written how it ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = run_sql(
            url,
            "SELECT key_name, dataset, format, parameters::text, rows, bytes, outcome, status,"
            " aborted_by, error, client_addr"
            f" FROM exporter.export_log WHERE request_id = '{request_id}'",
        )
        if (rows and rows[0]["outcome"] != "running") or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return dict(rows[0])
        time.sleep(0.05)


@dataclass(frozen=True)
class ExportDatabase:
    url: str
    key: str


@contextlib.contextmanager
def export_database(server_url: str, *statements: str) -> Iterator[ExportDatabase]:
    """A database of its own on the server, with the service's schema, `statements` run in
    it and a key; dropped at the end."""
    name = f"exporter_test_{uuid.uuid4().hex[:12]}"
    run_sql(server_url, f'CREATE DATABASE "{name}"')
    url = _with_database(server_url, name)
    try:
        upgrade(url)
        if statements:
            run_sql(url, *statements)

        async def make_key() -> str:
            pool = await Pool.open(url, size=1)
            try:
                return await create_key(pool, "tests")
            finally:
                await pool.close()

        yield ExportDatabase(url=url, key=asyncio.run(make_key()))
    finally:
        run_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database(server_url: str) -> Iterator[ExportDatabase]:
    with export_database(server_url, *FIXTURE_SQL) as created:
        yield created


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """`exporter serve` in a subprocess on a real socket, as users run it."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, key: str | None, **kwargs: Any) -> httpx.Client:
        # httpx asks for gzip and zstd by default; tests read the export as it is written
        # (iter_raw included) unless they ask for a coding themselves (test_compression).
        headers = {"Accept-Encoding": "identity"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base_url, headers=headers, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(database_url: str, tmp_path: Path, workers: int = 1, **settings: str) -> Server:
    port = free_port()
    env = {**os.environ, "EXPORTER_DATABASE_URL": database_url}
    # Background jobs are run only by the servers of the tests about them: every server shares
    # the jobs table, and one that claimed another test's job would run it elsewhere.
    settings = {"job_concurrency": "0", **settings}
    env.update({f"EXPORTER_{name.upper()}": value for name, value in settings.items()})
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "exporter", "serve", "--port", str(port), "--workers", str(workers)),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server did not start:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(database: ExportDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(database.url, tmp_path_factory.mktemp("server"))
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture
def client(server: Server, database: ExportDatabase) -> Iterator[httpx.Client]:
    with server.client(database.key) as http:
        yield http


def create_case_insensitive_collation(url: str, name: str) -> None:
    """A nondeterministic ICU collation (`public.<name>`), or the test is skipped without ICU."""
    try:
        run_sql(
            url,
            f"CREATE COLLATION public.{name} "
            "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
        )
    except asyncpg.exceptions.PostgresError as exc:
        pytest.skip(f"no ICU collations on this server: {exc}")


def xml_unsupported(url: str) -> str | None:
    """Why the server cannot take XML values (built without libxml, as the embedded one is),
    or None when it can: asked of the server itself, by parsing a document."""
    try:
        run_sql(url, "SELECT '<a/>'::xml")
    except asyncpg.exceptions.FeatureNotSupportedError as exc:
        return f"no XML support on this server: {exc.args[0]} ({exc.detail})"
    return None


def new_key(url: str, name: str | None = None, **options: Any) -> str:
    """A key of its own for a test (limits count per key); options as create_key's."""

    async def make() -> str:
        pool = await Pool.open(url, size=1)
        try:
            return await create_key(pool, name or f"key-{uuid.uuid4().hex[:8]}", **options)
        finally:
            await pool.close()

    return asyncio.run(make())


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
        """start_server's settings for a job store in `bucket`."""
        return {"job_s3_bucket": bucket, "job_s3_endpoint": self.endpoint}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
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
