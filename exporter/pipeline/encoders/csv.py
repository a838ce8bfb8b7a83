from collections.abc import Sequence
from typing import Any

from exporter.pipeline.catalog import Column
from exporter.pipeline.encoders.base import Encoder, Rendering, RenderOptions, parse_flag
from exporter.pipeline.query import QueryError

# Query values for `delimiter`; a tab may be given as the character, `\t` or `tab`.
DELIMITERS = {",": ",", ";": ";", "|": "|", "\t": "\t", "\\t": "\t", "tab": "\t"}
MAX_NULL_LENGTH = 100
BOM = "\ufeff"


class CsvEncoder(Encoder):
    """RFC 4180 CSV as PostgreSQL's COPY writes it: a header row of column names, fields quoted
    only where needed, an empty unquoted field for NULL and `""` for the empty string, `\\n`
    line ends, every value in PostgreSQL's own text form.

    With the default options and those COPY has (header, delimiter, null, quote=all),
    PostgreSQL writes it with COPY ... (FORMAT csv): exact by definition, at the speed of COPY.
    COPY's LF record ends become CRLF on the way out (crlf). The Excel profile's formula
    escaping is beyond COPY: then
    PostgreSQL renders each record as one text value (Rendering.CSV_LINE, the same quoting
    rules) and the rows below join them.
    """

    format = "csv"
    media_type = "text/csv"
    extension = "csv"
    rendering = Rendering.CSV_LINE
    option_names = frozenset({"header", "delimiter", "null", "bom", "quote", "crlf", "profile"})

    def __init__(self, columns: Sequence[Column], options: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(columns, options)
        given = self.options
        excel = False
        if "profile" in given:
            if given["profile"] != "excel":
                raise QueryError("profile", "profile must be excel")
            excel = True
        excel_default = "true" if excel else "false"
        self.header = parse_flag("header", given.get("header", "true"))
        self.bom = parse_flag("bom", given.get("bom", excel_default))
        self.crlf = parse_flag("crlf", given.get("crlf", excel_default))
        delimiter = DELIMITERS.get(given.get("delimiter", ","))
        if delimiter is None:
            raise QueryError("delimiter", "delimiter must be one of , ; | or a tab (\\t)")
        quote = given.get("quote", "minimal")
        if quote not in ("all", "minimal"):
            raise QueryError("quote", "quote must be all or minimal")
        null = given.get("null", "")
        self._check_null(null, delimiter)
        self.render = RenderOptions(
            delimiter=delimiter, null=null, quote_all=quote == "all", escape_formulas=excel
        )
        self.line_end = "\r\n" if self.crlf else "\n"
        self._header_pending = self.header
        self._in_quotes = False  # where COPY's output stands, for convert()
        # The same, for record_ends(), which reads the output before convert() does.
        self._header_unended = self.header
        self._ends_in_quotes = False

    @staticmethod
    def _check_null(null: str, delimiter: str) -> None:
        # PostgreSQL's own rules for COPY's NULL string, plus a length bound.
        if len(null) > MAX_NULL_LENGTH:
            raise QueryError("null", f"null may be at most {MAX_NULL_LENGTH} characters")
        if delimiter in null or '"' in null:
            raise QueryError("null", "null may not contain the delimiter or a double quote")
        if any(c in null for c in "\r\n\x00"):
            raise QueryError("null", "null may not contain a line break or a NUL character")

    def copy_options(self) -> dict[str, Any] | None:
        render = self.render
        if render.escape_formulas:
            return None
        options: dict[str, Any] = {"format": "csv", "header": self.header}
        if render.delimiter != ",":
            options["delimiter"] = render.delimiter
        if render.null:
            options["null"] = render.null
        if render.quote_all:
            options["force_quote"] = True
        return options

    def preamble(self) -> bytes:
        return BOM.encode() if self.bom else b""

    def convert(self, data: bytes) -> bytes:
        """COPY's output on its way out. With crlf, records end in CRLF: COPY ends them in
        LF, and any other line break is inside a quoted field (COPY quotes every value that
        holds one). So an LF is a record's end where the quotes before it, counted across
        chunks, are balanced."""
        if not self.crlf:
            return data
        lines = data.split(b"\n")
        quoted = self._in_quotes
        parts = []
        for line in lines[:-1]:
            if line.count(b'"') & 1:
                quoted = not quoted
            parts.append(line)
            parts.append(b"\n" if quoted else b"\r\n")
        if lines[-1].count(b'"') & 1:
            quoted = not quoted
        parts.append(lines[-1])
        self._in_quotes = quoted
        return b"".join(parts)

    def record_ends(self, data: bytes) -> list[int]:
        # A line break ends a record where the quotes before it, counted across chunks, are
        # balanced (COPY quotes every value holding a line break), as in convert().
        ends = []
        quoted = self._ends_in_quotes
        start = 0
        at = data.find(b"\n")
        while at >= 0:
            if data.count(b'"', start, at) & 1:
                quoted = not quoted
            if not quoted:
                if self._header_unended:
                    self._header_unended = False
                else:
                    ends.append(at + 1)
            start = at + 1
            at = data.find(b"\n", start)
        if data.count(b'"', start) & 1:
            quoted = not quoted
        self._ends_in_quotes = quoted
        return ends

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
        if self.bom:
            self.buffer.write(BOM)
        if self.header:
            names = [self.header_field(column.name) for column in self.columns]
            self.buffer.write(self.render.delimiter.join(names) + self.line_end)

    def header_field(self, name: str) -> str:
        """A column name as COPY's HEADER writes it (never force-quoted), escaped as a value
        would be under the Excel profile."""
        render = self.render
        if render.escape_formulas and needs_formula_escape(name):
            name = "'" + name
        if (
            name == render.null
            or any(c in name for c in (render.delimiter, '"', "\n", "\r"))
            or (len(self.columns) == 1 and name == "\\.")
        ):
            return '"' + name.replace('"', '""') + '"'
        return name

    def write_rows(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        self.buffer.write(self.line_end.join([row[0] for row in rows]))
        self.buffer.write(self.line_end)


# A spreadsheet reads a cell as a formula (or splits it) when it starts with one of these,
# also after leading whitespace (OWASP's list for CSV injection), and with their full-width
# forms (＝＋－＠), which East Asian input methods type and spreadsheets may take for them.
# source.FORMULA_PATTERN_SQL is the same rule for PostgreSQL.
FORMULA_STARTS = "=+-@\t\r\n\uff1d\uff0b\uff0d\uff20"
# Leading whitespace: every character Python's str.isspace() takes (ASCII's, NEL, the
# no-break spaces, the typographic spaces, the ideographic space, ...), and the zero-width
# space and the byte order mark, which show as nothing before the =.
LEADING_SPACE = "".join(
    sorted({*(chr(c) for c in range(0x3001) if chr(c).isspace()), "\u200b", "\ufeff"})
)


def needs_formula_escape(value: str) -> bool:
    for c in value:
        if c in FORMULA_STARTS:
            return True
        if c not in LEADING_SPACE:
            return False
    return False
