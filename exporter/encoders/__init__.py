"""Encoders turn batches of rows into text. Adding a format: one module, one registry entry.

Each encoder says how much of the rendering PostgreSQL does for it (`Rendering`), because
per-value work in Python caps throughput far below what PostgreSQL can send; the source
builds its SELECT list accordingly. Every encoder writes into one reused, truncated StringIO,
so memory holds at most one batch however large the table is.
"""

import enum
import io
from collections.abc import Sequence
from typing import Any, ClassVar

from exporter.catalog import Column


class Rendering(enum.Enum):
    # One column per selected column, each rendered by PostgreSQL as text; NULL stays None.
    TEXT_VALUES = "text_values"
    # One text column per row: the whole row as a JSON object rendered by PostgreSQL,
    # keys in column order.
    JSON_ROW = "json_row"
    # The columns as they are: what a COPY of TEXT_VALUES selects, since COPY writes every
    # value's text form itself.
    COLUMNS = "columns"


class Encoder:
    format: ClassVar[str]
    media_type: ClassVar[str]
    extension: ClassVar[str]
    rendering: ClassVar[Rendering]

    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.buffer = io.StringIO()

    def begin(self) -> None:
        """Write what precedes the rows (a header, say)."""

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    # Where PostgreSQL's COPY (...) TO STDOUT with these options writes exactly the encoder's
    # format, the export runs as that COPY and the encoder only passes its output on (at the
    # speed of COPY), keeping a running count of the records that end in each chunk (chunks
    # arrive in order) for progress; COPY's own count replaces it when the export completes.
    # None: rows come through a cursor and write_rows.
    copy_options: ClassVar[dict[str, Any] | None] = None

    def count_records(self, data: bytes) -> int:
        raise NotImplementedError

    def end(self) -> None:
        """Write what follows the rows."""

    def pending(self) -> int:
        return self.buffer.tell()

    def take(self) -> str:
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text


def _registry() -> dict[str, type[Encoder]]:
    # Imported here so that each format module can import Encoder from this package.
    from exporter.encoders.csv import CsvEncoder
    from exporter.encoders.ndjson import NdjsonEncoder

    return {encoder.format: encoder for encoder in (CsvEncoder, NdjsonEncoder)}


ENCODERS: dict[str, type[Encoder]] = _registry()


def encoder_for_media_type(media_type: str) -> type[Encoder] | None:
    for encoder in ENCODERS.values():
        if encoder.media_type == media_type:
            return encoder
    return None
