"""GET /exports through the real server: admin keys only; filters and keyset paging over
entries written here directly (deterministic), and a real export's entry."""

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from exporter.access.keys import create_key, revoke_key
from exporter.access.log_query import LogQuery, LogQueryTimeout, fetch_page
from exporter.db.pool import Pool
from tests.support.app import in_process_app
from tests.support.database import (
    ExportDatabase,
    asyncpg_dsn,
    export_database,
    insert_log,
    run_sql,
)
from tests.support.server import Server, running_server

ITEM_FIELDS = {
    "id",
    "request_id",
    "key",
    "dataset",
    "format",
    "parameters",
    "client_addr",
    "started_at",
    "ended_at",
    "duration_s",
    "rows",
    "bytes",
    "outcome",
    "status",
    "aborted_by",
    "error",
}


def make_key(url: str, name: str, admin: bool = False) -> str:
    async def run() -> str:
        pool = await Pool.open(url, size=1)
        try:
            return await create_key(pool, name, admin=admin)
        finally:
            await pool.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def admin_key(database: ExportDatabase) -> str:
    return make_key(database.url, f"admin-{uuid.uuid4().hex[:8]}", admin=True)


@pytest.fixture
def admin(server: Server, admin_key: str) -> Iterator[httpx.Client]:
    with server.client(admin_key) as http:
        yield http


def listed(http: httpx.Client, **params: object) -> dict[str, Any]:
    response = http.get("/exports", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


def ids_of(body: dict[str, Any]) -> list[int]:
    return [item["id"] for item in body["items"]]


T0 = datetime(2001, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def test_filters(database: ExportDatabase, admin: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    ka, kb, da, db = f"a-{tag}", f"b-{tag}", f"da_{tag}", f"db_{tag}"
    ids = insert_log(
        database.url,
        {
            "key_name": ka,
            "dataset": da,
            "parameters": {"select": ["id,name"], "age": ["gte.20"]},
            "started_at": T0,
            "ended_at": T0 + timedelta(seconds=2.5),
            "rows": 10,
            "bytes": 100,
        },
        {
            "key_name": ka,
            "dataset": db,
            "format": "ndjson",
            "outcome": "refused",
            "status": 404,
            "started_at": T0 + DAY,
            "ended_at": T0 + DAY,
            "error": f"no dataset named {db!r}",
        },
        {
            "key_name": kb,
            "dataset": da,
            "outcome": "aborted",
            "aborted_by": "max_rows",
            "started_at": T0 + 2 * DAY,
            "ended_at": T0 + 2 * DAY + timedelta(seconds=1),
            "rows": 1000,
            "bytes": 5000,
        },
        {
            "dataset": da,
            "outcome": "refused",
            "status": 401,
            "started_at": T0 + 3 * DAY,
            "ended_at": T0 + 3 * DAY,
        },
        {
            "key_name": ka,
            "dataset": da,
            "format": "ndjson",
            "outcome": "failed",
            "error": "boom",
            "started_at": T0 + 4 * DAY,
            "ended_at": T0 + 4 * DAY,
        },
        {"key_name": kb, "dataset": da, "outcome": "running", "started_at": T0 + 5 * DAY},
    )
    window: dict[str, object] = {"since": T0.isoformat(), "until": (T0 + 6 * DAY).isoformat()}
    cases: list[tuple[dict[str, object], list[int]]] = [
        (window, [5, 4, 3, 2, 1, 0]),
        ({"key": ka}, [4, 1, 0]),
        ({"key": kb}, [5, 2]),
        ({"dataset": da}, [5, 4, 3, 2, 0]),
        ({"dataset": db}, [1]),
        ({"outcome": "refused", **window}, [3, 1]),
        ({"outcome": "running", **window}, [5]),
        ({"status": 404, **window}, [1]),
        ({"status": 200, "key": ka}, [4, 0]),
        # since is inclusive, until exclusive; any offset, or Z.
        ({"since": "2001-01-03T01:00:00+01:00", "until": "2001-01-05T00:00:00Z"}, [3, 2]),
        (
            {"since": "2001-01-02T19:00:00.000001-05:00", "until": "2001-01-04T23:59:59.999+00:00"},
            [3],
        ),
        ({"before": ids[3], **window}, [2, 1, 0]),
        ({"key": ka, "dataset": da, "outcome": "completed"}, [0]),
        ({"key": ka, "outcome": "aborted"}, []),
        ({"key": f"nobody-{tag}"}, []),
        ({"limit": 2, **window}, [5, 4]),
    ]
    for params, expected in cases:
        body = listed(admin, **params)
        assert ids_of(body) == [ids[i] for i in expected], params

    # The entry of one request, whole.
    (first,) = listed(admin, dataset=da, status=200, outcome="completed")["items"]
    assert listed(admin, request_id=first["request_id"])["items"] == [first]
    assert first == {
        "id": ids[0],
        "request_id": first["request_id"],
        "key": ka,
        "dataset": da,
        "format": "csv",
        "parameters": {"select": ["id,name"], "age": ["gte.20"]},
        "client_addr": "127.0.0.1",
        "started_at": "2001-01-01T00:00:00Z",
        "ended_at": "2001-01-01T00:00:02.500000Z",
        "duration_s": 2.5,
        "rows": 10,
        "bytes": 100,
        "outcome": "completed",
        "status": 200,
        "aborted_by": None,
        "error": None,
    }
    (running,) = listed(admin, key=kb, outcome="running")["items"]
    assert (running["ended_at"], running["duration_s"], running["rows"]) == (None, None, None)
    (aborted,) = listed(admin, key=kb, outcome="aborted")["items"]
    assert (aborted["aborted_by"], aborted["duration_s"]) == ("max_rows", 1.0)
    (anonymous,) = listed(admin, status=401, **window)["items"]
    assert anonymous["key"] is None


def test_keyset_paging_is_stable_under_inserts(
    database: ExportDatabase, admin: httpx.Client
) -> None:
    key = f"pager-{uuid.uuid4().hex[:8]}"
    # Pages follow the log's order (ids), not the start times, which concurrent requests
    # may write out of order: here, shuffled.
    starts = [T0 - 200 * DAY + timedelta(seconds=(7 * i) % 20) for i in range(20)]
    ids = insert_log(database.url, *({"key_name": key, "started_at": at} for at in starts))

    whole = admin.get("/exports", params={"key": key, "limit": 20})
    assert ids_of(whole.json()) == ids[::-1]
    assert whole.json()["next"] is None and "link" not in whole.headers

    seen: list[int] = []
    since = "2000-06-01T00:00:00+01:00"  # a '+' to carry over
    page = admin.get("/exports", params={"key": key, "limit": 8, "since": since})
    pages = 0
    while True:
        pages += 1
        body = page.json()
        assert page.status_code == 200, page.text
        seen += ids_of(body)
        if pages == 1:
            # Newer entries arrive while the client pages: they neither shift nor repeat.
            newer = insert_log(database.url, *({"key_name": key} for _ in range(3)))
        if body["next"] is None:
            assert "link" not in page.headers
            break
        assert page.headers["link"] == f'<{body["next"]}>; rel="next"'
        query = httpx.URL(body["next"]).params
        assert (query["key"], query["limit"], query["since"]) == (key, "8", since)
        page = admin.get(body["next"])
    assert pages == 3
    assert seen == ids[::-1]
    assert ids_of(listed(admin, key=key, limit=3)) == newer[::-1]
    assert listed(admin, key=key, limit=22)["next"] is not None


def test_a_real_export_is_listed(
    admin: httpx.Client, client: httpx.Client, database: ExportDatabase
) -> None:
    request_id = f"audit-{uuid.uuid4().hex}"
    export = client.get(
        "/datasets/people.csv", params={"select": "id,name"}, headers={"X-Request-Id": request_id}
    )
    assert export.status_code == 200, export.text
    deadline = time.monotonic() + 5
    while True:
        (item,) = listed(admin, request_id=request_id)["items"]
        if item["outcome"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {k: item[k] for k in ("key", "dataset", "format", "parameters", "client_addr")} == {
        "key": "tests",
        "dataset": "people",
        "format": "csv",
        "parameters": {"select": ["id,name"]},
        "client_addr": "127.0.0.1",
    }
    assert (item["outcome"], item["rows"], item["bytes"]) == ("completed", 5, len(export.content))
    assert item["status"] == 200
    assert item["ended_at"] is not None and item["duration_s"] >= 0
    newest = listed(admin, limit=1)["items"]
    assert newest[0]["id"] >= item["id"]
    # A refused request of a valid key is there too, with its status; one without a valid
    # key is not (it is counted for the server log).
    refused_id = f"audit-refused-{uuid.uuid4().hex}"
    unknown = client.get("/datasets/no_such_table.csv", headers={"X-Request-Id": refused_id})
    assert unknown.status_code == 404
    (refused,) = listed(admin, request_id=refused_id)["items"]
    assert (refused["key"], refused["outcome"], refused["status"]) == ("tests", "refused", 404)
    assert listed(admin, status="404", request_id=refused_id)["items"] == [refused]
    anonymous_id = f"audit-anonymous-{uuid.uuid4().hex}"
    anonymous = client.get(
        "/datasets/people.csv", headers={"X-Request-Id": anonymous_id, "Authorization": ""}
    )
    assert anonymous.status_code == 401
    assert listed(admin, request_id=anonymous_id)["items"] == []


def test_only_admin_keys_read_the_log(
    database: ExportDatabase, server: Server, admin_key: str
) -> None:
    plain = make_key(database.url, f"plain-{uuid.uuid4().hex[:8]}")
    with server.client(None) as http:
        missing = http.get("/exports")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
    with server.client("exp_not-a-key") as http:
        assert http.get("/exports").status_code == 401
    with server.client(plain) as http:
        for params in ({}, {"limit": "0"}, {"nope": "1"}):
            refused = http.get("/exports", params=params)
            # Refused before its parameters are read: a non-admin learns nothing of them.
            assert refused.status_code == 403, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["detail"] == "this key may not read the export log"
    # Admin keys read the log; nothing in it is a key or a digest.
    with server.client(admin_key) as http:
        text = http.get("/exports", params={"limit": 1000}).text
        for secret in (admin_key, plain):
            digest = hashlib.sha256(secret.encode()).digest()
            assert secret not in text and digest.hex() not in text

    name = f"admin-{uuid.uuid4().hex[:8]}"
    revoked = make_key(database.url, name, admin=True)
    with server.client(revoked) as http:
        assert http.get("/exports").status_code == 200

        async def revoke() -> None:
            pool = await Pool.open(database.url, size=1)
            try:
                assert await revoke_key(pool, name)
            finally:
                await pool.close()

        asyncio.run(revoke())
        assert http.get("/exports").status_code == 401


@pytest.mark.parametrize(
    ("query", "parameter", "reason"),
    [
        ("limit=0", "limit", "not an integer from 1 to 1000"),
        ("limit=1001", "limit", "not an integer from 1 to 1000"),
        ("limit=ten", "limit", "not an integer"),
        ("limit=1.5", "limit", "not an integer"),
        ("limit=%201", "limit", "not an integer"),
        ("limit=", "limit", "not an integer"),
        ("status=abc", "status", "not an integer from 100 to 599"),
        ("status=99", "status", "from 100 to 599"),
        ("status=600", "status", "from 100 to 599"),
        ("outcome=done", "outcome", "is not one of running, completed"),
        ("since=yesterday", "since", "not an ISO 8601 time"),
        ("since=2026-01-01T00:00:00", "since", "needs an offset"),
        ("until=2026-01-01", "until", "needs an offset"),
        # An unencoded '+' arrives as a space.
        ("since=2026-01-01T00:00:00+01:00", "since", "'+' must be written %2B"),
        ("since=0001-01-01T00:00:00%2B01:00", "since", "out of range"),
        ("before=0", "before", "not an integer from 1"),
        ("before=-5", "before", "not an integer"),
        ("before=9223372036854775808", "before", "not an integer from 1 to"),
        ("dataset=a%00b", "dataset", "NUL"),
        ("key=", "key", "must not be empty"),
        (f"request_id={'x' * 1001}", "request_id", "at most 1000 characters"),
        ("nope=1", "nope", "unknown parameter (known: key, dataset, outcome, status"),
        ("Key=a", "Key", "unknown parameter"),
        ("status=200&status=404", "status", "given more than once"),
        ("key=a&limit=5&key=b", "key", "given more than once"),
    ],
)
def test_bad_parameters_are_400s_that_name_them(
    admin: httpx.Client, query: str, parameter: str, reason: str
) -> None:
    response = admin.get(f"/exports?{query}")
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["invalid-params"][0]["name"] == parameter
    assert reason in body["invalid-params"][0]["reason"]
    assert body["detail"].startswith(f"{parameter}: ")


def test_largest_values_are_accepted(admin: httpx.Client) -> None:
    body = listed(
        admin,
        before=2**63 - 1,
        limit=1000,
        status=599,
        since="0001-01-01T00:00:00Z",
        until="9999-12-31T23:59:59.999999+01:00",
    )
    assert body["items"] == [] and body["next"] is None


def test_a_slow_query_times_out_and_frees_its_connection(database: ExportDatabase) -> None:
    async def run() -> None:
        blocker = await asyncpg.connect(asyncpg_dsn(database.url))
        pool = await Pool.open(database.url, size=1)
        try:
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute("LOCK TABLE exporter.export_log IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(LogQueryTimeout):
                await fetch_page(pool, LogQuery(limit=1), timeout_s=0.5)
            await locked.rollback()
            # The pool's one connection was given back, and works.
            page = await fetch_page(pool, LogQuery(limit=1), timeout_s=5)
            assert len(page.entries) == 1
        finally:
            await pool.close()
            await blocker.close()

    asyncio.run(run())


def test_openapi_documents_the_route(server: Server) -> None:
    with server.client(None) as http:
        spec = http.get("/openapi.json").json()
    operation = spec["paths"]["/exports"]["get"]
    assert [p["name"] for p in operation["parameters"]] == [
        "key",
        "dataset",
        "outcome",
        "status",
        "since",
        "until",
        "request_id",
        "limit",
        "before",
    ]
    page = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert page == {"$ref": "#/components/schemas/ExportLogPage"}
    assert set(operation["responses"]) >= {"200", "400", "401", "403"}
    entry = spec["components"]["schemas"]["ExportLogEntry"]
    assert set(entry["properties"]) == ITEM_FIELDS


def test_requests_without_a_valid_key_write_no_row_and_one_log_line(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """Issue 14, defect 2: each wrote a row with up to 62 KB of parameters, so anyone who
    could reach the port could grow the state database without bound. Now they are counted,
    and the server log says so at most once a minute."""
    run = uuid.uuid4().hex[:8]
    junk = "x" * 30_000
    with running_server(database.url, tmp_path) as server:
        for index in range(40):
            key = None if index % 2 else "exp_not-a-real-key"
            with server.client(key) as client:
                response = client.get(
                    f"/datasets/people.csv?junk={junk}",
                    headers={"X-Request-Id": f"anon-{run}-{index}"},
                )
            assert response.status_code == 401
        with server.client(database.key) as client:  # a valid key's request is still logged
            client.get("/datasets/no_such.csv", headers={"X-Request-Id": f"anon-{run}-valid"})
        time.sleep(0.5)
        lines = [line for line in server.log().splitlines() if "without a valid key" in line]
    assert len(lines) == 1, lines
    assert (
        "1 requests refused without a valid key" in lines[0] and "/datasets/people.csv" in lines[0]
    )
    assert junk not in lines[0]
    logged = run_sql(
        database.url,
        f"SELECT request_id, status FROM exporter.export_log WHERE request_id LIKE 'anon-{run}-%'",
    )
    assert [(row["request_id"], row["status"]) for row in logged] == [(f"anon-{run}-valid", 404)]


def test_a_logged_rows_parameters_are_a_few_kb_at_most(
    database: ExportDatabase, server: Server
) -> None:
    request_id = f"big-params-{uuid.uuid4().hex[:8]}"
    params = {f"p{i}": "y" * 990 for i in range(40)}  # 40 KB of parameters
    with server.client(database.key) as client:
        client.get("/datasets/no_such.csv", params=params, headers={"X-Request-Id": request_id})
    deadline = time.monotonic() + 5
    while (
        not (
            rows := run_sql(
                database.url,
                "SELECT parameters::text AS p FROM exporter.export_log"
                f" WHERE request_id = '{request_id}'",
            )
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    kept = json.loads(rows[0]["p"])
    assert kept["_truncated"] == ["true"]
    assert sum(len(name) + sum(map(len, values)) for name, values in kept.items()) <= 4_200


def test_serve_prunes_the_log_past_its_retention(server_url: str, tmp_path: Path) -> None:
    with export_database(server_url) as own:
        now = datetime.now(UTC)
        old, recent = insert_log(
            own.url,
            {"started_at": now - timedelta(hours=2)},
            {"started_at": now - timedelta(minutes=30)},
        )
        with in_process_app(
            own.url, tmp_path, export_log_retention_s="3600", prune_interval_s="0.2"
        ):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                left = [row["id"] for row in run_sql(own.url, "SELECT id FROM exporter.export_log")]
                if old not in left:
                    break
                time.sleep(0.1)
        assert left == [recent]
