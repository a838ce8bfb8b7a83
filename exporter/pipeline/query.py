"""Request parameters -> a validated ExportQuery. Pure: no I/O, catalog identifiers only."""

import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from exporter.errors import InvalidParameter
from exporter.pipeline.catalog import Column, Dataset

RESERVED = frozenset({"select", "order", "limit", "since", "deletes"})
# Options of the export formats (the encoders judge them); like `select`, never filters.
FORMAT_OPTIONS = frozenset(
    {"header", "delimiter", "null", "bom", "quote", "crlf", "profile", "numbers"}
)
MAX_PARAMETERS = 200
MAX_VALUE_LENGTH = 10_000
# Far above PostgreSQL's 63-byte identifiers; a longer name is an error, and not echoed whole.
MAX_NAME_LENGTH = 1_000

Operator = Literal["eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "in", "is"]
COMPARISONS: dict[str, str] = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
}
IS_VALUES = frozenset({"null", "true", "false", "unknown"})

# re.ASCII: PostgreSQL's input functions know ASCII digits and C-locale spaces only.
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
# Unambiguous groups (integer part, fraction, exponent): no quadratic backtracking on a long
# run of digits that fails at its end.
_NUMERIC = re.compile(
    r"\s*[+-]?(?:([0-9]+)(?:\.([0-9]*))?|\.([0-9]+))(?:[eE]([+-]?[0-9]+))?\s*", re.ASCII
)
_SPECIAL_FLOAT = re.compile(r"\s*(?:[+-]?(?:inf|infinity)|nan)\s*", re.IGNORECASE | re.ASCII)
# uuid_in: 32 hex digits, a hyphen allowed after any group of four, braces both or neither.
_UUID = re.compile(
    r"(?:[0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4}|\{(?:[0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4}\}", re.ASCII
)
# boolin accepts these words and any unambiguous prefix of them (two letters for on/off).
_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")
_PG_SPACE = " \t\n\r\f\v"
_INTEGER_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
_FLOAT_FORMATS = {"float4": "<f", "float8": "<d"}
_NUMERIC_MAX_WHOLE_DIGITS = 131072
_NUMERIC_MAX_SCALE = 16383


class QueryError(InvalidParameter, ValueError):
    """A mistake in the request, naming the parameter that holds it (`reason` says what is
    wrong with it; str() is the reason alone)."""


@dataclass(frozen=True)
class Filter:
    column: Column
    operator: Operator
    negated: bool
    # A single value, a list for `in`, or one of IS_VALUES for `is`.
    value: str | tuple[str, ...]
    parameter: str


@dataclass(frozen=True)
class OrderTerm:
    column: Column
    descending: bool = False
    nulls: Literal["first", "last"] | None = None


@dataclass(frozen=True)
class VersionsSince:
    """Snapshot mode: row versions whose xmin is at most `max_age` transactions old (PostgreSQL's
    age(xmin)), i.e. written by a transaction at or after the cursor's oldest running one."""

    max_age: int


@dataclass(frozen=True)
class ChangesSince:
    """Tracked mode: the rows (and, with deletes, the tombstones) of the keys that the change
    table records for transactions the cursor's snapshot did not see."""

    relid: int
    # pg_snapshot text; None when the running transactions are unknown (a standby's cursor):
    # then every change from `oldest` on is read, and those below `xmax` may repeat.
    snapshot: str | None
    # The cursor's oldest possible writer: every change below it was seen (the index's range).
    oldest: int
    xmax: int
    key_columns: tuple[Column, ...]
    deletes: bool


@dataclass(frozen=True)
class ExportQuery:
    dataset: Dataset
    columns: tuple[Column, ...]
    filters: tuple[Filter, ...]
    order: tuple[OrderTerm, ...]
    limit: int | None
    # Format options as given (name -> value); the encoder validates them.
    options: tuple[tuple[str, str], ...] = ()
    # The cursor token of an incremental pull (since=), as given; and deletes=true.
    since: str | None = None
    deletes: bool = False
    # What the pull reads, once the cursor has been judged against the database.
    changes: VersionsSince | ChangesSince | None = None

    @property
    def filter_terms(self) -> tuple[str, ...]:
        """The filters, as a cursor is bound to them: a pull with other filters would miss the
        rows that match only the new ones."""
        return tuple(
            sorted(repr((f.column.name, f.operator, f.negated, f.value)) for f in self.filters)
        )


def parse_query(
    dataset: Dataset,
    params: Iterable[tuple[str, str]],
    *,
    reserved: frozenset[str] = RESERVED | FORMAT_OPTIONS,
    max_limit: int | None = None,
    max_in_items: int | None = None,
) -> ExportQuery:
    pairs = list(params)
    if len(pairs) > MAX_PARAMETERS:
        raise QueryError("query", f"too many query parameters (at most {MAX_PARAMETERS})")
    seen: dict[str, str] = {}
    filters: list[Filter] = []
    for name, value in pairs:
        if len(name) > MAX_NAME_LENGTH:
            raise QueryError(
                name[:100] + "...", f"parameter name longer than {MAX_NAME_LENGTH} characters"
            )
        if len(value) > MAX_VALUE_LENGTH:
            raise QueryError(name, f"value longer than {MAX_VALUE_LENGTH} characters")
        if name in reserved:
            if name in seen:
                raise QueryError(name, f"'{name}' given more than once")
            seen[name] = value
        else:
            filters.append(_parse_filter(dataset, name, value, max_in_items))

    columns = dataset.columns
    if "select" in seen:
        columns = tuple(
            _column(dataset, "select", n) for n in _split_list("select", seen["select"])
        )
        seen_names: set[str] = set()
        for column in columns:
            if column.name in seen_names:
                raise QueryError("select", f"column selected twice: {column.name}")
            seen_names.add(column.name)

    if "order" in seen:
        order = tuple(_parse_order_term(dataset, t) for t in _split_list("order", seen["order"]))
    else:
        order = tuple(OrderTerm(_column(dataset, "order", n)) for n in dataset.default_order)

    limit = _parse_limit(seen["limit"], max_limit) if "limit" in seen else None
    options = tuple((name, value) for name, value in seen.items() if name in FORMAT_OPTIONS)
    since = seen.get("since")
    deletes = _parse_deletes(seen["deletes"]) if "deletes" in seen else False
    if since is not None and limit is not None:
        # A pull hands on the next cursor, which stands for everything up to its snapshot:
        # rows held back by a limit would never come.
        raise QueryError("limit", "limit cannot be combined with since")
    # deletes=true without since: a scheduled pull's first, a whole export (which has no
    # deletion to report), so that one URL serves every pull; the pull's planner checks it.
    return ExportQuery(
        dataset, columns, tuple(filters), order, limit, options, since=since, deletes=deletes
    )


def _parse_deletes(text: str) -> bool:
    if text not in ("true", "false"):
        raise QueryError("deletes", "deletes is true or false")
    return text == "true"


def shown(text: str) -> str:
    """Client text as an error message quotes it: a 10,000-character name is not echoed whole
    (twice: in the detail and in invalid-params)."""
    return text if len(text) <= 100 else text[:100] + "..."


def _column(dataset: Dataset, parameter: str, name: str) -> Column:
    column = dataset.column(name)
    if column is None:
        raise QueryError(parameter, f"unknown column '{shown(name)}' in dataset '{dataset.name}'")
    return column


def _split_list(parameter: str, text: str) -> list[str]:
    """Split on commas outside double quotes; `"a,b"` names a column with a comma."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    # An item that was quoted may be empty: `in.("")` matches the empty string.
    was_quoted = False
    empty = False
    i = 0
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\" and i + 1 < len(text):
                i += 1
                current.append(text[i])
            elif char == '"':
                quoted = False
            else:
                current.append(char)
        elif char == '"':
            quoted = was_quoted = True
        elif char == ",":
            empty = empty or not (current or was_quoted)
            items.append("".join(current))
            current = []
            was_quoted = False
        else:
            current.append(char)
        i += 1
    if quoted:
        raise QueryError(parameter, "unterminated double quote")
    empty = empty or not (current or was_quoted)
    items.append("".join(current))
    if empty:
        raise QueryError(parameter, "empty item in list")
    return items


def _parse_order_term(dataset: Dataset, term: str) -> OrderTerm:
    parts = term.split(".")
    direction: str | None = None
    nulls: Literal["first", "last"] | None = None
    # Modifiers come last; what precedes them is the column name (which may contain dots).
    while len(parts) > 1 and parts[-1] in ("asc", "desc", "nullsfirst", "nullslast"):
        modifier = parts.pop()
        if modifier in ("asc", "desc"):
            if direction is not None:
                raise QueryError("order", f"two directions in order term '{shown(term)}'")
            direction = modifier
        else:
            if nulls is not None:
                raise QueryError("order", f"two nulls modifiers in order term '{shown(term)}'")
            nulls = "first" if modifier == "nullsfirst" else "last"
    column = _column(dataset, "order", ".".join(parts))
    if not column.orderable:
        raise QueryError("order", f"column '{column.name}' of type {column.type} has no order")
    return OrderTerm(column, direction == "desc", nulls)


def _parse_limit(text: str, max_limit: int | None) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise QueryError("limit", "limit must be a non-negative integer")
    limit = int(text)
    if max_limit is not None and limit > max_limit:
        raise QueryError("limit", f"limit may be at most {max_limit}")
    return limit


def _parse_filter(dataset: Dataset, name: str, expression: str, max_in_items: int | None) -> Filter:
    column = dataset.column(name)
    if column is None:
        raise QueryError(name, f"unknown column '{shown(name)}' (or unknown parameter)")
    operator, dot, value = expression.partition(".")
    negated = operator == "not"
    if negated:
        operator, dot, value = value.partition(".")
    if not dot:
        raise QueryError(name, "a filter reads column=operator.value, e.g. id=eq.42")
    if "\x00" in value:
        # PostgreSQL refuses NUL in every text it reads, whatever the type.
        raise QueryError(name, "a value may not contain a NUL character")
    if operator in COMPARISONS:
        _check_value(column, name, value)
        return Filter(column, operator, negated, value, name)  # type: ignore[arg-type]
    if operator in ("like", "ilike"):
        if _ends_in_escape(value):
            # PostgreSQL raises this only when a row's matching reaches the end of the
            # pattern: data-dependent, and after the first byte of an export if at all.
            raise QueryError(name, "a pattern may not end in an unescaped backslash")
        # PostgREST's `*` stands for `%`, which is awkward to write in a URL.
        return Filter(column, operator, negated, value.replace("*", "%"), name)  # type: ignore[arg-type]
    if operator == "in":
        values = _parse_in_list(name, value)
        if max_in_items is not None and len(values) > max_in_items:
            raise QueryError(
                name, f"in. takes at most {max_in_items} items (EXPORTER_MAX_IN_ITEMS)"
            )
        for item in values:
            _check_value(column, name, item)
        return Filter(column, "in", negated, values, name)
    if operator == "is":
        if value not in IS_VALUES:
            raise QueryError(name, "is. takes null, true, false or unknown")
        if value != "null" and column.base_type != "bool":
            raise QueryError(name, f"is.{value} needs a boolean column; '{name}' is {column.type}")
        return Filter(column, "is", negated, value, name)
    raise QueryError(name, f"unknown operator '{shown(operator)}'")


def _ends_in_escape(pattern: str) -> bool:
    """Whether LIKE's escape character (a backslash, which escapes whatever follows it) is
    the pattern's last character: an odd run of backslashes at its end."""
    return (len(pattern) - len(pattern.rstrip("\\"))) % 2 == 1


def _parse_in_list(parameter: str, text: str) -> tuple[str, ...]:
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise QueryError(parameter, "in. takes a parenthesised list: in.(a,b)")
    inner = text[1:-1]
    if inner == "":
        return ()
    return tuple(_split_list(parameter, inner))


def _check_value(column: Column, parameter: str, value: str) -> None:
    """Reject what PostgreSQL would reject, before the first byte, for the common types.

    Other types are cast by PostgreSQL itself; a value it refuses still fails before the
    first byte, with a less precise message.
    """
    base = column.base_type
    if base in _INTEGER_RANGES:
        valid = _valid_integer(value, _INTEGER_RANGES[base])
    elif base == "numeric":
        valid = _valid_numeric(value)
    elif base in _FLOAT_FORMATS:
        valid = _valid_float(value, _FLOAT_FORMATS[base])
    elif base == "bool":
        valid = _valid_boolean(value)
    elif base == "uuid":
        valid = _UUID.fullmatch(value) is not None
    else:
        return
    if not valid:
        raise QueryError(parameter, f"{shown(value)!r} is not a valid {column.type}")


def _valid_integer(value: str, bound: int) -> bool:
    if not _INTEGER.fullmatch(value):
        return False
    number = _bounded_int(value.strip(_PG_SPACE), 19)
    return number is not None and -bound <= number < bound


def _bounded_int(text: str, max_digits: int) -> int | None:
    """A signed ASCII integer of at most `max_digits` significant digits, else None (int()
    refuses strings of more than 4300 digits, leading zeros included)."""
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > max_digits:
        return None
    return -int(digits) if text.startswith("-") else int(digits)


def _valid_numeric(value: str) -> bool:
    if _SPECIAL_FLOAT.fullmatch(value):
        return True
    match = _NUMERIC.fullmatch(value)
    if match is None:
        return False
    whole, fraction, bare_fraction, exponent_text = match.groups()
    whole = whole or ""
    fraction = fraction or bare_fraction or ""
    exponent = _bounded_int(exponent_text or "0", 9)
    if exponent is None:
        return False
    # numeric's storage bounds: 131072 digits before the point, a display scale of 16383.
    digits = whole + fraction
    significant = digits.lstrip("0")
    if significant:
        weight = len(whole) - (len(digits) - len(significant)) + exponent
        if weight > _NUMERIC_MAX_WHOLE_DIGITS:
            return False
    return max(0, len(fraction) - exponent) <= _NUMERIC_MAX_SCALE


def _valid_float(value: str, pack_format: str) -> bool:
    if _SPECIAL_FLOAT.fullmatch(value):
        return True
    if not _NUMERIC.fullmatch(value):
        return False
    number = float(value)
    try:
        (rounded,) = struct.unpack(pack_format, struct.pack(pack_format, number))
    except OverflowError:
        return False
    if math.isinf(rounded):
        return False
    # An underflow to zero is an error in PostgreSQL, unlike a subnormal result.
    return rounded != 0.0 or not any(c in "123456789" for c in _mantissa(value))


def _mantissa(value: str) -> str:
    return value.lower().partition("e")[0]


def _valid_boolean(value: str) -> bool:
    word = value.strip(_PG_SPACE).lower()
    if not word.isascii() or word in ("o", ""):
        return False
    return any(candidate.startswith(word) for candidate in _BOOLEAN_WORDS)


def estimated_rows(query: ExportQuery) -> int | None:
    """The planner's count of the table's rows, for progress; None where filters or a cursor
    make it meaningless (a second query to estimate them would cost more than it tells)."""
    estimate = query.dataset.estimated_rows
    if estimate is None or query.filters or query.since is not None:
        return None
    return estimate if query.limit is None else min(estimate, query.limit)
