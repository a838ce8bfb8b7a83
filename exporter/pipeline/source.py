"""The only module that runs an export's SELECT: builds it from a validated query and reads it
as COPY (...) TO STDOUT, chunk by chunk, or through a server-side cursor, batch by batch."""

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg

from exporter.db.connection import Connection
from exporter.db.pool import quote_ident, quote_literal
from exporter.errors import ServiceUnavailable
from exporter.pipeline.catalog import Column
from exporter.pipeline.encoders import Rendering, RenderOptions
from exporter.pipeline.encoders.csv import FORMULA_STARTS, LEADING_SPACE
from exporter.pipeline.query import (
    COMPARISONS,
    ChangesSince,
    ExportQuery,
    Filter,
    QueryError,
    VersionsSince,
)

# Scalar types whose cast to text differs from their output function (what COPY writes):
# `true::text` is 'true' where COPY writes 't', char(n) casts drop padding, inet casts add
# the mask. concat() applies the output function.
_OUTPUT_FUNCTION_TYPES = frozenset({"bool", "bpchar", "inet", "cidr"})


def _column_ref(column: Column) -> str:
    return "t." + quote_ident(column.name)


def _text_in_c_collation(column: Column) -> str:
    return f'({_text_value(column)}) COLLATE "C"'


def _text_value(column: Column) -> str:
    ref = _column_ref(column)
    if column.base_type in _OUTPUT_FUNCTION_TYPES:
        return f"CASE WHEN {ref} IS NULL THEN NULL ELSE concat({ref}) END"
    return f"{ref}::text"


_DEFAULT_RENDER = RenderOptions()

# Types whose text is a number; a spreadsheet formula cannot hide in them, so the Excel
# profile leaves them alone (`-1.5` stays `-1.5`).
_NUMERIC_TYPES = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8", "money"})
# JSON numbers that JavaScript's doubles cannot hold exactly: strings with numbers=string.
_WIDE_NUMBER_TYPES = frozenset({"int8", "numeric"})


def _bracket(chars: str) -> str:
    # Each as a regex escape (\u3000): the SQL text stays ASCII, whatever the database's
    # encoding, and no character means anything special inside the brackets.
    return "".join(f"\\u{ord(c):04x}" for c in chars)


# The Excel profile's rule (encoders.csv.needs_formula_escape) in PostgreSQL's regex dialect:
# leading whitespace, then a character that starts a formula or splits a cell.
FORMULA_PATTERN_SQL = f"'^[{_bracket(LEADING_SPACE)}]*[{_bracket(FORMULA_STARTS)}]'"
# SQL literals (standard_conforming_strings is on in every snapshot).
_DELIMITER_SQL = {",": "','", ";": "';'", "|": "'|'", "\t": r"E'\t'"}
_QUOTE_SQL = "'\"'"
_LF_SQL = r"E'\n'"
_CR_SQL = r"E'\r'"
_END_MARKER_SQL = "'\\.'"
# Types whose text form is never empty and never holds a delimiter, a quote or a line break
# (with DateStyle ISO and IntervalStyle postgres, as every snapshot sets them); money is not
# one of them: "$1,234.56".
_PLAIN_TEXT_TYPES = frozenset(
    {"int2", "int4", "int8", "oid", "float4", "float8", "numeric", "bool", "uuid", "date"}
    | {"timestamp", "timestamptz", "time", "timetz", "interval", "inet", "cidr", "macaddr"}
    | {"macaddr8"}
)


def _json_value(column: Column, render: RenderOptions, ref: str | None = None) -> str:
    ref = ref or _column_ref(column)
    if column.base_type == "bytea":
        # Base64, without the line break encode() puts after every 76 characters.
        return rf"translate(encode({ref}, 'base64'), E'\n', '')"
    if render.numbers_as_strings:
        if column.base_type in _WIDE_NUMBER_TYPES:
            return f"{ref}::text"
        if column.base_type in ("_int8", "_numeric"):
            return f"{ref}::text[]"
    return ref


def _csv_line(
    columns: Sequence[Column], render: RenderOptions, parameters: "_Parameters", values: str
) -> str:
    """A CSV record as COPY (FORMAT csv) writes it, from the lateral text values `values`.v0,
    .v1, ...: NULL as the null string, unquoted; a value quoted (its quotes doubled) when it
    equals the null string, holds the delimiter, a quote, CR or LF, or is the end-of-data
    marker `\\.` alone in its record; with quote=all, every value but NULL quoted."""
    if not columns:
        return "''"
    null = parameters.add(render.null, "text")
    delimiter = _DELIMITER_SQL[render.delimiter]
    fields = []
    for i, column in enumerate(columns):
        value = f"{values}.v{i}"
        quoted = f"""'"' || replace({value}, '"', '""') || '"'"""
        if render.quote_all:
            field = f"CASE WHEN {value} IS NULL THEN {null} ELSE {quoted} END"
        elif column.base_type in _PLAIN_TEXT_TYPES:
            # Never empty, no delimiter, quote or line break (a formula escape adds none):
            # only a null string that the value equals can make it need quotes.
            if render.null:
                field = (
                    f"CASE WHEN {value} IS NULL THEN {null}"
                    f" WHEN {value} = {null} THEN {quoted} ELSE {value} END"
                )
            else:
                field = f"coalesce({value}, {null})"
        else:
            needles = dict.fromkeys((delimiter, _QUOTE_SQL, _LF_SQL, _CR_SQL))
            checks = [f"{value} = {null}"] + [f"strpos({value}, {n}) > 0" for n in needles]
            if len(columns) == 1:
                checks.append(f"{value} = {_END_MARKER_SQL}")
            field = (
                f"CASE WHEN {value} IS NULL THEN {null}"
                f" WHEN {' OR '.join(checks)} THEN {quoted}"
                f" ELSE {value} END"
            )
        fields.append(field)
    return f" || {delimiter} || ".join(fields)


def _formula_escaped(value: str, column: Column) -> str:
    """The Excel profile's escape: a leading ' where a spreadsheet would see a formula."""
    if column.base_type in _NUMERIC_TYPES:
        return value
    return f"CASE WHEN {value} ~ {FORMULA_PATTERN_SQL} THEN '''' || {value} ELSE {value} END"


class _Parameters:
    """Values of a query, each behind a placeholder. A COPY statement takes no bind parameters,
    so for COPY each value is bound to a transaction-local setting first, and the query reads it
    back with current_setting(): values never become SQL text either way. (COPY's own options
    are another matter: asyncpg writes them as quoted literals, the null string included,
    which standard_conforming_strings, set on by every snapshot, keeps literal.)

    current_setting() is only stable, so PostgreSQL would call it, and cast its text, for
    every row (63 µs a row for an in.() list of 1,799 integers, measured); a bound parameter
    is folded into a constant only in a custom plan (asyncpg's cached statements get generic
    ones after five runs), and a cast to a domain with a check is never folded. So every
    value is read in a scalar subquery of its own, an InitPlan, which PostgreSQL runs once
    per query."""

    def __init__(self, for_copy: bool) -> None:
        self.for_copy = for_copy
        self.values: list[Any] = []
        self.casts: list[str] = []

    def add(self, value: Any, cast: str, as_type: str | None = None) -> str:
        """A placeholder for `value`, bound as `cast` and, if given, read as `as_type` (the
        column's type: its own input function parses the text, so a numeric keeps every
        digit and a timestamp its zone)."""
        self.values.append(value)
        self.casts.append(cast)
        n = len(self.values)
        if not self.for_copy and as_type is None:
            # A parameter as it is costs nothing per row; bare, its value informs the plan
            # (a limit's, say).
            return f"${n}::{cast}"
        read = (
            f"CAST(current_setting('exporter.p{n}') AS {cast})"
            if self.for_copy
            else f"${n}::{cast}"
        )
        if as_type is not None:
            read = f"CAST({read} AS {as_type})"
        return f"(SELECT {read})"

    def settings_sql(self) -> str:
        """The statement that binds a COPY's values as settings (before the COPY)."""
        return "SELECT " + ", ".join(
            f"set_config('exporter.p{n}', ${n}::{cast}::text, true)"
            for n, cast in enumerate(self.casts, start=1)
        )


def build_sql(
    query: ExportQuery, rendering: Rendering, render: RenderOptions = _DEFAULT_RENDER
) -> tuple[str, list[Any]]:
    """SQL text from catalog identifiers (quoted) and placeholders; values only as arguments."""
    parameters = _Parameters(for_copy=False)
    return _build(query, rendering, render, parameters), parameters.values


def build_copy(
    query: ExportQuery, rendering: Rendering, render: RenderOptions = _DEFAULT_RENDER
) -> tuple[str, str | None, list[Any]]:
    """The SELECT for COPY, the statement that binds its values (None: no values) and them."""
    parameters = _Parameters(for_copy=True)
    if rendering is Rendering.CSV_LINE:
        # COPY writes each value's text form itself, with the output function.
        rendering = Rendering.COLUMNS
    sql = _build(query, rendering, render, parameters)
    return sql, parameters.settings_sql() if parameters.values else None, parameters.values


def _build(
    query: ExportQuery, rendering: Rendering, render: RenderOptions, parameters: _Parameters
) -> str:
    dataset = query.dataset
    relation = f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)} AS t"
    changes = query.changes
    if rendering is Rendering.COLUMNS:
        # COPY renders every value with its output function and names the header's columns.
        select = ", ".join(f"{_column_ref(c)} AS {quote_ident(c.name)}" for c in query.columns)
        from_clause = relation
    elif rendering is Rendering.CSV_LINE:
        # A lateral subquery renders each value once (the record names each several times);
        # OFFSET 0 keeps PostgreSQL from folding its expressions into the record's. Measured
        # on the benchmark table: one such subquery is cheaper than repeating the casts, and
        # a second one (for the formula escape) costs more than repeating the escape's.
        # COLLATE "C": the checks compare bytes, as COPY does, and a column's nondeterministic
        # collation would make PostgreSQL refuse strpos() and regular expressions.
        texts = ", ".join(
            (
                _formula_escaped(_text_in_c_collation(c), c)
                if render.escape_formulas
                else _text_in_c_collation(c)
            )
            + f" AS v{i}"
            for i, c in enumerate(query.columns)
        )
        from_clause = f"{relation} CROSS JOIN LATERAL (SELECT {texts or 'NULL'} OFFSET 0) AS v"
        select = _csv_line(query.columns, render, parameters, "v")
    else:
        # The lateral subquery names the object's keys and fixes their order.
        inner = ", ".join(
            f"{_json_value(c, render)} AS {quote_ident(c.name)}" for c in query.columns
        )
        # r.*, not r: a column named "r" would make the bare name ambiguous.
        select = "row_to_json(r.*)::text"
        if any(c.base_type in ("json", "_json") for c in query.columns):
            # row_to_json embeds json values verbatim, with their line breaks; outside strings
            # (where JSON escapes them) a line break is mere whitespace, and NDJSON needs one
            # object per line.
            select = f"replace(replace({select}, E'\\n', ' '), E'\\r', ' ')"
        from_clause = f"{relation} CROSS JOIN LATERAL (SELECT {inner}) AS r"

    conditions = [_condition(f, parameters) for f in query.filters]
    if isinstance(changes, VersionsSince):
        conditions.append(_new_version(changes, parameters))
    elif isinstance(changes, ChangesSince):
        keys = ", ".join(_column_ref(k) for k in changes.key_columns)
        conditions.append(f"({keys}) IN ({_changed_keys(changes, parameters)})")
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
        sql += f" LIMIT {parameters.add(query.limit, 'bigint')}"
    if isinstance(changes, ChangesSince) and changes.deletes:
        # Rows first, in their order; then the changed keys that have no row matching the
        # filters (deleted, or changed so as to leave them), which the job deletes.
        sql = f"({sql}) UNION ALL ({_tombstones(query, changes, render, parameters)})"
    return sql


def _new_version(changes: VersionsSince, parameters: _Parameters) -> str:
    """Snapshot mode (exporter.incremental.pulls): written at or after the cursor's oldest possible
    writer. age() is a signed 32-bit difference: a row last written more than 2^31
    transactions ago (frozen, its original xmin kept) has a negative age, and is old, not new.
    age() of FrozenTransactionId is the largest integer: old too."""
    max_age = parameters.add(str(changes.max_age), "text", "integer")
    return f"age(t.xmin) BETWEEN 0 AND {max_age}"


def _key_value(column: Column) -> str:
    """A tracked key column's value, as the change table keeps it (jsonb), in its own type."""
    return f"CAST(c.key ->> {_string_literal(column.name)} AS {column.type_sql})"


def _string_literal(text: str) -> str:
    return quote_literal(text)


def _change_window(changes: ChangesSince, parameters: _Parameters) -> str:
    """The change rows of transactions the cursor's snapshot did not see (this snapshot sees
    only those committed before it): by index, from the cursor's oldest possible writer; where
    the cursor knows which transactions were running, exactly."""
    relid = parameters.add(str(changes.relid), "text", "oid")
    oldest = parameters.add(str(changes.oldest), "text", "xid8")
    window = f"c.relid = {relid} AND c.xid >= {oldest}"
    if changes.snapshot is not None:
        snapshot = parameters.add(changes.snapshot, "text", "pg_snapshot")
        window += f" AND NOT pg_visible_in_snapshot(c.xid, {snapshot})"
    return window


def _changed_keys(changes: ChangesSince, parameters: _Parameters) -> str:
    """The changed keys, in their columns' types: compared as values, not as the jsonb text
    the writer's session made (its TimeZone, its bytea_output)."""
    keys = ", ".join(f"{_key_value(k)} AS {quote_ident(k.name)}" for k in changes.key_columns)
    return f"SELECT {keys} FROM exporter.changes AS c WHERE {_change_window(changes, parameters)}"


def _missing_row(query: ExportQuery, keys: Sequence[Column], parameters: _Parameters) -> str:
    """No row of the table has key `c2` and matches the filters."""
    dataset = query.dataset
    relation = f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)} AS t"
    conditions = [f"{_column_ref(k)} = c2.{quote_ident(k.name)}" for k in keys]
    conditions += [_condition(f, parameters) for f in query.filters]
    return f"NOT EXISTS (SELECT FROM {relation} WHERE {' AND '.join(conditions)})"


def _tombstones(
    query: ExportQuery, changes: ChangesSince, render: RenderOptions, parameters: _Parameters
) -> str:
    """An NDJSON line {"_deleted": {<key columns>}} per changed key without a row, its values
    rendered as a row's would be."""
    keys = changes.key_columns
    values = ", ".join(
        f"{_json_value(k, render, 'c2.' + quote_ident(k.name))} AS {quote_ident(k.name)}"
        for k in keys
    )
    return (
        """SELECT '{"_deleted":' || row_to_json(k.*)::text || '}' FROM ("""
        f"SELECT DISTINCT {values} FROM ({_changed_keys(changes, parameters)}) AS c2"
        f" WHERE {_missing_row(query, keys, parameters)}) AS k"
    )


def build_tracked_repeat_count(query: ExportQuery) -> tuple[str, list[Any]]:
    """Tracked mode, a standby's cursor: how many rows (and tombstones) of the pull come from
    keys whose every change lies between the cursor's xmin and xmax, which it may have seen."""
    changes = query.changes
    assert isinstance(changes, ChangesSince)
    parameters = _Parameters(for_copy=False)
    dataset = query.dataset
    relation = f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)} AS t"
    keys = changes.key_columns
    names = ", ".join(quote_ident(k.name) for k in keys)
    typed = ", ".join(f"{_key_value(k)} AS {quote_ident(k.name)}" for k in keys)
    oldest = parameters.add(str(changes.oldest), "text", "xid8")
    xmax = parameters.add(str(changes.xmax), "text", "xid8")
    undecided = (
        f"SELECT {typed} FROM exporter.changes AS c WHERE {_change_window(changes, parameters)}"
        f" GROUP BY {', '.join(str(i) for i in range(1, len(keys) + 1))}"
        f" HAVING bool_and(c.xid > {oldest} AND c.xid < {xmax})"
    )
    conditions = [_condition(f, parameters) for f in query.filters]
    conditions.append(
        f"({', '.join(_column_ref(k) for k in keys)}) IN (SELECT {names} FROM ({undecided}) AS u)"
    )
    sql = f"SELECT (SELECT count(*) FROM {relation} WHERE {' AND '.join(conditions)})"
    if changes.deletes:
        sql += (
            f" + (SELECT count(*) FROM ({undecided}) AS c2"
            f" WHERE {_missing_row(query, keys, parameters)})"
        )
    return sql, parameters.values


def build_repeat_count(
    query: ExportQuery, oldest_running: int, xmax: int, running: Sequence[int]
) -> tuple[str, list[Any]]:
    """Snapshot mode: how many rows of the pull have an xmin among the cursor snapshot's
    undecidable transactions (above its oldest running one, below its xmax, not running)."""
    assert isinstance(query.changes, VersionsSince)
    parameters = _Parameters(for_copy=False)
    dataset = query.dataset
    relation = f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)} AS t"
    conditions = [_condition(f, parameters) for f in query.filters]
    newest = parameters.add(str(xmax % 2**32), "text", "xid")
    oldest = parameters.add(str(oldest_running % 2**32), "text", "xid")
    listed = parameters.add([str(x % 2**32) for x in running], "text[]", "xid[]")
    conditions += [
        f"age(t.xmin) < age({oldest})",
        f"age(t.xmin) > age({newest})",
        f"t.xmin NOT IN (SELECT unnest({listed}))",
    ]
    return f"SELECT count(*) FROM {relation} WHERE {' AND '.join(conditions)}", parameters.values


def _condition(f: Filter, parameters: _Parameters) -> str:
    ref = _column_ref(f.column)
    # Values travel as text and PostgreSQL casts them with the column's own input function,
    # so a numeric keeps every digit and a timestamp its zone.
    type_sql = f.column.type_sql
    if f.operator in COMPARISONS:
        value = parameters.add(f.value, "text", type_sql)
        condition = f"{ref} {COMPARISONS[f.operator]} {value}"
    elif f.operator in ("like", "ilike"):
        # Under the database's default collation: a column's nondeterministic (say,
        # case-insensitive) collation makes PostgreSQL before 18 refuse LIKE altogether.
        pattern = parameters.add(f.value, "text")
        condition = f'{ref}::text COLLATE "default" {f.operator.upper()} {pattern}'
    elif f.operator == "in":
        # A set to look each row up in, not = ANY(array): PostgreSQL hashes an array only
        # when it is a constant, and a list read once (an InitPlan) is not one; compared
        # item by item, 1,799 integers cost 27 µs a row. The subquery's rows become a hash
        # (or a join), built once. NULLs and negation behave as with = ANY.
        values = parameters.add(list(f.value), "text[]", f"{type_sql}[]")
        condition = f"{ref} IN (SELECT unnest({values}))"
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
    return None


# What casting a value alone raises when the value is at fault. Not only data exceptions (22)
# and domain checks (23): input functions of other types raise a syntax error (42601: tsquery,
# tsvector), an unknown object (42P01, 42704, 42883: regclass, regrole, regprocedure), a
# program limit (54000: an array of more than six dimensions) or a feature not supported
# (0A000: record); a column whose type takes no input fails to cast at all (42846). All of
# them were 500s. A privilege the key's role lacks (42501) stays what it is: a 403.
_VALUE_ERRORS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.SyntaxOrAccessError,
    asyncpg.exceptions.ProgramLimitExceededError,
    asyncpg.exceptions.FeatureNotSupportedError,
)


async def check_filter_values(connection: Connection, query: ExportQuery) -> None:
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
        except asyncpg.exceptions.InsufficientPrivilegeError:
            raise
        except _VALUE_ERRORS as exc:
            raise QueryError(f.parameter, f"PostgreSQL rejects the value: {exc}") from exc


class Source:
    """Reads an export's rows in batches from a cursor inside the caller's snapshot."""

    def __init__(
        self, connection: Connection, sql: str, args: Sequence[Any], batch_rows: int
    ) -> None:
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


class CopyTimeout(ServiceUnavailable, TimeoutError):
    """PostgreSQL took longer than statement_timeout to send the next block of a COPY."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            detail="the query timed out before its first rows",
            headers={"Retry-After": "30"},
        )


class CopySource:
    """Runs the export as COPY (...) TO STDOUT and hands its output on in chunks.

    asyncpg delivers COPY data to a callback; a task runs the COPY, and at most two chunks
    wait between it and the reader: while the callback waits, asyncpg reads no more from
    PostgreSQL, so memory stays bounded and a slow client slows PostgreSQL down.

    A COPY is one statement, so the transaction's statement_timeout would bound the whole
    export; it is lifted for the COPY and applied here instead, as for a cursor's fetches: to
    each wait for PostgreSQL's next block. And since a COPY blocked on a stalled client is
    not idle in PostgreSQL's eyes, idle_in_transaction_session_timeout is applied here too:
    a block that no reader takes within it ends the COPY and the transaction (and with it
    the snapshot); the reader then fails.
    """

    def __init__(
        self,
        connection: Connection,
        sql: str,
        settings_sql: str | None,
        args: Sequence[Any],
        options: dict[str, Any],
        *,
        chunk_bytes: int,
        statement_timeout_s: float | None,
        idle_timeout_s: float | None,
    ) -> None:
        self.connection = connection
        self.sql = sql
        self.settings_sql = settings_sql
        self.args = args
        self.options = options
        self.chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        self.statement_timeout_s = statement_timeout_s
        self.idle_timeout_s = idle_timeout_s
        # Unbounded, but data blocks need one of two places; the end marker never waits.
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._places = asyncio.Semaphore(2)
        self._task: asyncio.Task[None] | None = None
        self.rows: int | None = None  # once the COPY has completed

    async def start(self) -> None:
        await self.connection.execute("SET LOCAL statement_timeout = 0")
        if self.settings_sql is not None:
            await self.connection.fetchval(self.settings_sql, *self.args)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            status = await self.connection.copy_from_query(
                self.sql, output=self._put, **self.options
            )
            # "COPY <rows>": the exact count, whatever the data holds.
            self.rows = int(str(status).rpartition(" ")[2])
            if self._buffer:
                self._queue.put_nowait(bytes(self._buffer))
                self._buffer.clear()
        except TimeoutError as exc:
            # Nobody read for idle_timeout_s: give up the snapshot now, not when the client
            # finally reads or leaves.
            with contextlib.suppress(Exception):
                await self.connection.execute("ROLLBACK")
            self._queue.put_nowait(exc)
            return
        except Exception as exc:
            self._queue.put_nowait(exc)
            return
        self._queue.put_nowait(None)

    async def _put(self, data: bytes | bytearray) -> None:
        # COPY's blocks (a few KiB to a few hundred) are regrouped into chunks of chunk_bytes
        # in one reused buffer: two copies of the data in all.
        self._buffer += data
        while len(self._buffer) >= self.chunk_bytes:
            if self.idle_timeout_s is None:
                await self._places.acquire()
            else:
                async with asyncio.timeout(self.idle_timeout_s):
                    await self._places.acquire()
            with memoryview(self._buffer) as view:
                chunk = bytes(view[: self.chunk_bytes])
            del self._buffer[: self.chunk_bytes]
            self._queue.put_nowait(chunk)

    async def read(self) -> bytes | None:
        """The next chunk of output; None at the end."""
        try:
            async with asyncio.timeout(self.statement_timeout_s):
                item = await self._queue.get()
        except TimeoutError:
            raise CopyTimeout(
                f"no data from PostgreSQL within {self.statement_timeout_s} s (statement_timeout)"
            ) from None
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            self._places.release()
        return item

    async def stop(self, timeout_s: float) -> None:
        """End the COPY if it still runs, and wait until it has let go of the connection, so
        that the connection never goes back to the pool with the COPY still on it.

        A COPY still running is closed and cancelled at once, before it runs again. Closed:
        its connection reads no more blocks, for asyncpg takes the first block that arrives
        after a cancel request for the cancel's answer, and each later one, with no
        statement left to take it, kills the connection with a traceback ("Fatal error on
        transport ... 'NoneType' object has no attribute 'cancelled'", MagicStack/asyncpg
        #240). Cancelled: the task stops waiting at once, on PostgreSQL or on the reader
        (_put), and asyncpg sends PostgreSQL a cancel request, which stops a backend that has
        not written anything yet. The pool opens a new connection when one is next needed."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            self.connection.terminate()
            task.cancel()
            await asyncio.wait({task}, timeout=timeout_s)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: how the COPY ended is the reader's business
