"""Incremental pulls (since=), through the real server: cursors, both modes, and every way a
cursor is refused. The invariant under concurrent writers is tests/test_incremental_invariant.py.
"""

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest

from exporter.db.connection import Connection
from exporter.incremental.pulls import HORIZON, CursorAhead, Position, cursor_for, plan_pull
from exporter.incremental.tokens import (
    CursorExpired,
    Snapshot,
    decode,
    digest,
)
from tests.support.app import in_process_app
from tests.support.database import ExportDatabase, new_key, run_sql
from tests.support.server import Server


def _dsn(url: str) -> str:
    return "postgresql://" + url.partition("://")[2]


def exporter_cli(database: ExportDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env={"EXPORTER_DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def table(database: ExportDatabase) -> Iterator[str]:
    name = f"inc_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url,
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, v text NOT NULL)",
        f"INSERT INTO {name} SELECT g, 'v' || g FROM generate_series(1, 5) g",
    )
    yield name
    run_sql(database.url, f"DROP TABLE IF EXISTS {name}")


def tracked(database: ExportDatabase, name: str) -> None:
    result = exporter_cli(database, "track", name)
    assert result.returncode == 0, result.stderr
    assert f"tracking {name}" in result.stdout


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def full(client: httpx.Client, name: str, **params: str) -> tuple[list[dict[str, Any]], str]:
    response = client.get(f"/datasets/{name}.ndjson", params=params)
    return lines(response), response.headers["x-export-cursor"]


def pull(
    client: httpx.Client, name: str, cursor: str, **params: str
) -> tuple[list[dict[str, Any]], httpx.Response]:
    response = client.get(f"/datasets/{name}.ndjson", params={"since": cursor, **params})
    return lines(response), response


def refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert words in response.json()["detail"], response.json()


# --- which exports hand out cursors ------------------------------------------------------------


def test_a_table_export_carries_a_cursor_a_view_or_a_limited_one_does_not(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    run_sql(database.url, f"CREATE VIEW {table}_v AS SELECT * FROM {table}")
    try:
        for extension in ("csv", "ndjson"):
            response = client.get(f"/datasets/{table}.{extension}")
            assert response.status_code == 200
            assert response.headers["x-export-cursor"]
            assert "x-export-cursor-mode" not in response.headers
        assert "x-export-cursor" not in client.get(f"/datasets/{table}_v.csv").headers
        assert "x-export-cursor" not in client.get(f"/datasets/{table}.csv?limit=2").headers
        _, cursor = full(client, table)
        refused(
            client.get(f"/datasets/{table}_v.ndjson", params={"since": cursor}),
            400,
            "needs a table",
        )
    finally:
        run_sql(database.url, f"DROP VIEW {table}_v")


# --- snapshot mode -----------------------------------------------------------------------------


def test_snapshot_mode_returns_new_versions_once_and_keeps_the_filters(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    rows, cursor = full(client, table, v="like.v*")
    assert len(rows) == 5
    run_sql(
        database.url,
        f"UPDATE {table} SET v = 'v-two' WHERE id = 2",
        f"INSERT INTO {table} VALUES (6, 'v6'), (7, 'other')",
        f"DELETE FROM {table} WHERE id = 3",
    )
    changed, response = pull(client, table, cursor, v="like.v*")
    assert response.headers["x-export-cursor-mode"] == "snapshot"
    assert response.headers["x-export-possibly-repeated"] == "0"
    assert changed == [{"id": 2, "v": "v-two"}, {"id": 6, "v": "v6"}]
    # Retried with the same cursor: the same rows, plus newer ones.
    run_sql(database.url, f"INSERT INTO {table} VALUES (8, 'v8')")
    again, _ = pull(client, table, cursor, v="like.v*")
    assert again == changed + [{"id": 8, "v": "v8"}]
    # The next cursor: only what came after it.
    nothing, _ = pull(client, table, response.headers["x-export-cursor"], v="like.v*")
    assert nothing == [{"id": 8, "v": "v8"}]
    # Other filters than the cursor's would miss rows that only they match.
    refused(client.get(f"/datasets/{table}.ndjson", params={"since": cursor}), 400, "filters")
    # CSV pulls too.
    csv_pull = client.get(f"/datasets/{table}.csv", params={"since": cursor, "v": "like.v*"})
    assert csv_pull.text.splitlines() == ["id,v", "2,v-two", "6,v6", "8,v8"]


def test_snapshot_mode_never_misses_a_savepoint_write_and_counts_what_may_repeat(
    server: Server, database: ExportDatabase, table: str
) -> None:
    """The trap of the issue: transaction A inserts a row, then another inside a savepoint,
    and stays open; B commits; the cursor's snapshot is taken; A commits. The savepoint row's
    xmin is a subtransaction id that no snapshot lists."""

    async def scenario() -> None:
        a = await asyncpg.connect(_dsn(database.url))
        b = await asyncpg.connect(_dsn(database.url))
        try:
            await a.execute("BEGIN")
            await a.execute(f"INSERT INTO {table} VALUES (100, 'a')")
            await a.execute("SAVEPOINT s")
            await a.execute(f"INSERT INTO {table} VALUES (101, 'a in savepoint')")
            await a.execute("RELEASE SAVEPOINT s")
            await b.execute(f"INSERT INTO {table} VALUES (200, 'b')")
            async with httpx.AsyncClient(
                base_url=server.base_url, headers={"Authorization": f"Bearer {database.key}"}
            ) as client:
                first = await client.get(f"/datasets/{table}.ndjson")
                seen = {row["id"] for row in map(json.loads, first.text.splitlines())}
                assert 200 in seen and 100 not in seen and 101 not in seen
                await a.execute("COMMIT")
                response = await client.get(
                    f"/datasets/{table}.ndjson",
                    params={"since": first.headers["x-export-cursor"]},
                )
            ids = [row["id"] for row in map(json.loads, response.text.splitlines())]
            # Never missed: both of A's rows. B's row may come again (its transaction ended
            # while A, open at the cursor, ran), and so may the savepoint's row: both are
            # counted; A's own first row is certainly new.
            assert sorted(ids) == [100, 101, 200]
            assert response.headers["x-export-possibly-repeated"] == "2"
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


# --- tracked mode ------------------------------------------------------------------------------


def test_tracked_mode_is_exact_savepoints_exception_blocks_and_deletes_included(
    server: Server, client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    tracked(database, table)

    async def scenario() -> tuple[list[int], httpx.Response]:
        a = await asyncpg.connect(_dsn(database.url))
        b = await asyncpg.connect(_dsn(database.url))
        try:
            await a.execute("BEGIN")
            await a.execute(f"INSERT INTO {table} VALUES (100, 'a')")
            await a.execute("SAVEPOINT s")
            await a.execute(f"INSERT INTO {table} VALUES (101, 'a in savepoint')")
            await a.execute("RELEASE SAVEPOINT s")
            await a.execute("SAVEPOINT r")
            await a.execute(f"INSERT INTO {table} VALUES (102, 'rolled back')")
            await a.execute("ROLLBACK TO SAVEPOINT r")
            await b.execute(f"INSERT INTO {table} VALUES (200, 'b')")
            async with httpx.AsyncClient(
                base_url=server.base_url, headers={"Authorization": f"Bearer {database.key}"}
            ) as http:
                first = await http.get(f"/datasets/{table}.ndjson")
                await a.execute(
                    "DO $$ BEGIN"
                    f" BEGIN INSERT INTO {table} VALUES (103, 'in a block'); END;"
                    f" BEGIN INSERT INTO {table} VALUES (104, 'undone');"
                    "   RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END;"
                    " END $$"
                )
                await a.execute("COMMIT")
                response = await http.get(
                    f"/datasets/{table}.ndjson",
                    params={"since": first.headers["x-export-cursor"], "deletes": "true"},
                )
            return [row["id"] for row in map(json.loads, response.text.splitlines())], response
        finally:
            await a.close()
            await b.close()

    ids, response = asyncio.run(scenario())
    assert response.headers["x-export-cursor-mode"] == "tracked"
    assert response.headers["x-export-possibly-repeated"] == "0"
    # Exactly A's committed rows: not B's, which the cursor saw; not the rolled-back ones.
    assert ids == [100, 101, 103]

    cursor = response.headers["x-export-cursor"]
    run_sql(
        database.url,
        f"DELETE FROM {table} WHERE id = 1",
        f"UPDATE {table} SET id = 50 WHERE id = 2",
        f"UPDATE {table} SET v = 'changed' WHERE id = 4",
        # Inserted and deleted after the cursor: a tombstone for a key the job never had.
        f"INSERT INTO {table} VALUES (300, 'brief')",
        f"DELETE FROM {table} WHERE id = 300",
    )
    changed, response = pull(client, table, cursor, deletes="true")
    assert changed == [
        {"id": 4, "v": "changed"},
        {"id": 50, "v": "v2"},
        {"_deleted": {"id": 1}},
        {"_deleted": {"id": 2}},
        {"_deleted": {"id": 300}},
    ]
    # Without deletes: the rows only.
    rows, _ = pull(client, table, cursor)
    assert rows == [{"id": 4, "v": "changed"}, {"id": 50, "v": "v2"}]
    # Wide numbers as strings, tombstones alike.
    as_strings, _ = pull(client, table, cursor, deletes="true", numbers="string")
    assert as_strings[2] == {"_deleted": {"id": "1"}}

    cursor = response.headers["x-export-cursor"]
    run_sql(database.url, f"TRUNCATE {table}", f"INSERT INTO {table} VALUES (7, 'after')")
    after_truncate, _ = pull(client, table, cursor, deletes="true")
    deleted = sorted(line["_deleted"]["id"] for line in after_truncate if "_deleted" in line)
    assert deleted == [3, 4, 5, 50, 100, 101, 103, 200]
    assert {"id": 7, "v": "after"} in after_truncate


def test_a_tracked_pull_with_filters_deletes_what_left_them(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    tracked(database, table)
    _, cursor = full(client, table, id="lte.3")
    run_sql(
        database.url,
        f"UPDATE {table} SET id = 30 WHERE id = 3",
        f"UPDATE {table} SET v = 'x' WHERE id IN (1, 5)",
    )
    changed, _ = pull(client, table, cursor, id="lte.3", deletes="true")
    assert {"id": 1, "v": "x"} in changed
    assert {"_deleted": {"id": 3}} in changed
    # 5 and 30 changed, but match no filter: gone from the filtered copy, if it had them.
    assert {"_deleted": {"id": 5}} in changed and {"_deleted": {"id": 30}} in changed
    assert all(line.get("id") in (None, 1) for line in changed)


def test_tracked_pulls_read_the_same_through_the_cursor_path(
    database: ExportDatabase, table: str, tmp_path: Path
) -> None:
    tracked(database, table)
    with in_process_app(database.url, tmp_path, database.key, use_copy="false") as client:
        _, cursor = full(client, table)
        run_sql(
            database.url,
            f"DELETE FROM {table} WHERE id = 1",
            f"UPDATE {table} SET v = 'y' WHERE id = 2",
        )
        changed, response = pull(client, table, cursor, deletes="true")
        assert response.headers["x-export-cursor-mode"] == "tracked"
        assert changed == [{"id": 2, "v": "y"}, {"_deleted": {"id": 1}}]
        csv_pull = client.get(f"/datasets/{table}.csv", params={"since": cursor})
        assert csv_pull.text.splitlines() == ["id,v", "2,y"]


def test_a_cursor_from_before_tracking_pulls_in_snapshot_mode_but_not_deletes(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    _, cursor = full(client, table)
    tracked(database, table)
    run_sql(database.url, f"UPDATE {table} SET v = 'z' WHERE id = 5")
    changed, response = pull(client, table, cursor)
    assert response.headers["x-export-cursor-mode"] == "snapshot"
    assert changed == [{"id": 5, "v": "z"}]
    refused(
        client.get(f"/datasets/{table}.ndjson", params={"since": cursor, "deletes": "true"}),
        410,
        "older than the table's change tracking",
    )
    # Its next cursor is tracked.
    _, response = pull(client, table, response.headers["x-export-cursor"], deletes="true")
    assert response.headers["x-export-cursor-mode"] == "tracked"


def test_untracked_tables_go_back_to_snapshot_mode(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    tracked(database, table)
    _, cursor = full(client, table)
    result = exporter_cli(database, "untrack", table)
    assert result.returncode == 0 and f"stopped tracking {table}" in result.stdout
    run_sql(database.url, f"UPDATE {table} SET v = 'z' WHERE id = 5")
    changed, response = pull(client, table, cursor)
    assert response.headers["x-export-cursor-mode"] == "snapshot"
    assert changed == [{"id": 5, "v": "z"}]
    refused(
        client.get(f"/datasets/{table}.ndjson", params={"since": cursor, "deletes": "true"}),
        400,
        "needs a tracked table",
    )
    assert run_sql(database.url, "SELECT count(*) FROM exporter.changes")[0][0] >= 0
    assert exporter_cli(database, "untrack", table).stdout.strip().endswith("was not tracked")


def test_changes_past_the_retention_make_a_cursor_gone(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    tracked(database, table)
    _, cursor = full(client, table)
    run_sql(database.url, f"UPDATE {table} SET v = 'z' WHERE id = 5")
    _, fresh = pull(client, table, cursor, deletes="true")
    result = exporter_cli(database, "prune-changes", "--retention", "0")
    assert result.returncode == 0, result.stderr
    assert "deleted" in result.stdout
    refused(
        client.get(f"/datasets/{table}.ndjson", params={"since": cursor, "deletes": "true"}),
        410,
        "retention",
    )
    # A cursor taken after the pruning is honoured.
    _, later = full(client, table)
    run_sql(database.url, f"UPDATE {table} SET v = 'w' WHERE id = 4")
    changed, _ = pull(client, table, later, deletes="true")
    assert changed == [{"id": 4, "v": "w"}]
    assert fresh.status_code == 200


# --- refusals ----------------------------------------------------------------------------------


def test_bad_cursors_and_parameters_are_400s(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    _, cursor = full(client, table)
    path = f"/datasets/{table}.ndjson"
    flipped = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
    for bad, words in [
        ("garbage!", "not a cursor"),
        ("", "not a cursor"),
        (flipped, "not a cursor"),
        ("A" * 20_000, "longer than"),
    ]:
        refused(client.get(path, params={"since": bad}), 400, words)
    refused(client.get(path, params={"since": cursor, "limit": "3"}), 400, "limit")
    # One URL for every pull: deletes=true on the first pull too, refused where the later
    # pulls would be (an untracked table, CSV).
    refused(client.get(path, params={"deletes": "true"}), 400, "tracked table")
    refused(client.get(f"/datasets/{table}.csv", params={"deletes": "true"}), 400, "NDJSON")
    refused(client.get(path, params={"since": cursor, "deletes": "yes"}), 400, "true or false")
    refused(
        client.get(f"/datasets/{table}.csv", params={"since": cursor, "deletes": "true"}),
        400,
        "NDJSON",
    )
    refused(client.get(path, params={"since": cursor, "deletes": "true"}), 400, "tracked table")
    refused(client.get("/datasets/people.ndjson", params={"since": cursor}), 400, "another dataset")
    refused(client.get(path, params=[("since", cursor), ("since", cursor)]), 400, "more than once")


def test_a_table_made_again_makes_its_cursors_gone(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    _, cursor = full(client, table)
    run_sql(
        database.url,
        f"DROP TABLE {table}",
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text NOT NULL)",
    )
    refused(client.get(f"/datasets/{table}.ndjson", params={"since": cursor}), 410, "created again")


def test_a_key_with_a_role_pulls_in_snapshot_mode_without_deletes(
    client: httpx.Client, database: ExportDatabase, table: str, server: Server
) -> None:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    run_sql(database.url, f"CREATE ROLE {role}", f"GRANT SELECT ON {table} TO {role}")
    try:
        tracked(database, table)
        key = new_key(database.url, role=role)
        with server.client(key) as role_client:
            _, cursor = full(role_client, table)
            run_sql(database.url, f"UPDATE {table} SET v = 'r' WHERE id = 1")
            changed, response = pull(role_client, table, cursor)
            assert response.headers["x-export-cursor-mode"] == "snapshot"
            assert changed == [{"id": 1, "v": "r"}]
            refused(
                role_client.get(
                    f"/datasets/{table}.ndjson", params={"since": cursor, "deletes": "true"}
                ),
                400,
                "role",
            )
    finally:
        run_sql(database.url, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_track_refuses_what_it_cannot_track(database: ExportDatabase, table: str) -> None:
    run_sql(
        database.url,
        f"CREATE TABLE {table}_nokey (v text)",
        f"CREATE TABLE {table}_float (x float8 PRIMARY KEY)",
        f"CREATE VIEW {table}_view AS SELECT 1 AS one",
        f"CREATE TABLE {table}_parted (id int PRIMARY KEY) PARTITION BY RANGE (id)",
        f"CREATE TABLE {table}_parent (id int PRIMARY KEY)",
        f"CREATE TABLE {table}_child () INHERITS ({table}_parent)",
    )
    try:
        for suffix, words in [
            ("_nokey", "no primary key"),
            ("_float", "double precision"),
            ("_view", "only tables"),
            ("_parted", "partitioned"),
            ("_parent", "inheritance"),
            ("_missing", "no dataset named"),
        ]:
            result = exporter_cli(database, "track", table + suffix)
            assert result.returncode != 0
            assert words in result.stderr, result.stderr
        tracked(database, table)
        assert exporter_cli(database, "track", table).stdout.strip().endswith("was tracked")
    finally:
        run_sql(
            database.url,
            f"DROP TABLE {table}_nokey",
            f"DROP TABLE {table}_float",
            f"DROP VIEW {table}_view",
            f"DROP TABLE {table}_parted",
            f"DROP TABLE {table}_parent CASCADE",
        )


def test_the_service_prunes_changes_past_the_retention(
    database: ExportDatabase, table: str, tmp_path: Path
) -> None:
    tracked(database, table)
    with in_process_app(
        database.url, tmp_path, database.key, change_retention_s="0", prune_interval_s="0.2"
    ) as client:
        _, cursor = full(client, table)
        run_sql(database.url, f"UPDATE {table} SET v = 'z' WHERE id = 5")
        deadline = time.monotonic() + 10
        while True:
            response = client.get(
                f"/datasets/{table}.ndjson", params={"since": cursor, "deletes": "true"}
            )
            if response.status_code == 410 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        refused(response, 410, "retention")


def test_pruning_forgets_dropped_tracked_tables(database: ExportDatabase, table: str) -> None:
    tracked(database, table)
    (relid,) = run_sql(database.url, f"SELECT '{table}'::regclass::oid::bigint")[0]
    run_sql(database.url, f"UPDATE {table} SET v = 'gone' WHERE id = 1", f"DROP TABLE {table}")
    assert exporter_cli(database, "prune-changes").returncode == 0
    left = run_sql(
        database.url,
        f"SELECT (SELECT count(*) FROM exporter.tracked_tables WHERE relid = {relid}),"
        f" (SELECT count(*) FROM exporter.changes WHERE relid = {relid}),"
        f" to_regproc('exporter.track_{relid}') IS NULL",
    )[0]
    assert tuple(left) == (0, 0, True)


def _query_for(dataset_name: str) -> Any:
    from exporter.pipeline.catalog import Column, Dataset
    from exporter.pipeline.query import parse_query

    column = Column("id", "bigint", "bigint", "int8")
    dataset = Dataset(dataset_name, "public", dataset_name, "table", (column,), ("id",), 0, 42)
    return parse_query(dataset, [("since", "x")])


THEN = Position(1, 1, Snapshot(999, 1_000, (999,)), 999, digest("database 5"))


@pytest.mark.parametrize(
    ("now", "expected", "words"),
    [
        # Another cluster (a restore from a dump): its ids mean other transactions.
        (dataclasses.replace(THEN, system_identifier=7), CursorExpired, "another PostgreSQL"),
        # A failover or a point-in-time recovery: ids may be reused.
        (dataclasses.replace(THEN, timeline=2), CursorExpired, "timeline"),
        # Partitions attached, children added, or another database.
        (dataclasses.replace(THEN, relation_digest=digest("x")), CursorExpired, "changed shape"),
        # A replica behind the server that issued the cursor.
        (dataclasses.replace(THEN, snapshot=Snapshot(990, 995, ())), CursorAhead, "not reached"),
        # Over HORIZON transactions later: xmin comparisons modulo 2^32 no longer hold.
        (
            dataclasses.replace(THEN, snapshot=Snapshot(1_000 + HORIZON, 1_000 + HORIZON, ())),
            CursorExpired,
            "too many transactions old",
        ),
    ],
)
def test_cursors_the_database_cannot_honour(
    now: Position, expected: type[Exception], words: str
) -> None:
    query = _query_for("t")
    secret = b"k" * 32
    token = cursor_for(query, THEN, None, secret)
    assert token is not None
    cursor = decode(token, secret)
    with pytest.raises(expected, match=words):
        # Decided before the database is asked.
        asyncio.run(plan_pull(cast(Connection, None), query, cursor, now, None))


def test_the_catalog_says_how_each_dataset_pulls(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    assert client.get(f"/datasets/{table}").json()["incremental"] == "snapshot"
    tracked(database, table)
    assert client.get(f"/datasets/{table}").json()["incremental"] == "tracked"
    listed = {d["name"]: d["incremental"] for d in client.get("/datasets").json()}
    assert listed[table] == "tracked" and listed["adults"] is None


def test_a_changed_shape_makes_cursors_gone(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    _, cursor = full(client, table)
    # A column added with a default changes every row without a new version.
    run_sql(database.url, f"ALTER TABLE {table} ADD COLUMN w integer NOT NULL DEFAULT 7")
    refused(client.get(f"/datasets/{table}.ndjson", params={"since": cursor}), 410, "changed shape")


def test_a_cursor_is_bound_to_the_keys_role(
    client: httpx.Client, database: ExportDatabase, table: str, server: Server
) -> None:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    run_sql(database.url, f"CREATE ROLE {role}", f"GRANT SELECT ON {table} TO {role}")
    try:
        with server.client(new_key(database.url, role=role)) as role_client:
            _, cursor = full(role_client, table)
        # What the role could not see would never come to a key without it.
        refused(client.get(f"/datasets/{table}.ndjson", params={"since": cursor}), 400, "role")
    finally:
        run_sql(database.url, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_tracked_keys_are_compared_as_values_whatever_the_writers_settings(
    client: httpx.Client, database: ExportDatabase
) -> None:
    """The same timestamptz key written by sessions in two time zones, the same bytea key under
    two bytea_output settings: one row each in the pull, not two."""
    name = f"inc_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url,
        f"CREATE TABLE {name} (at timestamptz, tag bytea, v text, PRIMARY KEY (at, tag))",
        f"INSERT INTO {name} VALUES ('2024-01-01 00:00:00+00', '\\x01', 'a')",
    )
    try:
        tracked(database, name)
        _, cursor = full(client, name)
        run_sql(
            database.url,
            "SET TimeZone = 'Asia/Tokyo'",
            "SET bytea_output = 'escape'",
            f"UPDATE {name} SET v = 'b'",
        )
        run_sql(database.url, "SET TimeZone = 'UTC'", f"UPDATE {name} SET v = 'c'")
        changed, _ = pull(client, name, cursor, deletes="true")
        assert [line["v"] for line in changed] == ["c"], changed
    finally:
        run_sql(database.url, f"DROP TABLE {name}")


# A backslash and a quote: literals of it read differently with standard_conforming_strings off.
ODD_COLUMN = "k\\'x"


def test_tracking_survives_odd_names_renames_and_writers_settings(
    client: httpx.Client, database: ExportDatabase
) -> None:
    name = f"inc_{uuid.uuid4().hex[:8]}"
    renamed = name + "_old"
    run_sql(
        database.url,
        f'CREATE TABLE {name} ("{ODD_COLUMN}" integer PRIMARY KEY, v text)',
        f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b')",
    )
    try:
        tracked(database, name)
        _, cursor = full(client, name)
        # A writer whose session reads backslashes in literals as escapes.
        run_sql(
            database.url,
            "SET standard_conforming_strings = off",
            f"UPDATE {name} SET v = 'z' WHERE v = 'a'",
        )
        changed, _ = pull(client, name, cursor)
        assert changed == [{ODD_COLUMN: 1, "v": "z"}]
        # A renamed table's TRUNCATE records its own keys.
        run_sql(database.url, f"ALTER TABLE {name} RENAME TO {renamed}")
        _, cursor = full(client, renamed)
        run_sql(database.url, f"TRUNCATE {renamed}")
        changed, _ = pull(client, renamed, cursor, deletes="true")
        assert sorted(line["_deleted"][ODD_COLUMN] for line in changed) == [1, 2]
    finally:
        run_sql(database.url, f"DROP TABLE IF EXISTS {name}", f"DROP TABLE IF EXISTS {renamed}")


def test_writes_as_a_replica_session_are_recorded(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    """Logical replication's apply workers write with session_replication_role = replica,
    which skips ordinary triggers."""
    tracked(database, table)
    _, cursor = full(client, table)
    run_sql(
        database.url,
        "SET session_replication_role = replica",
        f"UPDATE {table} SET v = 'replicated' WHERE id = 3",
    )
    changed, _ = pull(client, table, cursor, deletes="true")
    assert changed == [{"id": 3, "v": "replicated"}]


def test_a_scheduled_pull_keeps_one_url_with_deletes_from_its_first_pull(
    client: httpx.Client, database: ExportDatabase, table: str
) -> None:
    """Issue 14: deletes=true on a tracked table's first pull (no since) was a 400; a whole
    export has no deletion to report, and the job adds since= from its second pull on."""
    tracked(database, table)
    first, cursor = full(client, table, deletes="true")
    assert [row["id"] for row in first] == [1, 2, 3, 4, 5]
    run_sql(database.url, f"DELETE FROM {table} WHERE id = 3")
    changed, _ = pull(client, table, cursor, deletes="true")
    assert changed == [{"_deleted": {"id": 3}}]
    refused(client.get(f"/datasets/{table}.csv", params={"deletes": "true"}), 400, "NDJSON")
    view = f"{table}_view"
    run_sql(database.url, f"CREATE VIEW {view} AS SELECT * FROM {table}")
    try:
        refused(client.get(f"/datasets/{view}.ndjson", params={"deletes": "true"}), 400, "tracked")
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_tracking_a_table_whose_key_columns_have_hostile_names(
    client: httpx.Client, database: ExportDatabase
) -> None:
    """Issue 14, defect 7: a key column named a$track$b made `exporter track` a syntax error,
    and one named pct%I%s tracked but then failed every TRUNCATE of the user's table. Column
    names reach the trigger function quoted, whatever they hold."""
    name = f"hostile_keys_{uuid.uuid4().hex[:8]}"
    columns = ["a$track$b", "pct%I%s", "q\"uo'te", "semi;colon", "Mixed Case"]
    quoted = [c.replace('"', '""') for c in columns]
    key = ", ".join(f'"{c}"' for c in quoted)
    run_sql(
        database.url,
        f"CREATE TABLE {name} ({', '.join(f'{chr(34)}{c}{chr(34)} integer' for c in quoted)},"
        f" v text, PRIMARY KEY ({key}))",
        f"INSERT INTO {name} VALUES (1, 2, 3, 4, 5, 'one'), (6, 7, 8, 9, 10, 'two')",
    )
    try:
        tracked(database, name)
        _, cursor = full(client, name)
        run_sql(
            database.url,
            f"UPDATE {name} SET v = 'uno' WHERE \"a$track$b\" = 1",
            f'DELETE FROM {name} WHERE "a$track$b" = 6',
        )
        changed, response = pull(client, name, cursor, deletes="true")
        assert response.headers["x-export-cursor-mode"] == "tracked"
        assert changed == [
            {**dict(zip(columns, (1, 2, 3, 4, 5), strict=True)), "v": "uno"},
            {"_deleted": dict(zip(columns, (6, 7, 8, 9, 10), strict=True))},
        ]
        # The user's own TRUNCATE works, and its rows are recorded as deleted.
        run_sql(database.url, f"TRUNCATE {name}")
        changed, _ = pull(client, name, response.headers["x-export-cursor"], deletes="true")
        assert changed == [{"_deleted": dict(zip(columns, (1, 2, 3, 4, 5), strict=True))}]
    finally:
        exporter_cli(database, "untrack", name)
        run_sql(database.url, f"DROP TABLE {name}")
