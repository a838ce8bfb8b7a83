"""Reading the export log: filters, keyset paging and the shape of an entry, shared by
`GET /exports` and `exporter log` so that the two cannot disagree on what a filter means.

Entries come newest first, by id: the identity column only grows, so a page that ends at id N
continues with `id < N`, and entries logged in the meantime never shift or repeat a page."""

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from exporter.db.pool import Pool
from exporter.pipeline.query import QueryError

OUTCOMES = ("running", "completed", "failed", "disconnected", "aborted", "refused")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Longer than any name the service logs; a bound, so that a filter is never a megabyte.
MAX_TEXT = 1000
_BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True)
class Parameter:
    name: str
    schema: dict[str, Any]
    description: str


# What _text takes: 1 to MAX_TEXT characters, no NUL.
_TEXT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "pattern": "^[^\\x00]+$"}

PARAMETERS = (
    Parameter("key", _TEXT_SCHEMA, "Entries of the key with this name."),
    Parameter("dataset", _TEXT_SCHEMA, "Entries for this dataset (as requested)."),
    Parameter("outcome", {"type": "string", "enum": list(OUTCOMES)}, "Entries with this outcome."),
    Parameter(
        "status",
        {"type": "integer", "minimum": 100, "maximum": 599},
        "Entries answered with this HTTP status (200: the export started).",
    ),
    Parameter(
        "since",
        {"type": "string", "format": "date-time"},
        "Entries started at or after this time: ISO 8601 with an offset or Z "
        "(a `+` must be sent as `%2B`).",
    ),
    Parameter(
        "until",
        {"type": "string", "format": "date-time"},
        "Entries started before this time (ISO 8601 with an offset or Z).",
    ),
    Parameter("request_id", _TEXT_SCHEMA, "The entry of the request with this X-Request-Id."),
    Parameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        "Entries per page.",
    ),
    Parameter(
        "before",
        {"type": "integer", "minimum": 1, "maximum": _BIGINT_MAX},
        "Entries with ids below this one: the cursor that `next` carries.",
    ),
)
PARAMETER_NAMES = tuple(p.name for p in PARAMETERS)


class ExportLogEntry(BaseModel):
    """One export request: an export that started (status 200), or a refused one."""

    id: int
    request_id: str
    key: str | None = Field(description="The key's name; null when no valid key was sent.")
    dataset: str
    format: str
    parameters: dict[str, Any] = Field(description="The query parameters, as {name: [values]}.")
    client_addr: str | None
    started_at: datetime
    ended_at: datetime | None
    duration_s: float | None = Field(description="null while the export runs.")
    rows: int | None
    bytes: int | None = Field(description="Bytes of the export before compression.")
    outcome: str = Field(description=", ".join(OUTCOMES))
    status: int | None = Field(description="The HTTP status the request was answered with.")
    aborted_by: str | None = Field(description="The limit that aborted the export.")
    error: str | None


@dataclass(frozen=True)
class LogPage:
    entries: list[ExportLogEntry]
    # Where the next page starts (`before`), or None on the last page.
    next_before: int | None


class LogQueryTimeout(TimeoutError):
    """The query ran longer than it may; narrower filters make it cheaper."""


def _text(name: str, value: str) -> str:
    if not value:
        raise QueryError(name, "must not be empty")
    if len(value) > MAX_TEXT:
        raise QueryError(name, f"at most {MAX_TEXT} characters")
    if "\x00" in value:
        raise QueryError(name, "must not contain NUL")
    try:
        value.encode()
    except UnicodeEncodeError:  # undecodable bytes in a command-line argument
        raise QueryError(name, "not valid UTF-8") from None
    return value


def _integer(name: str, value: str, low: int, high: int) -> int:
    # Not int(): it takes " 7", "1_000" and other scripts' digits.
    if not re.fullmatch(r"[0-9]{1,20}", value) or not low <= int(value) <= high:
        raise QueryError(name, f"{value[:50]!r} is not an integer from {low} to {high}")
    return int(value)


def _time(name: str, value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        hint = ""
        if re.search(r" [0-9]{2}(:?[0-9]{2})?$", value):
            hint = " (in a URL, the offset's '+' must be written %2B)"
        raise QueryError(name, f"{value[:50]!r} is not an ISO 8601 time{hint}") from None
    if when.tzinfo is None:
        raise QueryError(name, f"{value[:50]!r} needs an offset, e.g. 2026-01-31T00:00:00Z")
    try:
        return when.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before datetime's year 1 in UTC
        raise QueryError(name, f"{value[:50]!r} is out of range") from None


@dataclass(frozen=True)
class LogQuery:
    key: str | None = None
    dataset: str | None = None
    outcome: str | None = None
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_id: str | None = None
    before: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]]) -> "LogQuery":
        """The query of request parameters; QueryError names a parameter at fault, unknown
        and repeated ones included."""
        given: dict[str, str] = {}
        for name, value in params:
            if name not in PARAMETER_NAMES:
                known = ", ".join(PARAMETER_NAMES)
                raise QueryError(name[:50], f"unknown parameter (known: {known})")
            if name in given:
                raise QueryError(name, "given more than once")
            given[name] = value
        outcome = given.get("outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise QueryError("outcome", f"{outcome[:50]!r} is not one of {', '.join(OUTCOMES)}")
        return cls(
            key=_text("key", given["key"]) if "key" in given else None,
            dataset=_text("dataset", given["dataset"]) if "dataset" in given else None,
            outcome=outcome,
            status=_integer("status", given["status"], 100, 599) if "status" in given else None,
            since=_time("since", given["since"]) if "since" in given else None,
            until=_time("until", given["until"]) if "until" in given else None,
            request_id=_text("request_id", given["request_id"]) if "request_id" in given else None,
            before=_integer("before", given["before"], 1, _BIGINT_MAX)
            if "before" in given
            else None,
            limit=_integer("limit", given.get("limit", str(DEFAULT_LIMIT)), 1, MAX_LIMIT),
        )

    def sql(self) -> tuple[str, list[Any]]:
        """The SELECT, with every value bound; one row more than a page, to tell whether
        another page follows."""
        conditions: list[str] = []
        args: list[Any] = []
        for condition, value in (
            ("key_name = {}", self.key),
            ("dataset = {}", self.dataset),
            ("outcome = {}", self.outcome),
            ("status = {}", self.status),
            ("started_at >= {}", self.since),
            ("started_at < {}", self.until),
            ("request_id = {}", self.request_id),
            ("id < {}", self.before),
        ):
            if value is not None:
                args.append(value)
                conditions.append(condition.format(f"${len(args)}"))
        args.append(self.limit + 1)
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        return (
            "SELECT id, request_id, key_name, dataset, format, parameters, client_addr,"
            " started_at, ended_at, rows, bytes, outcome, status, aborted_by, error"
            f" FROM exporter.export_log{where} ORDER BY id DESC LIMIT ${len(args)}",
            args,
        )


def _entry(row: Any) -> ExportLogEntry:
    started: datetime = row["started_at"]
    ended: datetime | None = row["ended_at"]
    return ExportLogEntry(
        id=row["id"],
        request_id=row["request_id"],
        key=row["key_name"],
        dataset=row["dataset"],
        format=row["format"],
        parameters=json.loads(row["parameters"]),
        client_addr=row["client_addr"],
        started_at=started,
        ended_at=ended,
        duration_s=None if ended is None else round((ended - started).total_seconds(), 3),
        rows=row["rows"],
        bytes=row["bytes"],
        outcome=row["outcome"],
        status=row["status"],
        aborted_by=row["aborted_by"],
        error=row["error"],
    )


async def fetch_page(pool: Pool, query: LogQuery, timeout_s: float | None = None) -> LogPage:
    sql, args = query.sql()
    async with pool.connection() as connection:
        try:
            rows = await connection.fetch(sql, *args, timeout=timeout_s)
        except TimeoutError:  # asyncpg has cancelled the query
            raise LogQueryTimeout(f"the export log query took more than {timeout_s} s") from None
    entries = [_entry(row) for row in rows[: query.limit]]
    more = len(rows) > query.limit
    return LogPage(entries, entries[-1].id if more else None)


# --- the command line's table ------------------------------------------------------------------

_ERROR_WIDTH = 80


def _printable(value: str) -> str:
    # Dataset names of refused requests are whatever the URL said: no terminal escapes,
    # line breaks or bidi overrides reach the operator's terminal.
    return "".join(
        ch if unicodedata.category(ch) not in ("Cc", "Cf") else f"\\u{ord(ch):04x}" for ch in value
    )


def _cells(entry: ExportLogEntry) -> list[str]:
    outcome = entry.outcome + (f" ({entry.aborted_by})" if entry.aborted_by else "")
    error = _printable(entry.error or "")
    if len(error) > _ERROR_WIDTH:
        error = error[: _ERROR_WIDTH - 1] + "…"
    return [
        str(entry.id),
        f"{entry.started_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
        "-" if entry.duration_s is None else f"{entry.duration_s:.3f}",
        _printable(entry.key) if entry.key is not None else "-",
        _printable(entry.dataset),
        _printable(entry.format),
        "-" if entry.status is None else str(entry.status),
        _printable(outcome),
        "-" if entry.rows is None else str(entry.rows),
        "-" if entry.bytes is None else str(entry.bytes),
        _printable(entry.request_id),
        error,
    ]


_HEADERS = [
    "ID",
    "STARTED (UTC)",
    "SECONDS",
    "KEY",
    "DATASET",
    "FORMAT",
    "STATUS",
    "OUTCOME",
    "ROWS",
    "BYTES",
    "REQUEST ID",
    "ERROR",
]
_RIGHT_ALIGNED = {"ID", "SECONDS", "STATUS", "ROWS", "BYTES"}


def table(entries: Sequence[ExportLogEntry]) -> list[str]:
    """The entries as the lines of an aligned text table, headers first."""
    rows = [_HEADERS] + [_cells(entry) for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if header in _RIGHT_ALIGNED else cell.ljust(width)
            for cell, width, header in zip(row, widths, _HEADERS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
