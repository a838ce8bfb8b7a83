"""What the `exporter` command says when PostgreSQL cannot be reached or used."""

from exporter.errors import BAD_INPUT, ExporterError, ServiceUnavailable

# SQLSTATE classes that mean "cannot reach or log in to the database": connection exception,
# invalid authorization, invalid catalog name (no such database), and the server starting up
# or shutting down.
_CONNECTION_SQLSTATES = ("08", "28", "3D", "57P")


def database_error(exc: BaseException, url: str) -> ExporterError | None:
    """A one-line error for a failure to reach or use PostgreSQL, or None if `exc` is
    something else (a bug, which should keep its traceback)."""
    import asyncpg

    from exporter.db.pool import PoolTimeout, display_url

    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        # Migrations run through SQLAlchemy, which wraps its adapter's error, which wraps
        # asyncpg's.
        exc = orig.__cause__ or orig
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    if (
        isinstance(exc, OSError | PoolTimeout | asyncpg.exceptions.PostgresConnectionError)
        or sqlstate.startswith(_CONNECTION_SQLSTATES)
        or (isinstance(exc, asyncpg.exceptions.InterfaceError) and "connect" in str(exc))
    ):
        lost = isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError) or sqlstate in (
            "57P01",  # admin_shutdown: pg_terminate_backend() or a server shutting down
            "57P02",
        )
        doing = "lost the connection to" if lost else "cannot connect to"
        return ServiceUnavailable(
            f"{doing} PostgreSQL at {display_url(url)}: {exc}", exit_code=BAD_INPUT
        )
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return ExporterError(
            f"PostgreSQL: {exc} (has `exporter migrate` run on this database?)",
            exit_code=BAD_INPUT,
        )
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return ExporterError(f"PostgreSQL rejected the request: {exc}", exit_code=BAD_INPUT)
    return None
