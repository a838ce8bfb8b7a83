"""Incremental pulls: what a cursor token stands for, and what a `since=` pull reads.

Snapshot mode (any table). A row version is new to a cursor unless the cursor's snapshot
certainly saw it. Below the snapshot's oldest running transaction, every transaction had ended,
so a version committed now whose xmin is below it was visible; from it on, the version is
returned. Comparing xmin with the snapshot itself (pg_visible_in_snapshot) would be wrong: a
version written in a savepoint or an exception block carries a subtransaction's id, which no
snapshot lists, and would pass for visible while its transaction was still open. Versions
between the oldest running transaction and the snapshot's xmax that the snapshot did not list
may have been visible (a top-level transaction that had ended) or not (a subtransaction of
one still running): PostgreSQL keeps no way to tell, so they are returned and counted
(X-Export-Possibly-Repeated). Transactions running in other databases of the cluster are left
out of "oldest running" (no subtransaction of theirs can write here), so that a session idle
in a transaction elsewhere does not widen the window. xmin is 32 bits and PostgreSQL's
age() compares it modulo 2^32 with the transaction's own stable reference, so a cursor is
honoured up to HORIZON transactions. On a standby, pg_current_snapshot() lists no running
transactions: the oldest running one is then taken to be xmin, and every id between it and
xmax is undecidable.

Tracked mode (exporter track). A trigger records each changed key with the top-level
transaction id (pg_current_xact_id(), the parent's id even inside a subtransaction). Whether
the cursor's snapshot saw a top-level id is exact, and the change rows this pull's snapshot
sees are exactly those committed before it: the keys changed in between are read by index,
and each is returned as its row now (or a tombstone). A cursor taken on a standby does not know
which transactions were running: its changes from xmin to xmax are returned, and those keys
counted as possibly repeated.
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from exporter.db.connection import Connection
from exporter.errors import ServiceUnavailable
from exporter.incremental.tokens import (
    MAX_TOKEN_LENGTH,
    Cursor,
    CursorExpired,
    CursorInvalid,
    Snapshot,
    decode,
    digest,
    encode,
)
from exporter.pipeline.catalog import Dataset
from exporter.pipeline.query import ChangesSince, ExportQuery, QueryError, VersionsSince
from exporter.pipeline.source import build_repeat_count, build_tracked_repeat_count

log = logging.getLogger(__name__)

# How many transactions a cursor may lag behind: xmin comparisons are modulo 2^32, and age()
# answers within +-2^31; a margin keeps the comparison exact however busy the server gets
# while a pull runs.
HORIZON = 2**31 - 2**28
# Kinds of relation whose rows are versions with an xmin.
VERSIONED_KINDS = frozenset({"r", "p", "m"})


@dataclass(frozen=True)
class Position:
    """Where an export reads: the cluster, the snapshot of its transaction, and the oldest
    transaction running at it that could write this database (see Cursor.oldest_writer)."""

    system_identifier: int
    timeline: int
    snapshot: Snapshot
    oldest_writer: int
    # digest(database oid, the relation's partitions and inheritance children)
    relation_digest: bytes


class CursorAhead(ServiceUnavailable):
    """The database has not reached the cursor's snapshot yet (a replica behind the server
    that issued it): a 503, to be retried."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            detail=f"{message} (a replica behind the server that issued it?); try again shortly",
            headers={"Retry-After": "5"},
        )


@dataclass(frozen=True)
class Tracking:
    since_xid: int
    pruned_xid: int | None
    key_columns: tuple[str, ...]


async def read_position(connection: Connection, relid: int) -> Position:
    """The export's position. Its transaction's snapshot was taken by an earlier statement,
    so pg_stat_activity below is read after it: an id that a backend of another database
    runs now ran there at the snapshot too (a backend never changes database). Transaction ids
    are the cluster's, and a transaction left open elsewhere would widen snapshot mode's window
    of possible repeats. An id not found (ended since, prepared, hidden from this role) is
    kept: that is safe."""
    row = await connection.fetchrow(
        "SELECT (pg_catalog.pg_control_system()).system_identifier,"
        " (pg_catalog.pg_control_checkpoint()).timeline_id,"
        " pg_catalog.pg_is_in_recovery() AS standby,"
        " pg_catalog.pg_current_snapshot()::text AS snapshot,"
        " (SELECT oid::bigint FROM pg_catalog.pg_database"
        "  WHERE datname = pg_catalog.current_database()) AS database,"
        " ARRAY(SELECT a.backend_xid::text FROM pg_catalog.pg_stat_activity AS a"
        "       WHERE a.backend_xid IS NOT NULL AND a.datid IS DISTINCT FROM"
        "           (SELECT oid FROM pg_catalog.pg_database"
        "            WHERE datname = pg_catalog.current_database())) AS elsewhere,"
        " ARRAY(WITH RECURSIVE below AS ("
        "           SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = $1::bigint::oid"
        "           UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i"
        "           JOIN below AS b ON i.inhparent = b.inhrelid)"
        "       SELECT inhrelid::bigint FROM below ORDER BY 1) AS below",
        relid,
    )
    assert row is not None  # a SELECT without FROM: one row
    parsed = Snapshot.parse(row["snapshot"])
    standby = bool(row["standby"])
    snapshot = Snapshot(parsed.xmin, parsed.xmax, parsed.running, complete=not standby)
    if standby:
        # The writers run on the primary; which of them ran is not known here.
        oldest_writer = snapshot.xmin
    else:
        elsewhere = {int(xid) for xid in row["elsewhere"]}
        # backend_xid is 32 bits: matched against the running ids modulo 2^32.
        writers = [xid for xid in snapshot.running if xid % 2**32 not in elsewhere]
        oldest_writer = min(writers, default=snapshot.xmax)
    return Position(
        int(row["system_identifier"]),
        int(row["timeline_id"]),
        snapshot,
        oldest_writer,
        digest(str(row["database"]), *map(str, row["below"])),
    )


def issues_cursors(dataset: Dataset, limit: int | None) -> bool:
    """Whether an export hands out a cursor: a table's, whole (a limit leaves rows out)."""
    return dataset.relkind in VERSIONED_KINDS and limit is None


def cursor_for(
    query: ExportQuery, position: Position, role: str | None, secret: bytes
) -> str | None:
    """The export's cursor; None if it would be longer than a request may carry back (some
    thousands of transactions running at the snapshot)."""
    dataset = query.dataset
    token = encode(
        Cursor(
            position.system_identifier,
            position.timeline,
            dataset.relid,
            digest(dataset.name),
            _filter_digest(query, role),
            _shape_digest(dataset, position),
            position.snapshot,
            position.oldest_writer,
        ),
        secret,
    )
    if len(token) > MAX_TOKEN_LENGTH:
        log.warning(
            "no cursor for this export: %d transactions were running",
            len(position.snapshot.running),
        )
        return None
    return token


def _filter_digest(query: ExportQuery, role: str | None) -> bytes:
    return digest(role or "", *query.filter_terms)


def _shape_digest(dataset: Dataset, position: Position) -> bytes:
    columns = [f"{c.name}:{c.type}" for c in dataset.columns]
    return digest(position.relation_digest.hex(), *columns)


DELETES_WITH_A_ROLE = (
    "deletes=true is not available to keys with a PostgreSQL role: a deleted row cannot be"
    " checked against the role's privileges and policies"
)


def untracked_deletes(dataset: Dataset) -> QueryError:
    return QueryError(
        "deletes", f"deletes=true needs a tracked table (exporter track {dataset.name})"
    )


class CursorsUnavailable(ServiceUnavailable):
    """The service's schema has no cursor secret (`exporter migrate` not run): a 503."""


def pull_cursor(
    query: ExportQuery, format: str, role: str | None, secret: bytes | None
) -> Cursor | None:
    """The cursor of a `since=` pull, checked against the request (400s); None for a whole
    export. Shared by direct exports, job submissions and job runs."""
    if query.deletes:
        # Checked on the first pull too (no since): the same URL must not fail only later.
        if format != "ndjson":
            # A deleted row has no CSV form that a reader could tell from a row.
            raise QueryError("deletes", "deletes=true needs NDJSON (a tombstone is a JSON line)")
        if role is not None:
            raise QueryError("deletes", DELETES_WITH_A_ROLE)
    if query.since is None:
        return None
    if secret is None:
        raise CursorsUnavailable("incremental pulls need `exporter migrate`")
    return read_cursor(query, role, secret)


def read_cursor(query: ExportQuery, role: str | None, secret: bytes) -> Cursor:
    """The `since=` token, checked against the request (400s); the database is not asked."""
    assert query.since is not None
    dataset = query.dataset
    if dataset.relkind not in VERSIONED_KINDS:
        raise QueryError("since", f"since= needs a table; {dataset.name!r} is a {dataset.kind}")
    try:
        cursor = decode(query.since, secret)
    except CursorInvalid as exc:
        raise QueryError("since", str(exc)) from None
    if cursor.name_digest != digest(dataset.name):
        raise QueryError("since", "this cursor belongs to another dataset")
    if cursor.filter_digest != _filter_digest(query, role):
        raise QueryError(
            "since",
            "this cursor was issued for other filters (or a key with another PostgreSQL role);"
            " pull with the filters of the export that issued it",
        )
    return cursor


async def plan_pull(
    connection: Connection,
    query: ExportQuery,
    cursor: Cursor,
    now: Position,
    role: str | None,
) -> tuple[VersionsSince | ChangesSince, int]:
    """What the pull reads, and how many of its rows the cursor's snapshot may have seen
    already (-1: to be counted, see source.build_repeat_count); CursorExpired when the
    cursor can no longer be honoured."""
    dataset = query.dataset
    then = cursor.snapshot
    if cursor.system_identifier != now.system_identifier:
        raise CursorExpired(
            "this cursor was issued by another PostgreSQL cluster (restored or replaced?)"
        )
    if cursor.timeline != now.timeline:
        raise CursorExpired(
            "the database has failed over or been recovered to a point in time since this"
            " cursor (a new PostgreSQL timeline)"
        )
    if cursor.relid != dataset.relid:
        raise CursorExpired(f"{dataset.name!r} has been dropped and created again since")
    if cursor.shape_digest != _shape_digest(dataset, now):
        raise CursorExpired(
            f"{dataset.name!r} has changed shape since this cursor (its columns, partitions or"
            " inheritance children), or the cursor is from another database"
        )
    if then.xmax > now.snapshot.xmax:
        raise CursorAhead("the database has not reached this cursor's snapshot yet")
    if now.snapshot.xmax - then.oldest_running > HORIZON:
        raise CursorExpired("this cursor is too many transactions old")
    tracking = None if role is not None else await _tracking(connection, dataset)
    if tracking is not None and then.saw_committed(tracking.since_xid):
        # Every pruned change is below pruned_xid and was written here; below the cursor's
        # oldest possible writer, each had ended, so the cursor's snapshot saw it.
        if tracking.pruned_xid is not None and tracking.pruned_xid > cursor.oldest_writer:
            raise CursorExpired("the changes since this cursor are past the change retention")
        key_columns = tuple(dataset.column(name) for name in tracking.key_columns)
        if any(column is None for column in key_columns):
            raise CursorExpired(f"{dataset.name!r} no longer has its tracked key columns")
        changes = ChangesSince(
            dataset.relid,
            str(then) if then.complete else None,
            cursor.oldest_writer,
            then.xmax,
            tuple(c for c in key_columns if c is not None),
            query.deletes,
        )
        # A standby's cursor: changes between its xmin and xmax may have been seen.
        return changes, 0 if then.complete or then.xmax - then.xmin <= 1 else -1
    if query.deletes:
        if role is not None:
            raise QueryError("deletes", DELETES_WITH_A_ROLE)
        if tracking is None:
            raise untracked_deletes(dataset)
        raise CursorExpired("this cursor is older than the table's change tracking")
    max_age = await connection.fetchval(
        "SELECT age($1::text::xid)", str(cursor.oldest_writer % 2**32)
    )
    return VersionsSince(int(max_age)), -1 if has_undecidable(cursor) else 0


async def check_tracked(connection: Connection, dataset: Dataset) -> None:
    """A first pull that asks for deletes (no since): the later ones will need the table
    tracked, so it does now (a QueryError otherwise)."""
    if dataset.relkind not in VERSIONED_KINDS or await _tracking(connection, dataset) is None:
        raise untracked_deletes(dataset)


async def _tracking(connection: Connection, dataset: Dataset) -> Tracking | None:
    # The change tables live in the service's schema of the exported database; a database
    # where the service was never migrated (state kept elsewhere) tracks nothing.
    if not await connection.fetchval(
        "SELECT to_regclass('exporter.tracked_tables') IS NOT NULL AS migrated"
    ):
        return None
    row = await connection.fetchrow(
        "SELECT since_xid::text, pruned_xid::text, key_columns"
        " FROM exporter.tracked_tables WHERE relid = $1::bigint::oid",
        dataset.relid,
    )
    if row is None:
        return None
    pruned = row["pruned_xid"]
    return Tracking(
        int(row["since_xid"]),
        int(pruned) if pruned is not None else None,
        tuple(row["key_columns"]),
    )


def has_undecidable(cursor: Cursor) -> bool:
    """Whether some transaction id between the cursor's oldest writer and its snapshot's xmax
    was not listed as running: a version with that xmin may or may not have been visible."""
    then, oldest = cursor.snapshot, cursor.oldest_writer
    listed = sum(1 for xid in then.running if xid > oldest)
    return then.xmax - oldest - 1 > listed


class IncrementalPull:
    """An export's part in incremental pulls, played inside its snapshot before it reads
    (pipeline.stream's Planner): a table's whole export hands out the cursor of its snapshot
    (`next_cursor`); with `since`, the export reads only what changed after that cursor.

    `limit` is the request's own, before any cap's look-ahead: a limited export leaves rows
    out, so it hands out no cursor.
    """

    def __init__(
        self, secret: bytes | None, since: Cursor | None, role: str | None, limit: int | None
    ) -> None:
        self.secret = secret
        self.since = since
        self.role = role
        self.limit = limit
        self.next_cursor: str | None = None
        self.mode: str | None = None  # "snapshot" or "tracked", for a pull
        self.possibly_repeated: int | None = None

    async def plan(self, connection: Connection, query: ExportQuery) -> ExportQuery:
        dataset = query.dataset
        if query.deletes and self.since is None:
            await check_tracked(connection, dataset)
        if self.secret is None or dataset.relkind not in VERSIONED_KINDS:
            return query
        position = await read_position(connection, dataset.relid)
        if self.since is not None:
            changes, repeated = await plan_pull(connection, query, self.since, position, self.role)
            query = dataclasses.replace(query, changes=changes)
            if repeated < 0:
                sql, args = _repeat_count(query, self.since)
                repeated = int(await connection.fetchval(sql, *args))
            self.possibly_repeated = repeated
            self.mode = "tracked" if isinstance(changes, ChangesSince) else "snapshot"
        if issues_cursors(dataset, self.limit):
            self.next_cursor = cursor_for(query, position, self.role, self.secret)
        return query

    def headers(self) -> dict[str, str]:
        """What an HTTP export tells of its pull, in response headers."""
        headers = {}
        if self.next_cursor is not None:
            headers["X-Export-Cursor"] = self.next_cursor
        if self.mode is not None:
            headers["X-Export-Cursor-Mode"] = self.mode
            headers["X-Export-Possibly-Repeated"] = str(self.possibly_repeated or 0)
        return headers


def _repeat_count(query: ExportQuery, since: Cursor) -> tuple[str, list[Any]]:
    if isinstance(query.changes, ChangesSince):
        return build_tracked_repeat_count(query)
    then = since.snapshot
    return build_repeat_count(query, since.oldest_writer, then.xmax, then.running)
