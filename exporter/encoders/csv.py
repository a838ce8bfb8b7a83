import csv
from collections.abc import Sequence
from typing import Any

from exporter.catalog import Column
from exporter.encoders import Encoder, Rendering


class CsvEncoder(Encoder):
    """RFC 4180 CSV: a header row of column names, fields quoted only where needed, CRLF-free
    (`\\n`) line endings as PostgreSQL's COPY writes them."""

    format = "csv"
    media_type = "text/csv"
    extension = "csv"
    rendering = Rendering.TEXT_VALUES

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__(columns)
        self.writer = csv.writer(self.buffer, lineterminator="\n")

    def begin(self) -> None:
        self.writer.writerow([column.name for column in self.columns])

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        self.writer.writerows(rows)
