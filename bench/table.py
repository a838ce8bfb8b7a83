"""The benchmark's database and its two tables, generated in SQL and reused when they match."""

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "exporter_bench"
TABLE = "t"
SMALL_TABLE = "t_small"

# Bump when the generated data changes, so that old tables are not reused.
GENERATOR_VERSION = 1

# Mixed types as exports meet them: a bigint key, timestamptz, integer, numeric(12,2), text
# with quotes, commas, newlines, non-ASCII, empty strings and NULLs, jsonb, double precision
# and boolean, with NULLs in every nullable column.
CREATE_SQL = f"""
CREATE TABLE public.{TABLE} (
    id bigint NOT NULL,
    created_at timestamptz NOT NULL,
    quantity integer,
    amount numeric(12, 2),
    note text,
    payload jsonb,
    score double precision,
    active boolean
)
"""

FILL_SQL = f"""
INSERT INTO public.{TABLE}
SELECT
    i,
    timestamptz '2024-01-01 00:00:00+00' + i * interval '1.5 seconds',
    CASE WHEN i % 17 = 0 THEN NULL ELSE ((i * 7919) % 200001 - 100000)::integer END,
    CASE WHEN i % 13 = 0 THEN NULL
         ELSE ((i * 104729) % 100000000 - 50000000)::numeric / 100 END,
    CASE i % 10
        WHEN 0 THEN NULL
        WHEN 1 THEN ''
        WHEN 2 THEN 'said "hi", then left'
        WHEN 3 THEN E'line one\\nline two, "quoted"'
        WHEN 4 THEN 'naïve café ☕'
        ELSE 'note ' || left(md5(i::text), 4 + (i % 20)::integer)
    END,
    CASE WHEN i % 11 = 0 THEN NULL
         ELSE jsonb_build_object(
             'kind', (ARRAY['click', 'view', 'purchase'])[1 + i % 3],
             'n', i % 1000,
             'tags', jsonb_build_array('a', i % 7)
         ) END,
    CASE WHEN i % 19 = 0 THEN NULL ELSE sqrt(i::double precision) END,
    CASE WHEN i % 23 = 0 THEN NULL ELSE i % 2 = 0 END
FROM generate_series(1::bigint, $1::bigint) AS i
"""


@dataclass(frozen=True)
class BenchDatabase:
    url: str
    rows: int
    small_rows: int
    created: bool


def with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _marker(rows: int) -> str:
    return f"exporter bench v{GENERATOR_VERSION} rows={rows}"


async def _comment(conn: Any, table: str) -> str | None:
    comment: str | None = await conn.fetchval(
        "SELECT obj_description(to_regclass($1), 'pg_class')", f"public.{table}"
    )
    return comment


async def _finish(conn: Any, table: str, rows: int) -> None:
    await conn.execute(f"ALTER TABLE public.{table} ADD PRIMARY KEY (id)")
    # Frozen, hinted and analysed: no run pays for setting hint bits on its first read.
    await conn.execute(f"VACUUM (FREEZE, ANALYZE) public.{table}")
    await conn.execute(f"COMMENT ON TABLE public.{table} IS '{_marker(rows)}'")


async def _ensure_tables(url: str, rows: int, small_rows: int, log: Any) -> bool:
    conn = await asyncpg.connect(url)
    try:
        created = False
        if await _comment(conn, TABLE) != _marker(rows):
            log(f"creating table {TABLE} with {rows:,} rows")
            await conn.execute(f"DROP TABLE IF EXISTS public.{SMALL_TABLE}, public.{TABLE}")
            await conn.execute(CREATE_SQL)
            await conn.execute(FILL_SQL, rows)
            await _finish(conn, TABLE, rows)
            created = True
        if created or await _comment(conn, SMALL_TABLE) != _marker(small_rows):
            log(f"creating table {SMALL_TABLE} with {small_rows:,} rows")
            await conn.execute(f"DROP TABLE IF EXISTS public.{SMALL_TABLE}")
            await conn.execute(
                f"CREATE TABLE public.{SMALL_TABLE} AS "
                f"SELECT * FROM public.{TABLE} WHERE id <= $1 ORDER BY id",
                small_rows,
            )
            await _finish(conn, SMALL_TABLE, small_rows)
            created = True
        return created
    finally:
        await conn.close()


async def _ensure_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def default_database(name: str = DEFAULT_DATABASE) -> str:
    """The URL of database `name` on the default server, created if missing."""
    asyncio.run(_ensure_database(DEFAULT_SERVER_URL, name))
    return with_database(DEFAULT_SERVER_URL, name)


def prepare(database_url: str | None, rows: int, small_rows: int, log: Any) -> BenchDatabase:
    """The database (created unless given) and both tables, reused if they already match."""
    if database_url is None:
        database_url = default_database()
    created = asyncio.run(_ensure_tables(database_url, rows, small_rows, log))
    return BenchDatabase(database_url, rows, small_rows, created)


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version: str = await conn.fetchval("SELECT version()")
        return version
    finally:
        await conn.close()


def server_version(url: str) -> str:
    return asyncio.run(_server_version(url))
