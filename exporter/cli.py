"""exporter serve | migrate | keys | export | demo"""

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from exporter.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


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


def migrate(settings: Settings) -> None:
    from exporter.migrate import upgrade

    upgrade(settings.state_url)
    print("migrated to head", file=sys.stderr)


async def _keys(settings: Settings, action: str, name: str | None) -> int:
    from exporter.auth import KeyExists, create_key, list_keys, revoke_key
    from exporter.db import create_engine

    engine = create_engine(settings.state_url, pool_size=1)
    try:
        if action == "create":
            assert name is not None
            try:
                key = await create_key(engine, name)
            except KeyExists as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"created key {name!r}; it is shown once, store it now:", file=sys.stderr)
            print(key)
        elif action == "list":
            for info in await list_keys(engine):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                print(f"{info.name}\tcreated {info.created_at:%Y-%m-%d %H:%M}\t{state}")
        else:
            assert name is not None
            if not await revoke_key(engine, name):
                print(f"error: no active key named {name!r}", file=sys.stderr)
                return 1
            print(f"revoked {name!r}", file=sys.stderr)
        return 0
    finally:
        await engine.dispose()


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, out: TextIO, total: int | None) -> None:
        self.out = out
        self.total = total
        self.enabled = out.isatty()
        self.started = time.monotonic()
        self.shown = 0.0

    def update(self, rows: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.shown < 0.2):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        line = f"\r{rows:,} rows  {rows / elapsed:,.0f} rows/s"
        if self.total:
            line += f"  ~{min(rows / self.total, 1):.0%} of ~{self.total:,}"
        self.out.write(line + ("\n" if final else ""))
        self.out.flush()


async def _export(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.catalog import find_dataset
    from exporter.db import create_engine
    from exporter.encoders import ENCODERS
    from exporter.query import QueryError, parse_query
    from exporter.stream import ExportStream

    engine = create_engine(settings.database_url, pool_size=1)
    try:
        dataset = await find_dataset(engine, settings.exposed_schemas, args.dataset)
        if dataset is None:
            print(f"error: no dataset named {args.dataset!r}", file=sys.stderr)
            return 2
        params: list[tuple[str, str]] = []
        for name in ("select", "order", "limit"):
            if getattr(args, name) is not None:
                params.append((name, str(getattr(args, name))))
        for condition in args.where:
            column, equals, expression = condition.partition("=")
            if not equals:
                print(f"error: --where takes col=op.value, got {condition!r}", file=sys.stderr)
                return 2
            params.append((column, expression))
        try:
            query = parse_query(dataset, params, max_limit=settings.max_limit)
        except QueryError as exc:
            print(f"error: {exc.parameter}: {exc.detail}", file=sys.stderr)
            return 2
        stream = ExportStream(query, ENCODERS[args.format], engine, settings, "exporter cli")
        await stream.open()
        total = query.limit if query.limit is not None else dataset.estimated_rows
        progress = Progress(sys.stderr, total)
        if args.output == "-":
            async for chunk in stream.chunks():
                sys.stdout.buffer.write(chunk)
                progress.update(stream.rows)
            sys.stdout.buffer.flush()
        else:
            # Written aside and renamed at the end: a failed export never leaves a file that
            # looks complete.
            target = Path(args.output)
            partial = target.with_name(target.name + ".part")
            try:
                with partial.open("wb") as out:
                    async for chunk in stream.chunks():
                        out.write(chunk)
                        progress.update(stream.rows)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        progress.update(stream.rows, final=True)
        print(f"{stream.rows} rows, {stream.bytes} bytes", file=sys.stderr)
        return 0
    finally:
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
    p.add_argument("--format", choices=["csv", "ndjson"], default="csv")
    p.add_argument("-o", "--output", required=True, help="file to write, or - for stdout")
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        sys.exit(demo(args))
    settings = Settings()
    if args.command == "serve":
        serve(args.host, args.port, args.workers)
    elif args.command == "migrate":
        migrate(settings)
    elif args.command == "keys":
        sys.exit(asyncio.run(_keys(settings, args.action, getattr(args, "name", None))))
    elif args.command == "export":
        sys.exit(asyncio.run(_export(settings, args)))
