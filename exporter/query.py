"""Request parameters -> a validated ExportQuery. Pure: no I/O, catalog identifiers only."""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from exporter.catalog import Column, Dataset

RESERVED = frozenset({"select", "order", "limit"})
MAX_PARAMETERS = 200
MAX_VALUE_LENGTH = 10_000

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

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_NUMERIC = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_SPECIAL_FLOAT = re.compile(r"\s*([+-]?(inf|infinity)|nan)\s*", re.IGNORECASE)
_UUID = re.compile(r"\{?([0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4}\}?")
_BOOLEANS = frozenset({"t", "true", "y", "yes", "on", "1", "f", "false", "n", "no", "off", "0"})
_INTEGER_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}


class QueryError(ValueError):
    """A mistake in the request, naming the parameter that holds it."""

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(detail)
        self.parameter = parameter
        self.detail = detail


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
class ExportQuery:
    dataset: Dataset
    columns: tuple[Column, ...]
    filters: tuple[Filter, ...]
    order: tuple[OrderTerm, ...]
    limit: int | None


def parse_query(
    dataset: Dataset,
    params: Iterable[tuple[str, str]],
    *,
    reserved: frozenset[str] = RESERVED,
    max_limit: int | None = None,
) -> ExportQuery:
    pairs = list(params)
    if len(pairs) > MAX_PARAMETERS:
        raise QueryError("query", f"too many query parameters (at most {MAX_PARAMETERS})")
    seen: dict[str, str] = {}
    filters: list[Filter] = []
    for name, value in pairs:
        if len(value) > MAX_VALUE_LENGTH:
            raise QueryError(name, f"value longer than {MAX_VALUE_LENGTH} characters")
        if name in reserved:
            if name in seen:
                raise QueryError(name, f"'{name}' given more than once")
            seen[name] = value
        else:
            filters.append(_parse_filter(dataset, name, value))

    columns = dataset.columns
    if "select" in seen:
        columns = tuple(
            _column(dataset, "select", n) for n in _split_list("select", seen["select"])
        )
        duplicates = {c.name for c in columns if columns.count(c) > 1}
        if duplicates:
            raise QueryError("select", f"column selected twice: {sorted(duplicates)[0]}")

    if "order" in seen:
        order = tuple(_parse_order_term(dataset, t) for t in _split_list("order", seen["order"]))
    else:
        order = tuple(OrderTerm(_column(dataset, "order", n)) for n in dataset.default_order)

    limit = _parse_limit(seen["limit"], max_limit) if "limit" in seen else None
    return ExportQuery(dataset, columns, tuple(filters), order, limit)


def _column(dataset: Dataset, parameter: str, name: str) -> Column:
    column = dataset.column(name)
    if column is None:
        raise QueryError(parameter, f"unknown column '{name}' in dataset '{dataset.name}'")
    return column


def _split_list(parameter: str, text: str) -> list[str]:
    """Split on commas outside double quotes; `"a,b"` names a column with a comma."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
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
            quoted = True
        elif char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    if quoted:
        raise QueryError(parameter, "unterminated double quote")
    items.append("".join(current))
    if any(item == "" for item in items):
        raise QueryError(parameter, "empty item in list")
    return items


def _parse_order_term(dataset: Dataset, term: str) -> OrderTerm:
    parts = term.split(".")
    descending = False
    nulls: Literal["first", "last"] | None = None
    # Modifiers come last; what precedes them is the column name (which may contain dots).
    while len(parts) > 1 and parts[-1] in ("asc", "desc", "nullsfirst", "nullslast"):
        modifier = parts.pop()
        if modifier in ("asc", "desc"):
            descending = modifier == "desc"
        else:
            nulls = "first" if modifier == "nullsfirst" else "last"
    column = _column(dataset, "order", ".".join(parts))
    if not column.orderable:
        raise QueryError("order", f"column '{column.name}' of type {column.type} has no order")
    return OrderTerm(column, descending, nulls)


def _parse_limit(text: str, max_limit: int | None) -> int:
    if not re.fullmatch(r"\d{1,18}", text):
        raise QueryError("limit", "limit must be a non-negative integer")
    limit = int(text)
    if max_limit is not None and limit > max_limit:
        raise QueryError("limit", f"limit may be at most {max_limit}")
    return limit


def _parse_filter(dataset: Dataset, name: str, expression: str) -> Filter:
    column = dataset.column(name)
    if column is None:
        raise QueryError(name, f"unknown column '{name}' (or unknown parameter)")
    operator, dot, value = expression.partition(".")
    negated = operator == "not"
    if negated:
        operator, dot, value = value.partition(".")
    if not dot:
        raise QueryError(name, "a filter reads column=operator.value, e.g. id=eq.42")
    if operator in COMPARISONS:
        _check_value(column, name, value)
        return Filter(column, operator, negated, value, name)  # type: ignore[arg-type]
    if operator in ("like", "ilike"):
        # PostgREST's `*` stands for `%`, which is awkward to write in a URL.
        return Filter(column, operator, negated, value.replace("*", "%"), name)  # type: ignore[arg-type]
    if operator == "in":
        values = _parse_in_list(name, value)
        for item in values:
            _check_value(column, name, item)
        return Filter(column, "in", negated, values, name)
    if operator == "is":
        if value not in IS_VALUES:
            raise QueryError(name, "is. takes null, true, false or unknown")
        if value != "null" and column.base_type != "bool":
            raise QueryError(name, f"is.{value} needs a boolean column; '{name}' is {column.type}")
        return Filter(column, "is", negated, value, name)
    raise QueryError(name, f"unknown operator '{operator}'")


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
        bound = _INTEGER_RANGES[base]
        if not _INTEGER.fullmatch(value) or not -bound <= int(value) < bound:
            raise QueryError(parameter, f"'{value}' is not a valid {column.type}")
    elif base == "numeric":
        if not (
            _NUMERIC.fullmatch(value) or value.strip().lower() in ("nan", "infinity", "-infinity")
        ):
            raise QueryError(parameter, f"'{value}' is not a valid {column.type}")
    elif base in ("float4", "float8"):
        if not (_NUMERIC.fullmatch(value) or _SPECIAL_FLOAT.fullmatch(value)):
            raise QueryError(parameter, f"'{value}' is not a valid {column.type}")
    elif base == "bool":
        if value.strip().lower() not in _BOOLEANS:
            raise QueryError(parameter, f"'{value}' is not a valid boolean")
    elif base == "uuid":
        if not _UUID.fullmatch(value.strip()):
            raise QueryError(parameter, f"'{value}' is not a valid uuid")
