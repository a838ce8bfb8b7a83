"""Connection pools, and the snapshot every export reads from."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from exporter.settings import Settings

log = logging.getLogger(__name__)


def async_url(url: str) -> URL:
    """Accept the `postgresql://` URLs users write and point SQLAlchemy at asyncpg."""
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql+asyncpg")


def create_engine(url: str, pool_size: int, pool_timeout_s: float = 30) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout_s,
        pool_pre_ping=True,
        # A connection returned by an export is reset by the export itself (see snapshot()).
        pool_reset_on_return="rollback",
    )


# Catalog lookups, key checks and the export log get pools of their own, so that exports
# streaming on every export connection never keep a request from being authenticated, refused
# or logged.
_SIDE_POOL_SIZE = 3


@dataclass
class Databases:
    exports: AsyncEngine  # export snapshots only
    catalog: AsyncEngine  # introspection of the exported database
    state: AsyncEngine  # keys and the export log

    @classmethod
    def from_settings(cls, settings: Settings) -> "Databases":
        return cls(
            exports=create_engine(
                settings.database_url, settings.pool_size, settings.pool_timeout_s
            ),
            catalog=create_engine(settings.database_url, _SIDE_POOL_SIZE, 10),
            state=create_engine(settings.state_url, _SIDE_POOL_SIZE, 10),
        )

    async def dispose(self) -> None:
        for engine in (self.exports, self.catalog, self.state):
            await engine.dispose()


@asynccontextmanager
async def snapshot(
    engine: AsyncEngine, settings: Settings, application_name: str
) -> AsyncIterator[Any]:
    """Yield an asyncpg connection inside a REPEATABLE READ READ ONLY transaction.

    On the way out, however the export ended (including cancellation because the client left),
    the transaction is rolled back under a shield with a bound; a connection that cannot be
    reset in time is terminated and dropped from the pool, never handed to the next export.
    """
    conn = await engine.connect()
    raw_connection: Any = None
    try:
        raw_connection = (await conn.get_raw_connection()).driver_connection
        await raw_connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        await raw_connection.fetchval(
            "SELECT set_config('statement_timeout', $1, true),"
            " set_config('idle_in_transaction_session_timeout', $2, true),"
            " set_config('application_name', $3, true),"
            # PostgreSQL 14+: a query whose client (this process) died stops within a second
            # instead of running to its first row. Older servers lack the setting.
            " (SELECT set_config(name, '1s', true) FROM pg_catalog.pg_settings"
            "  WHERE name = 'client_connection_check_interval')",
            str(settings.statement_timeout_ms),
            str(settings.idle_in_transaction_timeout_ms),
            application_name[:63],
        )
        yield raw_connection
    finally:
        with anyio.CancelScope(shield=True):
            await _release(conn, raw_connection, settings.cleanup_timeout_s)


async def _release(conn: AsyncConnection, raw_connection: Any, timeout_s: float) -> None:
    reset = False
    if raw_connection is not None and not raw_connection.is_closed():
        with anyio.move_on_after(timeout_s):
            try:
                # ROLLBACK also closes the cursor; nothing of the export outlives it.
                await raw_connection.execute("ROLLBACK")
                reset = True
            except Exception as exc:  # the connection is being thrown away anyway
                log.warning("could not reset export connection: %s", exc)
    if not reset:
        if raw_connection is not None:
            raw_connection.terminate()
        await conn.invalidate()
    await conn.close()
