from collections.abc import Sequence
from typing import Any

from exporter.encoders import Encoder, Rendering


class NdjsonEncoder(Encoder):
    """One JSON object per line. PostgreSQL renders each object (`row_to_json`), so values keep
    the digits and forms PostgreSQL prints; Python only joins the lines."""

    format = "ndjson"
    media_type = "application/x-ndjson"
    extension = "ndjson"
    rendering = Rendering.JSON_ROW

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        write = self.buffer.write
        write("\n".join([row[0] for row in rows]))
        write("\n")
