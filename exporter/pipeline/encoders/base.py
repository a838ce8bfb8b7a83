"""Encoders turn batches of rows into text. Adding a format: one module, one registry entry.

Each encoder says how much of the rendering PostgreSQL does for it (`Rendering`), because
per-value work in Python caps throughput far below what PostgreSQL can send; the source
builds its SELECT list accordingly. Every encoder writes into one reused, truncated StringIO,
so memory holds at most one batch however large the table is.
"""

import enum
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from exporter.pipeline.catalog import Column
from exporter.pipeline.query import QueryError


class Rendering(enum.Enum):
    # One text column per row: the CSV record (without its line end), every field rendered
    # and quoted by PostgreSQL as COPY would write it.
    CSV_LINE = "csv_line"
    # One text column per row: the whole row as a JSON object rendered by PostgreSQL,
    # keys in column order.
    JSON_ROW = "json_row"
    # The columns as they are, for COPY, which writes every value's text form itself.
    COLUMNS = "columns"


@dataclass(frozen=True)
class RenderOptions:
    """What the source's SQL needs to know of an encoder's options."""

    delimiter: str = ","
    null: str = ""
    quote_all: bool = False
    escape_formulas: bool = False
    numbers_as_strings: bool = False


def parse_flag(name: str, value: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise QueryError(name, f"{name} must be true or false")


class Encoder:
    format: ClassVar[str]
    media_type: ClassVar[str]
    extension: ClassVar[str]
    rendering: ClassVar[Rendering]
    # The query parameters this format takes as options (query.FORMAT_OPTIONS lists all).
    option_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, columns: Sequence[Column], options: Sequence[tuple[str, str]] = ()) -> None:
        self.columns = columns
        self.buffer = io.StringIO()
        self.options = dict(options)
        for name in self.options:
            if name not in self.option_names:
                # Every format is a direct subclass (the registry imports this module).
                formats = Encoder.__subclasses__()
                owners = sorted(e.format for e in formats if name in e.option_names)
                raise QueryError(name, f"'{name}' applies to {' and '.join(owners)} exports only")
        self.render = RenderOptions()

    def begin(self) -> None:
        """Write what precedes the rows (a header, say)."""

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def copy_options(self) -> dict[str, Any] | None:
        """Where PostgreSQL's COPY (...) TO STDOUT with these options writes exactly the
        encoder's format, the export runs as that COPY and the encoder only passes its output
        on (at the speed of COPY), after `preamble()`, keeping a running count of the records
        that end in each chunk (chunks arrive in order) for progress; COPY's own count
        replaces it when the export completes. None: rows come through a cursor and
        write_rows, rendered as `rendering` says."""
        return None

    def preamble(self) -> bytes:
        """Bytes before COPY's output (a byte order mark, say)."""
        return b""

    def convert(self, data: bytes) -> bytes:
        """COPY's output on its way out, chunk by chunk, in order."""
        return data

    def count_records(self, data: bytes) -> int:
        raise NotImplementedError

    def record_ends(self, data: bytes) -> list[int]:
        """Exactly where records of COPY's output end in `data` (offsets just past each
        record's line end), chunk by chunk, in order; a header is not a record. Slower than
        count_records: for a row cap, which must not send a byte past its last row. This
        default suits formats whose records hold no line break."""
        self.count_records(data)  # its checks
        ends = []
        at = data.find(b"\n")
        while at >= 0:
            ends.append(at + 1)
            at = data.find(b"\n", at + 1)
        return ends

    def end(self) -> None:
        """Write what follows the rows."""

    def pending(self) -> int:
        return self.buffer.tell()

    def take(self) -> str:
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text
