"""The test database: connecting to it, running SQL, the fixture data every test reads, keys,
and what the export log says of a request."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from exporter.access.keys import create_key
from exporter.db.pool import Pool
from exporter.schema.migrate import upgrade

BIG_ROWS = 1_000_000


def with_database(url: str, database: str) -> str:
    """`url` with its database replaced by `database`."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """`url` as asyncpg takes it (no SQLAlchemy driver name)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_sql(url: str, *statements: str) -> list[Any]:
    """Run statements on a fresh connection; returns the rows of the last one."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(asyncpg_dsn(url))
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


def export_outcome(database: ExportDatabase, request_id: str, timeout_s: float = 5) -> str:
    """How a request's export ended, as the export log says once it has."""
    return str(logged_export(database.url, request_id, timeout_s)["outcome"])


def backend_of(database: ExportDatabase, request_id: str) -> list[dict[str, object]]:
    """The database backend of a request's export while it runs (none once it has ended): its
    pid, state and whether it holds a snapshot."""
    rows = run_sql(
        database.url,
        "SELECT pid, state, backend_xid IS NOT NULL OR backend_xmin IS NOT NULL AS in_snapshot "
        f"FROM pg_stat_activity WHERE application_name = 'exporter {request_id}'",
    )
    return [dict(row) for row in rows]


@contextlib.contextmanager
def export_database(server_url: str, *statements: str) -> Iterator[ExportDatabase]:
    """A database of its own on the server, with the service's schema, `statements` run in
    it and a key; dropped at the end."""
    name = f"exporter_test_{uuid.uuid4().hex[:12]}"
    run_sql(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
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


def insert_log(url: str, *entries: dict[str, Any]) -> list[int]:
    """Export log entries, written in order (unset columns get plain defaults); their ids."""

    async def run() -> list[int]:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            ids = []
            for given in entries:
                entry = {
                    "request_id": uuid.uuid4().hex,
                    "key_name": None,
                    "dataset": "people",
                    "format": "csv",
                    "parameters": {},
                    "client_addr": "127.0.0.1",
                    "started_at": datetime.now(UTC),
                    "ended_at": None,
                    "rows": None,
                    "bytes": None,
                    "outcome": "completed",
                    "error": None,
                    "status": 200,
                    "aborted_by": None,
                    **given,
                }
                entry["parameters"] = json.dumps(entry["parameters"])
                ids.append(
                    await connection.fetchval(
                        f"INSERT INTO exporter.export_log ({', '.join(entry)})"
                        f" VALUES ({', '.join(f'${i + 1}' for i in range(len(entry)))})"
                        " RETURNING id",
                        *entry.values(),
                    )
                )
            return ids
        finally:
            await connection.close()

    return asyncio.run(run())
