from collections.abc import Sequence
from typing import Any

from exporter.pipeline.catalog import Column
from exporter.pipeline.encoders.base import Encoder, Rendering, RenderOptions
from exporter.pipeline.query import QueryError


class NdjsonEncoder(Encoder):
    """One JSON object per line. PostgreSQL renders each object (`row_to_json`), so values keep
    the digits and forms PostgreSQL prints.

    PostgreSQL also writes the lines, with COPY in CSV format: its delimiter and quote are
    set to control characters that rendered JSON never holds (JSON escapes them in strings
    and allows none between tokens; line breaks in json values are removed by the source),
    so no field is ever quoted and each line is the object as rendered, plus its line end.
    write_rows joins rows from a cursor instead.
    """

    format = "ndjson"
    media_type = "application/x-ndjson"
    extension = "ndjson"
    rendering = Rendering.JSON_ROW
    option_names = frozenset({"numbers"})

    def __init__(self, columns: Sequence[Column], options: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(columns, options)
        numbers = self.options.get("numbers", "number")
        if numbers not in ("number", "string"):
            raise QueryError("numbers", "numbers must be number or string")
        self.render = RenderOptions(numbers_as_strings=numbers == "string")

    def copy_options(self) -> dict[str, Any] | None:
        return {"format": "csv", "delimiter": "\x02", "quote": "\x01"}

    def count_records(self, data: bytes) -> int:
        # COPY quotes a field (with \x01) only if it holds a line break: a json value inside a
        # composite type, say, which the source does not clean. That line would be split in
        # two, so the export fails instead of delivering a corrupt file.
        if b"\x01" in data:
            raise ValueError("a rendered row holds a line break; cannot write it as NDJSON")
        return data.count(b"\n")

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        lines = "\n".join([row[0] for row in rows])
        if lines.count("\n") != len(rows) - 1:
            raise ValueError("a rendered row holds a line break; cannot write it as NDJSON")
        self.buffer.write(lines)
        self.buffer.write("\n")
