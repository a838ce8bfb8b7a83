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


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        # A connection returned by an export is reset by the export itself (see snapshot()).
        pool_reset_on_return="rollback",
    )


@dataclass
class Databases:
    """The export pool and the state pool (the same engine unless a state URL is set)."""

    exports: AsyncEngine
    state: AsyncEngine

    @classmethod
    def from_settings(cls, settings: Settings) -> "Databases":
        exports = create_engine(settings.database_url, settings.pool_size)
        if settings.state_database_url and settings.state_database_url != settings.database_url:
            state = create_engine(settings.state_database_url, max(2, settings.pool_size // 2))
        else:
            state = exports
        return cls(exports=exports, state=state)

    async def dispose(self) -> None:
        await self.exports.dispose()
        if self.state is not self.exports:
            await self.state.dispose()


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
            " set_config('application_name', $3, true)",
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
