import csv
from collections.abc import Sequence
from typing import Any

from exporter.catalog import Column
from exporter.encoders import Encoder, Rendering


class CsvEncoder(Encoder):
    """RFC 4180 CSV as PostgreSQL's COPY writes it: a header row of column names, fields quoted
    only where needed, an empty unquoted field for NULL and `""` for the empty string, `\\n`
    line ends, every value in PostgreSQL's own text form.

    PostgreSQL writes it (Rendering.COPY): that is exact by definition and runs at the speed
    of COPY. The row methods below (a csv.writer on the reused buffer) are for options that
    COPY cannot express.
    """

    format = "csv"
    media_type = "text/csv"
    extension = "csv"
    rendering = Rendering.COPY
    copy_options = {"format": "csv", "header": True}

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__(columns)
        self.writer = csv.writer(self.buffer, lineterminator="\n")
        self._in_quotes = False
        self._header_pending = True

    def count_records(self, data: bytes) -> int:
        # A record ends at a line break outside quotes. COPY writes a quote only around a
        # field or doubled inside one, so the text between quotes alternates outside, inside.
        pieces = data.split(b'"')
        start = 1 if self._in_quotes else 0
        records = sum(piece.count(b"\n") for piece in pieces[start::2])
        if len(pieces) % 2 == 0:
            self._in_quotes = not self._in_quotes
        if self._header_pending and records:
            self._header_pending = False
            records -= 1
        return records

    def begin(self) -> None:
        self.writer.writerow([column.name for column in self.columns])

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        self.writer.writerows(rows)
