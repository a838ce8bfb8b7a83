import csv
from collections.abc import Sequence
from typing import Any

from exporter.catalog import Column
from exporter.encoders import Encoder, Rendering


class CsvEncoder(Encoder):
    """RFC 4180 CSV as PostgreSQL's COPY writes it: a header row of column names, fields quoted
    only where needed, an empty unquoted field for NULL and `""` for the empty string, `\\n`
    line ends, every value in PostgreSQL's own text form.

    PostgreSQL writes it (COPY ... (FORMAT csv, HEADER)): that is exact by definition and runs
    at the speed of COPY. The row methods below (a csv.writer on the reused buffer) are for
    options that COPY cannot express.
    """

    format = "csv"
    media_type = "text/csv"
    extension = "csv"
    rendering = Rendering.TEXT_VALUES
    copy_options = {"format": "csv", "header": True}

    def __init__(self, columns: Sequence[Column]) -> None:
        super().__init__(columns)
        self.writer = csv.writer(self.buffer, lineterminator="\n")
        self._header_pending = True

    def count_records(self, data: bytes) -> int:
        # Line breaks, minus the header's: exact unless a field holds a line break. Telling
        # those apart needs the quotes tracked, which costs more than the whole COPY; the
        # count of a completed export is corrected from COPY's own.
        records = data.count(b"\n")
        if self._header_pending and records:
            self._header_pending = False
            records -= 1
        return records

    def begin(self) -> None:
        self.writer.writerow([column.name for column in self.columns])

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        self.writer.writerows(rows)
