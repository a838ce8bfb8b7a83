"""exporter serve | migrate | keys | log | export | track | untrack | prune-changes | demo"""

import argparse
import asyncio
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.cli.database import database_error
from exporter.cli.serve import serve
from exporter.errors import INTERRUPTED, ExporterError, InvalidRequest
from exporter.settings import Settings

if TYPE_CHECKING:
    from exporter.access.log_query import LogPage


def load_settings() -> Settings:
    """Settings from the environment, or an error that names the variable at fault."""
    from pydantic import ValidationError

    from exporter.db.pool import connect_url

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"EXPORTER_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidRequest(f"invalid configuration: {problems}") from None
    for variable, url in [
        ("EXPORTER_DATABASE_URL", settings.database_url),
        ("EXPORTER_STATE_DATABASE_URL", settings.state_database_url),
    ]:
        try:
            if url is not None:
                connect_url(url)
        except ValueError as exc:
            raise InvalidRequest(f"invalid configuration: {variable}: {exc}") from None
    return settings


def migrate(settings: Settings) -> None:
    from alembic.util.exc import CommandError

    from exporter.schema.migrate import upgrade

    try:
        upgrade(settings.state_url)
    except CommandError as exc:
        raise ExporterError(f"migration failed: {exc}") from None
    print("migrated to head", file=sys.stderr)


_DURATION = {"m": 60, "h": 3600, "d": 86400}
# At most about 27 years, whatever the unit: far inside datetime's range.
_MAX_EXPIRY_S = 10_000 * 86400


def parse_expiry(text: str, now: datetime) -> datetime:
    """`--expires`: a duration from now (`90m`, `12h`, `30d`) or an ISO 8601 time with its
    offset (`2027-01-31T00:00:00+00:00`)."""
    duration = re.fullmatch(r"([0-9]{1,9})([mhd])", text)
    if duration:
        seconds = int(duration.group(1)) * _DURATION[duration.group(2)]
        if not 0 < seconds <= _MAX_EXPIRY_S:
            raise InvalidRequest(f"--expires: {text!r} must be more than 0 and at most 10000d")
        return now + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"--expires: {text!r} is neither 30d/12h/90m nor an ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        raise InvalidRequest(f"--expires: {text!r} needs an offset, e.g. 2027-01-31T00:00:00+00:00")
    if when <= now:
        raise InvalidRequest(f"--expires: {text!r} is in the past")
    return when


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.access.keys import KeyExists, check_patterns, create_key, list_keys, revoke_key
    from exporter.db.pool import Pool

    action: str = args.action
    name: str | None = getattr(args, "name", None)
    if name is not None and not name.strip():
        raise InvalidRequest("a key needs a non-empty name")
    if action == "create":
        try:
            patterns = check_patterns(args.datasets or ["*"])
        except ValueError as exc:
            raise InvalidRequest(f"--datasets: {exc}") from None
        now = datetime.now(UTC)
        expires_at = parse_expiry(args.expires, now) if args.expires else None
        if args.role is not None:
            role: str = args.role
            # "none" means RESET ROLE to PostgreSQL, never a role: it would read as the service;
            # "public" is the pseudo-role of every role, which no session can take.
            if not role.strip() or role.lower() in ("none", "public") or "\x00" in role:
                raise InvalidRequest(f"--role: {role!r} cannot name a role")
            if len(role.encode()) > 63:
                raise InvalidRequest("--role: PostgreSQL role names are at most 63 bytes")
    pool = await Pool.open(settings.state_url, size=1)
    try:
        if action == "create":
            assert name is not None
            try:
                key = await create_key(pool, name, patterns, expires_at, args.role, args.admin)
            except KeyExists as exc:
                raise ExporterError(str(exc)) from None
            print(f"created key {name!r}; it is shown once, store it now:", file=sys.stderr)
            print(key)
        elif action == "list":
            for info in await list_keys(pool):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                if info.expires_at is not None and info.revoked_at is None:
                    ended = info.expires_at <= datetime.now(UTC)
                    word = "expired" if ended else "active, expires"
                    state = f"{word} {info.expires_at:%Y-%m-%d %H:%M %z}"
                print(
                    f"{info.name}\tcreated {info.created_at:%Y-%m-%d %H:%M}\t{state}"
                    f"\tdatasets {','.join(info.datasets)}"
                    + (f"\trole {info.role}" if info.role else "")
                    + ("\tadmin" if info.admin else "")
                )
        else:
            assert name is not None
            if not await revoke_key(pool, name):
                raise ExporterError(f"no active key named {name!r}")
            print(f"revoked {name!r}", file=sys.stderr)
        return 0
    finally:
        await pool.close()


# The options of `exporter log`, as the parameters of GET /exports they stand for.
LOG_FILTERS = ("key", "dataset", "outcome", "status", "since", "until", "request_id", "before")
LOG_DEFAULT_LIMIT = 50


async def _read_log(settings: Settings, args: argparse.Namespace) -> "LogPage":
    from exporter.access.log_query import LogQuery, fetch_page
    from exporter.db.pool import Pool
    from exporter.pipeline.query import QueryError

    given = [(name, getattr(args, name)) for name in LOG_FILTERS if getattr(args, name) is not None]
    try:
        # The parser GET /exports uses: the same checks, the same meaning.
        query = LogQuery.parse([*given, ("limit", args.limit)])
    except QueryError as exc:
        raise InvalidRequest(f"--{exc.parameter.replace('_', '-')}: {exc.reason}") from None
    pool = await Pool.open(settings.state_url, size=1)
    try:
        return await fetch_page(pool, query)
    finally:
        await pool.close()


def show_log(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.access.log_query import table

    page = asyncio.run(_read_log(settings, args))
    if args.json:
        lines = [entry.model_dump_json() for entry in page.entries]
    else:
        lines = table(page.entries) if page.entries else []
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # `exporter log | head`: the reader has what it wanted. Keep Python's own flush of
        # stdout at exit from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not page.entries:
        print("no export log entries match", file=sys.stderr)
    if page.next_before is not None:
        print(f"more entries: add --before {page.next_before}", file=sys.stderr)
    print(
        f"entries are kept {_duration(settings.export_log_retention_s)}"
        " (EXPORTER_EXPORT_LOG_RETENTION); requests without a valid key are not logged here",
        file=sys.stderr,
    )
    return 0


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:g} seconds"


def demo(args: argparse.Namespace) -> int:
    from exporter.cli.demo import run_demo

    return run_demo(Path(args.data_dir), args.host, args.port, args.rows)


async def _tracking(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.db.pool import Pool
    from exporter.incremental.tracking import TrackingError, prune, track, untrack
    from exporter.pipeline.catalog import find_dataset

    pool = await Pool.open(settings.database_url, size=1)
    try:
        if args.command == "prune-changes":
            retention: float = (
                args.retention if args.retention is not None else settings.change_retention_s
            )
            async with pool.connection() as connection:
                pruned = await prune(connection, retention)
            if pruned is None:
                print("another process is pruning; nothing done")
            else:
                print(f"deleted {pruned.changes} changes")
            return 0
        # Before the connection is taken: the catalog takes one of its own from the pool.
        dataset = await find_dataset(pool, settings.exposed_schemas, args.table)
        if dataset is None:
            raise ExporterError(f"no dataset named {args.table!r}")
        async with pool.connection() as connection:
            try:
                if args.command == "track":
                    done = await track(connection, dataset)
                    print(f"tracking {dataset.name}" if done else f"{dataset.name} was tracked")
                else:
                    done = await untrack(connection, dataset)
                    print(
                        f"stopped tracking {dataset.name}"
                        if done
                        else f"{dataset.name} was not tracked"
                    )
            except TrackingError as exc:
                raise ExporterError(str(exc)) from None
    finally:
        await pool.close()
    return 0


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
    create = keys.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("name")
    create.add_argument(
        "--datasets",
        action="append",
        metavar="PATTERN",
        help="a glob over dataset names the key may read (repeatable; default '*': all)",
    )
    create.add_argument("--expires", metavar="WHEN", help="30d, 12h, 90m, or an ISO 8601 time")
    create.add_argument(
        "--role", help="a PostgreSQL role the key's exports run as (SET LOCAL ROLE)"
    )
    create.add_argument(
        "--admin",
        action="store_true",
        help="the key may also read the export log (GET /exports)",
    )
    keys.add_parser("list", help="list keys (never the keys themselves)")
    keys.add_parser("revoke", help="revoke a key").add_argument("name")

    p = commands.add_parser(
        "log",
        help="print the export log, newest first (the filters of GET /exports)",
        description="Print the export log of the state database, newest first: a table, or "
        "with --json one JSON object per line, as GET /exports lists them.",
    )
    p.add_argument("--key", metavar="NAME", help="entries of the key with this name")
    p.add_argument("--dataset", help="entries for this dataset")
    p.add_argument(
        "--outcome",
        help="running, completed, failed, disconnected, aborted or refused",
    )
    p.add_argument("--status", help="entries answered with this HTTP status (200: started)")
    p.add_argument("--since", metavar="TIME", help="started at or after (ISO 8601, with offset)")
    p.add_argument("--until", metavar="TIME", help="started before (ISO 8601, with offset)")
    p.add_argument("--request-id", dest="request_id", metavar="ID", help="one request's entry")
    p.add_argument("--before", metavar="ID", help="entries with smaller ids (the next page)")
    p.add_argument(
        "--limit",
        default=str(LOG_DEFAULT_LIMIT),
        help=f"at most this many entries, up to 1000 (default {LOG_DEFAULT_LIMIT})",
    )
    p.add_argument("--json", action="store_true", help="NDJSON: one entry per line")

    p = commands.add_parser(
        "track",
        help="record a table's changes, so that since= pulls are exact and report deletes",
    )
    p.add_argument("table", help="the dataset name of a table with a primary key")
    p = commands.add_parser("untrack", help="stop recording a table's changes and drop them")
    p.add_argument("table")
    p = commands.add_parser(
        "prune-changes",
        help="delete recorded changes older than the retention (serve does it every 10 min)",
    )
    p.add_argument(
        "--retention",
        type=float,
        metavar="SECONDS",
        help="keep changes this long (default: EXPORTER_CHANGE_RETENTION_S)",
    )

    p = commands.add_parser("export", help="export a dataset to a file, as the HTTP API does")
    p.add_argument("dataset")
    # Checked against the encoder registry in export_to_file: importing it here would make every
    # command, --help included, pay for FastAPI's and asyncpg's imports.
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
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a format option, as in the HTTP query (repeatable): --option delimiter=';'",
    )
    p.add_argument(
        "--job",
        action="store_true",
        help="run it as a background job of a running service (EXPORTER_URL, key in "
        "EXPORTER_KEY): progress from its events, then a resumable download",
    )
    p.add_argument("--url", help="with --job: the service (default EXPORTER_URL, or :8000)")

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
        serve(args.host, args.port, args.workers, settings.shutdown_grace_s)
        return 0
    # Exports read the database; keys, the export log and migrations live in the state
    # database.
    tracking = args.command in ("track", "untrack", "prune-changes")
    url = settings.database_url if args.command == "export" or tracking else settings.state_url
    try:
        if args.command == "migrate":
            migrate(settings)
            return 0
        if args.command == "keys":
            return asyncio.run(_keys(settings, args))
        if args.command == "log":
            return show_log(settings, args)
        if tracking:
            return asyncio.run(_tracking(settings, args))
        if args.job:
            from exporter.cli.job_client import export_as_job

            return export_as_job(args)
        from exporter.cli.file_export import export_to_file

        return asyncio.run(export_to_file(settings, args))
    except Exception as exc:
        # Ours included: a PoolTimeout (connecting hung) is still "cannot connect".
        error = database_error(exc, url)
        if error is None:
            raise
        raise error from None


def report(error: ExporterError) -> int:
    """The error as the command shows it: one line on stderr (no traceback); its exit code."""
    print(f"error: {error.detail or error}", file=sys.stderr)
    return error.exit_code


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except ExporterError as exc:
        code = report(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = INTERRUPTED
    sys.exit(code)
