"""Tracked tables (exporter track / untrack) and the change table's retention.

Tracking installs statement-level triggers, over transition tables, that call a function made
for the table (exporter.track_<oid>): one INSERT into exporter.changes per statement, however
many rows it wrote, recording each changed key with pg_current_xact_id(), the top-level
transaction's id even inside a savepoint or an exception block. The function's SQL is static,
so PL/pgSQL plans it once per session. SECURITY DEFINER: writers need no privilege on the
service's schema. Keys are kept as jsonb, whose text forms of numbers, booleans, dates and times
do not depend on the writer's DateStyle or extra_float_digits.

Tracking begins with the transaction that installs the triggers: CREATE TRIGGER waits for every
transaction writing the table to end, so whatever a snapshot that saw the tracking transaction
committed did not see is in the change table.
"""

import asyncio
import logging
import secrets
from dataclasses import dataclass

import asyncpg

from exporter.db.connection import Connection
from exporter.db.pool import Pool, quote_ident, quote_literal
from exporter.incremental.pulls import read_position
from exporter.pipeline.catalog import Dataset
from exporter.settings import Settings

log = logging.getLogger(__name__)

# The key's text forms must read back as the same value whatever the writer's settings:
# jsonb keeps numbers, booleans, dates and times in fixed forms; floats (extra_float_digits),
# money (lc_monetary) and intervals (IntervalStyle) depend on the session, and arrays,
# composites and JSON do not come back from a jsonb string by a cast.
KEY_TYPES = frozenset(
    {"int2", "int4", "int8", "numeric", "text", "varchar", "bpchar", "uuid", "bool", "oid"}
    | {"date", "time", "timetz", "timestamp", "timestamptz", "bytea", "inet", "cidr"}
    | {"macaddr", "macaddr8"}
)
_TRIGGERS = {
    "insert": "AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows",
    "update": "AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows",
    "truncate": "BEFORE TRUNCATE ON {table}",
}
# Only one pruning at a time, across processes and replicas (the limits use other classes).
_PRUNE_LOCK = 0x45787055


class TrackingError(Exception):
    """What `exporter track` cannot do, in words for its user."""


@dataclass(frozen=True)
class Pruned:
    changes: int
    cutoff_xid: int | None


def _table(dataset: Dataset) -> str:
    return f"{quote_ident(dataset.schema)}.{quote_ident(dataset.relation)}"


def _trigger_name(event: str) -> str:
    return f"exporter_track_{event}"


def _function_name(dataset: Dataset) -> str:
    return f"exporter.track_{int(dataset.relid)}"


def _record_function(dataset: Dataset) -> str:
    """The table's trigger function. Identifiers come from the catalog, quoted."""
    relid = int(dataset.relid)
    keys = tuple(quote_ident(name) for name in dataset.primary_key)

    def key_of(alias: str) -> str:
        pairs = ", ".join(
            f"{quote_literal(name)}, {alias}.{key}"
            for name, key in zip(dataset.primary_key, keys, strict=True)
        )
        return f"jsonb_build_object({pairs})"

    def insert(op: str, source: str) -> str:
        return (
            "INSERT INTO exporter.changes (relid, xid, op, key)"
            f" SELECT {relid}, pg_current_xact_id(), '{op}', {key_of('r')} FROM {source}"
        )

    key_list = ", ".join(keys)
    changed_old_keys = (
        f"(SELECT {key_list} FROM old_rows EXCEPT SELECT {key_list} FROM new_rows) AS r"
    )
    # TRUNCATE names the table through TG_RELID, so that a renamed table records its own keys.
    # A column name's own % would be a format() directive: doubled, it is itself again.
    truncate = (
        "INSERT INTO exporter.changes (relid, xid, op, key)"
        " SELECT $1, pg_current_xact_id(), 'D', " + key_of("r").replace("%", "%%") + " FROM %s AS r"
    )
    # SET: the body is compiled with the settings it was written for, whatever the writer's
    # session says (a literal read with standard_conforming_strings off would end elsewhere).
    body = f"""
BEGIN
    IF TG_OP = 'INSERT' THEN
        {insert("I", "new_rows AS r")};
    ELSIF TG_OP = 'UPDATE' THEN
        -- The new keys, and the old ones the update changed. EXCEPT, not NOT EXISTS: the plan
        -- is kept for the session, and one made for a one-row update must not nest loops
        -- over a large one.
        {insert("U", "new_rows AS r")};
        {insert("U", changed_old_keys)};
    ELSIF TG_OP = 'DELETE' THEN
        {insert("D", "old_rows AS r")};
    ELSE
        -- TRUNCATE has no transition table: every row it removes is recorded as deleted
        -- (it holds an ACCESS EXCLUSIVE lock: nobody else writes meanwhile).
        EXECUTE format({quote_literal(truncate)}, TG_RELID::regclass) USING TG_RELID;
    END IF;
    RETURN NULL;
END
"""
    # The body's dollar quote: one no column name in it holds (a key named a$track$b).
    tag = "$track$"
    while tag in body:
        tag = f"$track_{secrets.token_hex(4)}$"
    return f"""
CREATE OR REPLACE FUNCTION {_function_name(dataset)}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS {tag}{body}{tag}"""


async def track(connection: Connection, dataset: Dataset) -> bool:
    """Track the dataset's table; False if it already was."""
    if dataset.relkind == "p":
        # Statement triggers fire for the table a statement names: writes made to a partition
        # directly would not be recorded.
        raise TrackingError(
            f"{dataset.name!r} is partitioned; tracking does not see writes made to partitions"
            " directly (snapshot mode pulls it)"
        )
    if dataset.relkind != "r":
        raise TrackingError(f"{dataset.name!r} is a {dataset.kind}; only tables can be tracked")
    if not dataset.primary_key:
        raise TrackingError(f"{dataset.name!r} has no primary key; tracking records keys")
    for name in dataset.primary_key:
        column = dataset.column(name)
        if column is None or column.base_type not in KEY_TYPES:
            kind = column.type if column is not None else "unknown"
            raise TrackingError(
                f"the key column {name!r} of {dataset.name!r} is {kind}, whose text form"
                " depends on session settings or cannot be read back; tracking needs keys"
                " of integer, numeric, text, uuid, date/time, boolean, bytea or network types"
            )
    async with connection.transaction():
        # CREATE TRIGGER waits for the table's writers, and every writer that comes after
        # waits for it: not for long.
        await connection.execute("SET LOCAL lock_timeout = '10s'")
        if await connection.fetchval(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits"
            " WHERE inhrelid = $1::bigint::oid OR inhparent = $1::bigint::oid)",
            dataset.relid,
        ):
            raise TrackingError(
                f"{dataset.name!r} has an inheritance parent or children; statements on one do"
                " not fire the other's triggers (snapshot mode pulls it)"
            )
        if await connection.fetchval("SELECT to_regclass('exporter.changes')") is None:
            raise TrackingError(
                "the exported database has no change table: run `exporter migrate` with"
                " EXPORTER_DATABASE_URL (tracking lives in the database it exports)"
            )
        tracked = await connection.fetchval(
            "SELECT true FROM exporter.tracked_tables WHERE relid = $1::bigint::oid",
            dataset.relid,
        )
        if tracked:
            return False
        await connection.execute(_record_function(dataset))
        # Only the triggers call it.
        await connection.execute(f"REVOKE ALL ON FUNCTION {_function_name(dataset)}() FROM PUBLIC")
        try:
            for event, clause in _TRIGGERS.items():
                await connection.execute(
                    f"CREATE TRIGGER {_trigger_name(event)}"
                    f" {clause.format(table=_table(dataset))}"
                    f" FOR EACH STATEMENT EXECUTE FUNCTION {_function_name(dataset)}()"
                )
                # Also with session_replication_role = replica, as logical replication's
                # apply workers and some restore tools write: their writes are changes too.
                await connection.execute(
                    f"ALTER TABLE {_table(dataset)} ENABLE ALWAYS TRIGGER {_trigger_name(event)}"
                )
        except asyncpg.exceptions.LockNotAvailableError:
            raise TrackingError(
                f"could not lock {dataset.name!r} within 10 s: a long transaction writes it;"
                " try again"
            ) from None
        await connection.execute(
            "INSERT INTO exporter.tracked_tables (relid, key_columns, since_xid)"
            " VALUES ($1::bigint::oid, $2, pg_current_xact_id())",
            dataset.relid,
            list(dataset.primary_key),
        )
    return True


async def untrack(connection: Connection, dataset: Dataset) -> bool:
    """Stop tracking the table and drop its changes; False if it was not tracked."""
    async with connection.transaction():
        if await connection.fetchval("SELECT to_regclass('exporter.changes')") is None:
            return False
        for event in _TRIGGERS:
            await connection.execute(
                f"DROP TRIGGER IF EXISTS {_trigger_name(event)} ON {_table(dataset)}"
            )
        await connection.execute(f"DROP FUNCTION IF EXISTS {_function_name(dataset)}()")
        status = await connection.execute(
            "DELETE FROM exporter.tracked_tables WHERE relid = $1::bigint::oid", dataset.relid
        )
        await connection.execute(
            "DELETE FROM exporter.changes WHERE relid = $1::bigint::oid", dataset.relid
        )
    return bool(status != "DELETE 0")


async def prune(connection: Connection, retention_s: float) -> Pruned | None:
    """Delete the changes of transactions that ended more than retention_s ago; None if
    another process is pruning.

    Transaction ids are not times: each run notes the oldest transaction still running that
    could write this database (xid_clock), and a later run deletes the changes of
    transactions below the id noted retention_s earlier, which all had ended by then.
    """
    async with connection.transaction():
        if await connection.fetchval("SELECT pg_is_in_recovery()"):
            # A standby: the primary's serve prunes, and the deletions replicate.
            return None
        if not await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PRUNE_LOCK):
            return None
        # The oldest transaction that may still write here: one left open in another
        # database must not hold back the pruning of this one.
        position = await read_position(connection, 0)
        await connection.execute(
            "INSERT INTO exporter.xid_clock (at, xid)"
            " VALUES (clock_timestamp(), $1::text::xid8) ON CONFLICT DO NOTHING",
            str(position.oldest_writer),
        )
        cutoff = await connection.fetchval(
            "SELECT max(xid)::text FROM exporter.xid_clock"
            " WHERE at <= clock_timestamp() - make_interval(secs => $1)",
            float(retention_s),
        )
        await _forget_dropped_tables(connection)
        if cutoff is None:
            return Pruned(0, None)
        deleted = 0
        for (relid,) in await connection.fetch("SELECT relid FROM exporter.tracked_tables"):
            status = await connection.execute(
                "DELETE FROM exporter.changes WHERE relid = $1 AND xid < $2::text::xid8",
                relid,
                cutoff,
            )
            deleted += int(status.rpartition(" ")[2])
        # A cursor whose snapshot's xmin is below the cutoff may need what was deleted: 410.
        await connection.execute(
            "UPDATE exporter.tracked_tables SET pruned_xid = $1::text::xid8"
            " WHERE pruned_xid IS NULL OR pruned_xid < $1::text::xid8",
            cutoff,
        )
        await connection.execute(
            "DELETE FROM exporter.xid_clock WHERE xid < $1::text::xid8", cutoff
        )
    return Pruned(deleted, int(cutoff))


async def _forget_dropped_tables(connection: Connection) -> None:
    """A dropped table takes its triggers with it, not its function, its changes or its row
    in tracked_tables."""
    gone = await connection.fetch(
        "DELETE FROM exporter.tracked_tables AS t"
        " WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class AS c WHERE c.oid = t.relid)"
        " RETURNING relid::bigint"
    )
    for (relid,) in gone:
        await connection.execute(
            "DELETE FROM exporter.changes WHERE relid = $1::bigint::oid", relid
        )
        await connection.execute(f"DROP FUNCTION IF EXISTS exporter.track_{int(relid)}()")


async def tracked_relids(pool: Pool) -> frozenset[int]:
    """The oids of the tracked tables of the exported database (none if never migrated)."""
    async with pool.connection() as connection:
        if await connection.fetchval("SELECT to_regclass('exporter.tracked_tables')") is None:
            return frozenset()
        rows = await connection.fetch("SELECT relid::bigint FROM exporter.tracked_tables")
    return frozenset(int(row[0]) for row in rows)


async def prune_changes_forever(pool: Pool, settings: Settings) -> None:
    """`serve`'s pruning: every prune_interval_s, in every process (one prunes at a time).
    Failures are logged, never fatal: a read-only replica or a database never migrated for
    tracking simply has nothing to prune here."""
    while True:
        await asyncio.sleep(settings.prune_interval_s)
        try:
            async with pool.connection() as connection:
                if await connection.fetchval("SELECT to_regclass('exporter.changes')") is None:
                    continue
                pruned = await prune(connection, settings.change_retention_s)
            if pruned is not None and pruned.changes:
                log.info("pruned %d recorded changes", pruned.changes)
        except Exception as exc:
            log.warning("could not prune recorded changes: %s", exc)
