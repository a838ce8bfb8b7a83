"""`exporter export`: a dataset to a file or stdout, through the same pipeline as HTTP."""

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, TextIO

from exporter.cli.database import database_error
from exporter.errors import ExporterError, InvalidRequest
from exporter.settings import Settings

if TYPE_CHECKING:
    from exporter.db.pool import Pool
    from exporter.pipeline.encoders import Encoder
    from exporter.pipeline.query import ExportQuery


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


class OutputFailed(ExporterError):
    """The export's output could not be written (a full disk, a closed pipe's neighbour)."""


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
            raise InvalidRequest(f"{name} is a directory")
        partial = target.with_name(target.name + ".part")
        try:
            self.file = partial.open("wb")
        except OSError as exc:
            raise InvalidRequest(f"cannot write {partial}: {exc.strerror or exc}") from None
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
            raise OutputFailed(f"cannot write {where}: {exc.strerror or exc}") from None

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
    pool: "Pool", query: "ExportQuery", encoder: "type[Encoder]"
) -> int | None:
    """The planner's estimate of the export's rows (filters and limit included), for the
    progress bar. Best effort: a query PostgreSQL rejects fails properly in open()."""
    from exporter.pipeline.source import build_sql

    sql, args = build_sql(query, encoder.rendering)
    try:
        async with pool.connection() as connection, connection.transaction():
            # A parallel plan's top node counts only the workers' share of the rows.
            await connection.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            plan = await connection.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        return int(json.loads(plan)[0]["Plan"]["Plan Rows"])
    except Exception:
        return None


def export_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The CLI's options as the HTTP query's parameters, so both go through parse_query."""
    from exporter.pipeline.query import FORMAT_OPTIONS

    params: list[tuple[str, str]] = []
    for name in ("select", "order", "limit"):
        if getattr(args, name) is not None:
            params.append((name, str(getattr(args, name))))
    for condition in args.where:
        column, equals, expression = condition.partition("=")
        if not equals or not column:
            raise InvalidRequest(f"--where takes col=op.value, got {condition!r}")
        params.append((column, expression))
    for option in args.option:
        name, equals, value = option.partition("=")
        if not equals or name not in FORMAT_OPTIONS:
            raise InvalidRequest(
                f"--option takes name=value, name one of {', '.join(sorted(FORMAT_OPTIONS))};"
                f" got {option!r}"
            )
        params.append((name, value))
    return params


async def export_to_file(settings: Settings, args: argparse.Namespace) -> int:
    from exporter.db.pool import Pool
    from exporter.pipeline.catalog import find_dataset
    from exporter.pipeline.encoders import ENCODERS
    from exporter.pipeline.query import parse_query
    from exporter.pipeline.stream import ExportStream

    params = export_params(args)
    encoder = ENCODERS.get(args.format)
    if encoder is None:
        raise InvalidRequest(
            f"--format: {args.format!r} is not one of {', '.join(sorted(ENCODERS))}"
        )
    progress = Progress(sys.stderr)
    pool = await Pool.open(settings.database_url, size=1)
    try:
        dataset = await find_dataset(pool, settings.exposed_schemas, args.dataset)
        if dataset is None:
            raise InvalidRequest(f"no dataset named {args.dataset!r}")
        # A QueryError (here, from a format option, or from a filter value PostgreSQL itself
        # rejects) is reported as it is: its parameter and reason, exit status 2.
        query = parse_query(
            dataset, params, max_limit=settings.max_limit, max_in_items=settings.max_in_items
        )
        if progress.enabled:
            progress.total = await _estimate_rows(pool, query, encoder)
        stream = ExportStream(query, encoder, pool, settings, "exporter cli")
        with Output(args.output) as output:
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
            except OutputFailed:
                raise
            except BrokenPipeError:
                # Like `head` closing the pipe: stop quietly, and keep Python's own flush of
                # stdout at exit from complaining again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise ExporterError(f"output closed after {stream.rows:,} rows") from None
            except Exception as exc:
                error = database_error(exc, settings.database_url)
                detail = error.detail if error is not None else repr(exc)
                kept = "" if output.target is None else f"; {output.name} was not written"
                raise ExporterError(
                    f"export failed after {stream.rows:,} rows: {detail}{kept}"
                ) from None
        progress.update(stream.rows, final=True)
        where = "" if output.target is None else f" to {output.target}"
        print(f"{stream.rows} rows, {stream.bytes} bytes{where}", file=sys.stderr)
        return 0
    finally:
        progress.close()
        await pool.close()
