"""Connection pools, and the snapshot every export reads from.

The serving process talks to PostgreSQL through asyncpg alone. SQLAlchemy owns the schema
(models.py, Alembic) but is never imported to serve: it cost 23 MiB of every worker's
80 MB budget (the benchmark issue), for statements that are a few lines of SQL each.
"""

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio
import asyncpg

from exporter.db.connection import Connection
from exporter.db.slots import Slots
from exporter.errors import Forbidden, ServiceUnavailable
from exporter.settings import Settings

log = logging.getLogger(__name__)

# Connection errors: the server is down, refuses us, or went away mid-statement (shut down
# or restarted: it ends its sessions with "terminating connection due to administrator
# command", or after a crash of another backend).
UNREACHABLE = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


@contextmanager
def closing_connections_as_lost() -> Iterator[None]:
    """A server that shuts down tells its idle sessions so before it closes them; a pooled
    connection handed out in between is still reading that notice, and asyncpg refuses the
    next statement on it ("cannot switch to state ...; another operation is in progress").
    That connection is being lost: said so (one of UNREACHABLE), not an internal error. Any
    other InternalClientError stays what it is."""
    try:
        yield
    except asyncpg.exceptions.InternalClientError as exc:
        # (2): asyncpg's protocol is consuming an error that came with no statement waiting
        # for it, the server's notice; another state is another operation of ours.
        if "another operation (2) is in progress" not in str(exc):
            raise
        raise asyncpg.exceptions.ConnectionDoesNotExistError(
            f"the connection is being closed: {exc}"
        ) from exc


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string literal that reads the same whatever standard_conforming_strings is (as
    PostgreSQL's quote_literal writes it): for catalog names only, never client values."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


class RoleUnavailable(Forbidden):
    """The key's PostgreSQL role does not exist, or the service may not take it. The client
    learns that its key's role cannot be used, not the server's roles."""


class PoolTimeout(ServiceUnavailable, TimeoutError):
    """No connection of the pool became free within its timeout."""


def connect_url(url: str) -> str:
    """The `postgresql://` URL asyncpg takes, from what users write (SQLAlchemy's
    `postgresql+asyncpg://` included); ValueError for anything else."""
    scheme, colon, rest = url.partition("://")
    backend = scheme.partition("+")[0].lower()
    if not colon or backend not in ("postgresql", "postgres"):
        raise ValueError(
            f"not a PostgreSQL URL (postgresql://user@host:port/database): {display_url(url)}"
        )
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - parsing is the check
    except ValueError as exc:
        raise ValueError(f"{exc}: {display_url(url)}") from None
    return f"postgresql://{rest}"


def display_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))
    except ValueError:
        return "the configured URL"


class Pool:
    """An asyncpg pool that refuses with PoolTimeout once `timeout_s` has passed without a
    free connection. Connections are made on demand: a server that is down at start-up
    fails requests, not the start."""

    def __init__(self, pool: "asyncpg.Pool[asyncpg.Record]", timeout_s: float, busy: str) -> None:
        self._pool = pool
        self.timeout_s = timeout_s
        # What a client is told when every connection stays busy.
        self.busy = busy

    @classmethod
    async def open(
        cls, url: str, size: int, timeout_s: float = 10, busy: str = "the service is busy"
    ) -> "Pool":
        pool = await asyncpg.create_pool(
            connect_url(url),
            min_size=0,
            max_size=size,
            # Connecting (not waiting for a free connection) gives up after this long.
            timeout=10,
            server_settings={"application_name": "exporter"},
        )
        return cls(pool, timeout_s, busy)

    async def acquire(self) -> Connection:
        try:
            return await self._pool.acquire(timeout=self.timeout_s)
        except TimeoutError:
            raise PoolTimeout(
                f"no free connection within {self.timeout_s} s",
                detail=f"{self.busy}; try again shortly",
                headers={"Retry-After": "5"},
            ) from None

    async def release(self, connection: Connection) -> None:
        """Back to the pool. asyncpg resets the connection (rolling back what is open) or,
        failing that (the server went away mid-statement, say), terminates it, under its own
        shield; the pool replaces a terminated connection on demand. Never raises: its
        failure would take the place of what the caller did with the connection, a key
        check's answer or its own error."""
        try:
            await self._pool.release(connection, timeout=5)
        except (
            asyncpg.exceptions.PostgresError,
            asyncpg.exceptions.InternalClientError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
            OSError,
            TimeoutError,
        ) as exc:
            log.warning("closed a connection that could not be reset: %s", exc)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        connection = await self.acquire()
        try:
            with closing_connections_as_lost():
                yield connection
        finally:
            with anyio.CancelScope(shield=True):
                await self.release(connection)

    async def close(self, timeout_s: float = 5) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout_s)
        except TimeoutError:
            self._pool.terminate()


# Catalog lookups, key checks and the export log get pools of their own, so that exports
# streaming on every export connection never keep a request from being authenticated, refused
# or logged.
_SIDE_POOL_SIZE = 3


@dataclass
class Databases:
    exports: Pool  # export snapshots only
    catalog: Pool  # introspection of the exported database
    state: Pool  # keys and the export log
    # Signs cursor tokens (exporter.incremental.tokens); read once. None: the schema predates it.
    _cursor_secret: bytes | None = None

    @classmethod
    async def open(cls, settings: Settings) -> "Databases":
        return cls(
            exports=await Pool.open(
                settings.database_url,
                settings.export_pool_size,
                settings.pool_timeout_s,
                busy="every export connection is busy",
            ),
            catalog=await Pool.open(settings.database_url, _SIDE_POOL_SIZE),
            state=await Pool.open(settings.state_url, _SIDE_POOL_SIZE),
        )

    async def cursor_secret(self) -> bytes | None:
        if self._cursor_secret is None:
            async with self.state.connection() as connection:
                try:
                    secret = await connection.fetchval(
                        "SELECT secret FROM exporter.cursor_secret WHERE id = 1"
                    )
                except asyncpg.exceptions.UndefinedTableError:
                    log.warning("no cursor secret: run `exporter migrate` for incremental pulls")
                    return None
            self._cursor_secret = bytes(secret) if secret is not None else None
        return self._cursor_secret

    async def close(self) -> None:
        for pool in (self.exports, self.catalog, self.state):
            await pool.close()


@asynccontextmanager
async def snapshot(
    pool: Pool,
    settings: Settings,
    application_name: str,
    role: str | None = None,
    slots: Slots | None = None,
) -> AsyncIterator[Connection]:
    """Yield an asyncpg connection inside a REPEATABLE READ READ ONLY transaction, holding
    `slots` (TooManyExports if they are taken) until the transaction ends.

    On the way out, however the export ended (including cancellation because the client left),
    the transaction is rolled back under a shield with a bound; a connection that cannot be
    reset in time is terminated, never handed to the next export.
    """
    connection = await pool.acquire()
    try:
        # Whichever statement meets the server closing the connection.
        with closing_connections_as_lost():
            await connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if slots is not None:
                # As the service's role: the key's may not be allowed the lock functions.
                await slots.claim(connection)
            if role is not None:
                # The key's role: PostgreSQL's own GRANTs and row-level security decide what the
                # export reads. A role is an identifier, never a bound value; it comes from the
                # key's record, quoted.
                try:
                    await connection.execute(f"SET LOCAL ROLE {quote_ident(role)}")
                except asyncpg.exceptions.PostgresError as exc:
                    # The client learns that the key's role cannot be used, not the server's roles.
                    log.warning("cannot export as role %r: %s", role, exc)
                    raise RoleUnavailable("this key's PostgreSQL role cannot be used") from exc
            await connection.fetchval(
                "SELECT set_config('statement_timeout', $1, true),"
                " set_config('idle_in_transaction_session_timeout', $2, true),"
                " set_config('application_name', $3, true),"
                # Values leave in PostgreSQL's canonical text forms, whatever the server's or the
                # role's defaults: ISO dates, shortest exact floats, hex bytea; and the COPY
                # options' literals are read as written.
                " set_config('DateStyle', 'ISO', true),"
                " set_config('IntervalStyle', 'postgres', true),"
                " set_config('extra_float_digits', '1', true),"
                " set_config('bytea_output', 'hex', true),"
                " set_config('standard_conforming_strings', 'on', true),"
                # PostgreSQL 14+: a query whose client (this process) died stops within a second
                # instead of running to its first row. Older servers lack the setting.
                " (SELECT set_config(name, '1s', true) FROM pg_catalog.pg_settings"
                "  WHERE name = 'client_connection_check_interval')",
                str(settings.statement_timeout_ms),
                str(settings.idle_in_transaction_timeout_ms),
                application_name[:63],
            )
            yield connection
    finally:
        with anyio.CancelScope(shield=True):
            await _release(pool, connection, settings.cleanup_timeout_s)


async def _release(pool: Pool, connection: Connection, timeout_s: float) -> None:
    """An export's connection back to the pool, only once nothing uses it any more: rolled
    back, or else terminated (the pool replaces it), never still busy with a statement."""
    try:
        reset = False
        if not connection.is_closed():
            with anyio.move_on_after(timeout_s):
                reset = await _rolled_back(connection)
        if not reset:
            connection.terminate()
    except asyncpg.exceptions.InterfaceError:
        # The connection was lost (the server shut down, say), and asyncpg's pool took it
        # back at once: what is left of it refuses every call, and needs no release.
        return
    await pool.release(connection)


async def _rolled_back(connection: Connection) -> bool:
    """ROLLBACK (which also closes the cursor: nothing of the export outlives it), once the
    connection is free for it. A statement that was cancelled (the client left mid-fetch)
    keeps the connection busy until PostgreSQL has answered the cancel request that asyncpg
    sent; until then asyncpg refuses any other operation, and says so."""
    while True:
        try:
            await connection.execute("ROLLBACK")
        except asyncpg.exceptions.InternalClientError:
            # "cannot switch to state ...; another operation is in progress"
            await anyio.sleep(0.005)
        except Exception as exc:  # the connection is being thrown away anyway
            log.info("could not roll back export connection, closing it: %s", exc)
            return False
        else:
            return True
