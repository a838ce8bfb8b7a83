"""exporter serve | migrate | keys | export | demo"""

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from exporter.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from exporter.encoders import Encoder
    from exporter.query import ExportQuery

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# Exit codes: 1 = the operation failed (duplicate key, export broken off midway);
# 2 = it could not start (bad arguments or configuration, unknown dataset or column, a value
# PostgreSQL rejects, database unreachable), as argparse uses 2 for usage errors.
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130


class CliError(Exception):
    """A failure explained in one line: main() prints it, without a traceback, and exits."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def log_config() -> dict[str, Any]:
    # uvicorn's own loggers keep their formats; ours carry the request id.
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "exporter.middleware.RequestIdFilter"}},
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "exporter": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }


def serve(host: str, port: int, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "exporter.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=log_config(),
        # Exports are long; let running ones finish on shutdown for a while.
        timeout_graceful_shutdown=30,
    )


def load_settings() -> Settings:
    """Settings from the environment, or a CliError that names the variable at fault."""
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError

    from exporter.db import async_url

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"EXPORTER_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise CliError(f"invalid configuration: {problems}") from None
    for variable, url in [
        ("EXPORTER_DATABASE_URL", settings.database_url),
        ("EXPORTER_STATE_DATABASE_URL", settings.state_database_url),
    ]:
        try:
            if url is not None:
                async_url(url)
        except (ValueError, ArgumentError) as exc:
            raise CliError(f"invalid configuration: {variable}: {exc}") from None
    return settings


def display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the configured URL"


# SQLSTATE classes that mean "cannot reach or log in to the database": connection exception,
# invalid authorization, invalid catalog name (no such database), and the server starting up
# or shutting down.
_CONNECTION_SQLSTATES = ("08", "28", "3D", "57P")


def database_error(exc: BaseException, url: str) -> CliError | None:
    """A one-line CliError for a failure to reach or use PostgreSQL, or None if `exc` is
    something else (a bug, which should keep its traceback)."""
    import asyncpg
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    cause: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        # SQLAlchemy wraps its adapter's error, which wraps asyncpg's.
        cause = exc.orig.__cause__ or exc.orig
    sqlstate = str(getattr(cause, "sqlstate", "") or "")
    if (
        isinstance(cause, OSError | PoolTimeout | asyncpg.exceptions.PostgresConnectionError)
        or sqlstate.startswith(_CONNECTION_SQLSTATES)
        or (isinstance(cause, asyncpg.exceptions.InterfaceError) and "connect" in str(cause))
    ):
        lost = isinstance(cause, asyncpg.exceptions.ConnectionDoesNotExistError) or sqlstate in (
            "57P01",  # admin_shutdown: pg_terminate_backend() or a server shutting down
            "57P02",
        )
        doing = "lost the connection to" if lost else "cannot connect to"
        return CliError(f"{doing} PostgreSQL at {display_url(url)}: {cause}")
    if isinstance(cause, asyncpg.exceptions.UndefinedTableError):
        return CliError(f"PostgreSQL: {cause} (has `exporter migrate` run on this database?)")
    if isinstance(cause, asyncpg.exceptions.PostgresError) or isinstance(exc, DBAPIError):
        return CliError(f"PostgreSQL rejected the request: {cause}")
    return None


def migrate(settings: Settings) -> None:
    from alembic.util.exc import CommandError

    from exporter.migrate import upgrade

    try:
        upgrade(settings.state_url)
    except CommandError as exc:
        raise CliError(f"migration failed: {exc}", FAILED) from None
    print("migrated to head", file=sys.stderr)


async def _keys(settings: Settings, action: str, name: str | None) -> int:
    from exporter.auth import KeyExists, create_key, list_keys, revoke_key
    from exporter.db import create_engine

    if name is not None and not name.strip():
        raise CliError("a key needs a non-empty name")
    engine = create_engine(settings.state_url, pool_size=1)
    try:
        if action == "create":
            assert name is not None
            try:
                key = await create_key(engine, name)
            except KeyExists as exc:
                raise CliError(str(exc), FAILED) from None
            print(f"created key {name!r}; it is shown once, store it now:", file=sys.stderr)
            print(key)
        elif action == "list":
            for info in await list_keys(engine):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                print(f"{info.name}\tcreated {info.created_at:%Y-%m-%d %H:%M}\t{state}")
        else:
            assert name is not None
            if not await revoke_key(engine, name):
                raise CliError(f"no active key named {name!r}", FAILED)
            print(f"revoked {name!r}", file=sys.stderr)
        return 0
    finally:
        await engine.dispose()


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    WIDTH = 24

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.total: int | None = None
        self.enabled = out.isatty()
        self.started = time.monotonic()
        self.shown = 0.0
        self.dirty = False

    def start(self) -> None:
        self.started = time.monotonic()

    def update(self, rows: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.shown < 0.2):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        rate = f"{rows / elapsed:,.0f} rows/s"
        if final:
            line = f"{rows:,} rows in {elapsed:,.1f} s, {rate}"
        elif self.total:
            # The total is the planner's estimate: never claim 100% before the end.
            fraction = min(rows / self.total, 0.99)
            bar = "#" * int(fraction * self.WIDTH)
            line = (
                f"[{bar:<{self.WIDTH}}] {fraction:>3.0%}  {rows:,} of ~{self.total:,} rows  {rate}"
            )
        else:
            line = f"{rows:,} rows  {rate}"
        # \r back to the line's start, \x1b[K clears what a longer previous line left.
        self.out.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        self.out.flush()
        self.dirty = not final

    def close(self) -> None:
        """End a line left unfinished (before an error message, say)."""
        if self.dirty:
            self.out.write("\n")
            self.out.flush()
            self.dirty = False


class Output:
    """Where an export goes: stdout for `-`, else FILE.part, renamed to FILE only by commit(),
    so that a failed export never leaves a file that looks complete."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: Path | None = None
        self.partial: Path | None = None
        self.file: BinaryIO
        if name == "-":
            self.file = sys.stdout.buffer
            return
        target = Path(name)
        if target.is_dir():
            raise CliError(f"{name} is a directory")
        partial = target.with_name(target.name + ".part")
        try:
            self.file = partial.open("wb")
        except OSError as exc:
            raise CliError(f"cannot write {partial}: {exc.strerror or exc}") from None
        self.target, self.partial = target, partial

    def write(self, data: bytes) -> None:
        with self._errors():
            self.file.write(data)

    def commit(self) -> None:
        with self._errors():
            self.file.flush()
            if self.partial is None or self.target is None:
                return
            # On disk before the rename, so that a crash cannot leave a complete-looking name
            # on a truncated file.
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.target)
            self.partial = None

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            where = self.partial or self.name
            raise CliError(f"cannot write {where}: {exc.strerror or exc}", FAILED) from None

    def __enter__(self) -> "Output":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.partial is not None:
            self.file.close()
            self.partial.unlink(missing_ok=True)


async def _estimate_rows(
    engine: "AsyncEngine", query: "ExportQuery", encoder: "type[Encoder]"
) -> int | None:
    """The planner's estimate of the export's rows (filters and limit included), for the
    progress bar. Best effort: a query PostgreSQL rejects fails properly in open()."""
    from exporter.source import build_sql

    sql, args = build_sql(query, encoder.rendering)
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            async with raw.transaction():
                # A parallel plan's top node counts only the workers' share of the rows.
                await raw.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                plan = await raw.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        if isinstance(plan, str):  # SQLAlchemy's connections decode json, bare asyncpg doesn't
            plan = json.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])
    except Exception:
        return None


def _export_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The CLI's options as the HTTP query's parameters, so both go through parse_query."""
    params: list[tuple[str, str]] = []
    for name in ("select", "order", "limit"):
        if getattr(args, name) is not None:
            params.append((name, str(getattr(args, name))))
    for condition in args.where:
        column, equals, expression = condition.partition("=")
        if not equals or not column:
            raise CliError(f"--where takes col=op.value, got {condition!r}")
        params.append((column, expression))
    return params


async def _export(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.catalog import find_dataset
    from exporter.db import create_engine
    from exporter.encoders import ENCODERS
    from exporter.query import QueryError, parse_query
    from exporter.stream import ExportStream

    params = _export_params(args)
    encoder = ENCODERS.get(args.format)
    if encoder is None:
        raise CliError(f"--format: {args.format!r} is not one of {', '.join(sorted(ENCODERS))}")
    engine = create_engine(settings.database_url, pool_size=1)
    progress = Progress(sys.stderr)
    try:
        dataset = await find_dataset(engine, settings.exposed_schemas, args.dataset)
        if dataset is None:
            raise CliError(f"no dataset named {args.dataset!r}")
        try:
            query = parse_query(dataset, params, max_limit=settings.max_limit)
        except QueryError as exc:
            raise CliError(f"{exc.parameter}: {exc.detail}") from None
        if progress.enabled:
            progress.total = await _estimate_rows(engine, query, encoder)
        with Output(args.output) as output:
            stream = ExportStream(query, encoder, engine, settings, "exporter cli")
            try:
                await stream.open()
            except Exception as exc:
                # Everything that can fail before the first byte is the request's fault or
                # the database's state, as with HTTP's 4xx and 503.
                error = database_error(exc, settings.database_url)
                if error is None:
                    raise
                raise error from None
            progress.start()
            chunks = stream.chunks()
            try:
                try:
                    async for chunk in chunks:
                        output.write(chunk)
                        progress.update(stream.rows)
                finally:
                    # A failed write leaves the generator paused at `yield`; release its
                    # cursor and connection now rather than at garbage collection.
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
                output.commit()
            except CliError:
                raise
            except BrokenPipeError:
                # Like `head` closing the pipe: stop quietly, and keep Python's own flush of
                # stdout at exit from complaining again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise CliError(f"output closed after {stream.rows:,} rows", FAILED) from None
            except Exception as exc:
                error = database_error(exc, settings.database_url)
                detail = error.message if error is not None else repr(exc)
                kept = "" if output.target is None else f"; {output.name} was not written"
                raise CliError(
                    f"export failed after {stream.rows:,} rows: {detail}{kept}", FAILED
                ) from None
        progress.update(stream.rows, final=True)
        where = "" if output.target is None else f" to {output.target}"
        print(f"{stream.rows} rows, {stream.bytes} bytes{where}", file=sys.stderr)
        return 0
    finally:
        progress.close()
        await engine.dispose()


def demo(args: argparse.Namespace) -> int:
    from exporter.demo_server import run_demo

    return run_demo(Path(args.data_dir), args.host, args.port, args.rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exporter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP service (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)

    commands.add_parser("migrate", help="create or upgrade the service's own schema")

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    keys.add_parser("create", help="create a key; prints it alone on the last line").add_argument(
        "name"
    )
    keys.add_parser("list", help="list keys (never the keys themselves)")
    keys.add_parser("revoke", help="revoke a key").add_argument("name")

    p = commands.add_parser("export", help="export a dataset to a file, as the HTTP API does")
    p.add_argument("dataset")
    # Checked against the encoder registry in _export: importing it here would make every
    # command, --help included, pay for SQLAlchemy's import.
    p.add_argument("--format", default="csv", help="csv (default) or ndjson")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="file to write (via FILE.part, renamed when complete), or - for stdout",
    )
    p.add_argument("--select", help="columns, comma-separated")
    p.add_argument("--order", help="e.g. created_at.desc,id")
    p.add_argument("--limit", type=int)
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COL=OP.VALUE",
        help="a filter, as in the HTTP query (repeatable): --where 'kind=eq.click'",
    )

    p = commands.add_parser("demo", help="embedded PostgreSQL + demo data + a key, then serve")
    p.add_argument("--data-dir", default=".exporter-demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the events table")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return demo(args)
    settings = load_settings()
    if args.command == "serve":
        serve(args.host, args.port, args.workers)
        return 0
    # Exports read the database; keys and migrations live in the state database.
    url = settings.database_url if args.command == "export" else settings.state_url
    try:
        if args.command == "migrate":
            migrate(settings)
            return 0
        if args.command == "keys":
            return asyncio.run(_keys(settings, args.action, getattr(args, "name", None)))
        return asyncio.run(_export(settings, args))
    except CliError:
        raise
    except Exception as exc:
        error = database_error(exc, url)
        if error is None:
            raise
        raise error from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = INTERRUPTED
    sys.exit(code)
