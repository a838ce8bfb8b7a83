"""The only module that runs an export's SELECT: builds it from a validated query and reads it
through a server-side cursor, one batch at a time."""

from collections.abc import Sequence
from typing import Any

import asyncpg

from exporter.catalog import Column
from exporter.encoders import Rendering
from exporter.query import COMPARISONS, ExportQuery, Filter, QueryError

# Scalar types whose cast to text differs from their output function (what COPY writes):
# `true::text` is 'true' where COPY writes 't', char(n) casts drop padding, inet casts add
# the mask. concat() applies the output function.
_OUTPUT_FUNCTION_TYPES = frozenset({"bool", "bpchar", "inet", "cidr"})


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column_ref(column: Column) -> str:
    return "t." + quote_ident(column.name)


def _text_value(column: Column) -> str:
    ref = _column_ref(column)
    if column.base_type in _OUTPUT_FUNCTION_TYPES:
        return f"CASE WHEN {ref} IS NULL THEN NULL ELSE concat({ref}) END"
    return f"{ref}::text"


def build_sql(query: ExportQuery, rendering: Rendering) -> tuple[str, list[Any]]:
    """SQL text from catalog identifiers (quoted) and placeholders; values only as arguments."""
    dataset = query.dataset
    relation = f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)} AS t"
    if rendering is Rendering.TEXT_VALUES:
        select = ", ".join(_text_value(c) for c in query.columns) or "NULL"
        from_clause = relation
    else:
        # The lateral subquery names the object's keys and fixes their order.
        inner = ", ".join(f"{_column_ref(c)} AS {quote_ident(c.name)}" for c in query.columns)
        # r.*, not r: a column named "r" would make the bare name ambiguous.
        select = "row_to_json(r.*)::text"
        if any(c.base_type in ("json", "_json") for c in query.columns):
            # row_to_json embeds json values verbatim, with their line breaks; outside strings
            # (where JSON escapes them) a line break is mere whitespace, and NDJSON needs one
            # object per line.
            select = f"replace(replace({select}, E'\\n', ' '), E'\\r', ' ')"
        from_clause = f"{relation} CROSS JOIN LATERAL (SELECT {inner}) AS r"

    args: list[Any] = []
    conditions = [_condition(f, args) for f in query.filters]
    sql = f"SELECT {select} FROM {from_clause}"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if query.order:
        sql += " ORDER BY " + ", ".join(
            _column_ref(term.column)
            + (" DESC" if term.descending else " ASC")
            + (f" NULLS {term.nulls.upper()}" if term.nulls else "")
            for term in query.order
        )
    if query.limit is not None:
        args.append(query.limit)
        sql += f" LIMIT ${len(args)}::bigint"
    return sql, args


def _placeholder(args: list[Any], value: Any, cast: str) -> str:
    args.append(value)
    return f"${len(args)}::{cast}"


def _condition(f: Filter, args: list[Any]) -> str:
    ref = _column_ref(f.column)
    # Values travel as text and PostgreSQL casts them with the column's own input function,
    # so a numeric keeps every digit and a timestamp its zone.
    type_sql = f.column.type_sql
    if f.operator in COMPARISONS:
        value = _placeholder(args, f.value, "text")
        condition = f"{ref} {COMPARISONS[f.operator]} CAST({value} AS {type_sql})"
    elif f.operator in ("like", "ilike"):
        # Under the database's default collation: a column's nondeterministic (say,
        # case-insensitive) collation makes PostgreSQL before 18 refuse LIKE altogether.
        pattern = _placeholder(args, f.value, "text")
        condition = f'{ref}::text COLLATE "default" {f.operator.upper()} {pattern}'
    elif f.operator == "in":
        values = _placeholder(args, list(f.value), "text[]")
        condition = f"{ref} = ANY(CAST({values} AS {type_sql}[]))"
    else:  # is
        keyword = str(f.value).upper()
        return f"{ref} IS {'NOT ' if f.negated else ''}{keyword}"
    return f"NOT ({condition})" if f.negated else condition


def _value_check(f: Filter) -> tuple[str, Any] | None:
    """A statement that makes PostgreSQL parse a filter's value as the column's type, alone."""
    if f.operator in COMPARISONS:
        return f"SELECT CAST($1::text AS {f.column.type_sql})", f.value
    if f.operator == "in":
        return f"SELECT CAST($1::text[] AS {f.column.type_sql}[])", list(f.value)
    if f.operator in ("like", "ilike"):
        # A pattern ending in the escape character is an error of its own.
        return "SELECT '' LIKE $1::text", f.value
    return None


async def check_filter_values(connection: Any, query: ExportQuery) -> None:
    """Let PostgreSQL's input functions (and domain checks) judge each filter value on its own,
    so that a rejected value is a 400 naming its parameter, and a data error in the export's
    own query is known to be the data's fault, not the request's."""
    for f in query.filters:
        check = _value_check(f)
        if check is None:
            continue
        sql, value = check
        try:
            await connection.fetchval(sql, value)
        except (
            asyncpg.exceptions.DataError,
            asyncpg.exceptions.IntegrityConstraintViolationError,
        ) as exc:
            raise QueryError(f.parameter, f"PostgreSQL rejects the value: {exc}") from exc


class Source:
    """Reads an export's rows in batches from a cursor inside the caller's snapshot."""

    def __init__(self, connection: Any, sql: str, args: Sequence[Any], batch_rows: int) -> None:
        self.connection = connection
        self.sql = sql
        self.args = args
        self.batch_rows = batch_rows
        self._cursor: Any = None

    async def fetch(self) -> list[Any]:
        """The next batch; empty at the end. The first call declares the cursor, so whatever
        PostgreSQL rejects in the query fails there, before the response starts."""
        if self._cursor is None:
            self._cursor = await self.connection.cursor(self.sql, *self.args)
        batch: list[Any] = await self._cursor.fetch(self.batch_rows)
        return batch
