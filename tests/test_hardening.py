"""Issue 14's defects, each reproduced against a real `exporter serve`: inputs that reached a
500, values from requests that reached the server log raw, a revoked key's work that went on."""

import base64
import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.database import ExportDatabase, logged_export, new_key, run_sql
from tests.support.jobs import slow_view, submit, wait_for
from tests.support.server import Server, free_port, running_server

PROBLEM = "application/problem+json"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/exports/a%00"),
        ("HEAD", "/exports/a%00"),
        ("DELETE", "/exports/a%00"),
        ("GET", "/exports/a%00/events"),
        ("GET", "/exports/a%00/download"),
        ("HEAD", "/exports/a%00/download"),
        ("GET", "/exports/%00"),
        ("GET", "/exports/%ff%fe"),
        ("GET", "/exports/%F0%9F%98%80/events"),
        ("GET", f"/exports/{'a' * 129}"),
        ("GET", "/exports/a%0d%0aX-Injected:%201"),
    ],
)
def test_an_id_no_export_can_have_is_the_404_of_an_unknown_one(
    client: httpx.Client, method: str, path: str
) -> None:
    # A NUL in a text is refused by PostgreSQL: looking such an id up was a 500.
    route = path.rpartition("/")[2] if path.count("/") == 3 else ""
    unknown = client.request(method, f"/exports/0123456789abcdef{'/' + route if route else ''}")
    response = client.request(method, path)
    assert response.status_code == unknown.status_code == 404, response.text
    assert response.headers["content-type"] == PROBLEM
    assert "x-injected" not in response.headers
    if method != "HEAD":
        assert response.json()["detail"] == unknown.json()["detail"]


@pytest.mark.parametrize(
    ("body", "parameter"),
    [
        (b'{"dataset": "\\ud800", "format": "csv"}', "dataset"),
        (b'{"dataset": "people", "format": "csv", "params": {"name": "eq.\\udfff"}}', "params"),
        (b'{"dataset": "people", "format": "csv", "params": {"\\ud83d": "x"}}', "params"),
        (b'{"dataset": "people", "format": "csv", "params": {"id": ["1", "\\ud800"]}}', "params"),
    ],
)
def test_a_lone_surrogate_in_a_job_body_is_a_400_naming_it(
    client: httpx.Client, body: bytes, parameter: str
) -> None:
    # Valid JSON, and a str to Python, but no text PostgreSQL or UTF-8 can hold: was a 500.
    response = client.post("/exports", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["invalid-params"][0]["name"].startswith(parameter), problem


def test_control_characters_from_a_request_are_escaped_in_the_log(
    database: ExportDatabase, tmp_path: Path
) -> None:
    # The database is unreachable: the service logs the request's path with the refusal.
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    hostile = "/datasets/%1b[31mred%0bvt%c2%85nel%0d%0a2026-01-01 INFO forged%e2%80%a8ls"
    with running_server(nowhere, tmp_path, state_database_url=database.url) as server:
        with server.client(database.key) as client:
            assert client.get(hostile).status_code == 503
        log = wait_for_log(server, "database unavailable for")
    line = next(line for line in log.splitlines() if "database unavailable for" in line)
    # (The CR LF does not reach the app: the HTTP parser takes it out of the path.)
    assert "/datasets/\\x1b[31mred\\x0bvt\\x85nel" in line and "forged\\u2028ls" in line
    for raw in ("\x1b", "\x0b", "\x85", "\r", "\u2028"):
        assert raw not in log
    assert not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())


def wait_for_log(server: Server, text: str) -> str:
    # The server writes its log line as it answers; the file may lag the response a little.
    deadline = time.monotonic() + 5
    while text not in (log := server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def test_revoking_a_key_stops_its_work_within_seconds(
    database: ExportDatabase, tmp_path: Path
) -> None:
    """Issue 14, defect 4: `exporter keys revoke` left the key's running exports, jobs and
    event streams going to their end. Now, within seconds (a NOTIFY every process LISTENs
    for): its direct export is cut off (an incomplete transfer, logged aborted by "revoked"),
    its running job fails saying so, its event stream ends, and its finished job's file is
    gone (410)."""
    name = f"revoked-{uuid.uuid4().hex[:8]}"
    key = new_key(database.url, name)
    admin = new_key(database.url, admin=True)
    view = slow_view(database, seconds=30)
    request_id = f"revoked-export-{uuid.uuid4().hex[:8]}"
    try:
        with running_server(
            database.url, tmp_path, job_dir=str(tmp_path / "files"), job_concurrency="1"
        ) as server:
            with server.client(key) as client, server.client(admin) as watcher:
                finished = submit(client, {"dataset": "people", "format": "csv"})
                wait_for(client, finished["id"], "done")
                running = submit(client, {"dataset": view, "format": "csv"})
                wait_for(client, running["id"], "running")
                with (
                    client.stream(
                        "GET", "/datasets/big.csv", headers={"X-Request-Id": request_id}
                    ) as export,
                    client.stream("GET", running["events_url"]) as events,
                ):
                    assert export.status_code == events.status_code == 200
                    chunks = export.iter_raw()
                    next(chunks)
                    revoked_at = time.monotonic()
                    revoke = subprocess.run(
                        [sys.executable, "-m", "exporter", "keys", "revoke", name],
                        env={**os.environ, "EXPORTER_DATABASE_URL": database.url},
                        capture_output=True,
                        timeout=60,
                    )
                    assert revoke.returncode == 0, revoke.stderr
                    with pytest.raises(httpx.RemoteProtocolError):
                        for _ in chunks:
                            pass
                    for _ in events.iter_raw():  # ends cleanly: its EventSource reconnects
                        pass
                    assert time.monotonic() - revoked_at < 5
                status = watcher.get(running["status_url"]).json()
                assert (status["status"], status["error"]) == (
                    "failed",
                    "the job's key was revoked",
                )
                assert watcher.get(finished["download_url"]).status_code == 410
                assert client.get(running["status_url"]).status_code == 401
            assert "without completing response" not in server.log()
        logged = logged_export(database.url, request_id)
        assert (logged["outcome"], logged["aborted_by"]) == ("aborted", "revoked")
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


# A domain whose check counts, in the transaction, how often PostgreSQL casts a value to it
# (reading a stored value casts nothing): past 200 casts in one transaction it raises.
# `counted.off` lets the test's own inserts through.
COUNTED_DOMAIN_SQL = (
    """CREATE OR REPLACE FUNCTION counted_cast(integer) RETURNS boolean LANGUAGE plpgsql AS $$
    DECLARE
        casts integer;
    BEGIN
        IF current_setting('counted.off', true) = 'on' THEN
            RETURN true;
        END IF;
        casts := coalesce(nullif(current_setting('counted.casts', true), ''), '0')::integer + 1;
        PERFORM set_config('counted.casts', casts::text, true);
        IF casts > 200 THEN
            RAISE EXCEPTION 'a filter value was cast % times in one export', casts;
        END IF;
        RETURN true;
    END $$""",
    """DO $$ BEGIN
        CREATE DOMAIN counted_integer AS integer CHECK (counted_cast(VALUE));
    EXCEPTION WHEN duplicate_object THEN NULL;
    END $$""",
)


@pytest.mark.parametrize("use_copy", ["true", "false"])
def test_a_filter_value_is_cast_once_per_query_on_every_path(
    database: ExportDatabase, tmp_path: Path, use_copy: str
) -> None:
    """Issue 14, defect 6: on the COPY path a filter value was read back with
    current_setting() and cast for every row (63 µs a row for an in.() list of 1,799 items,
    so that one request held a connection for minutes); now once per query, on both paths.
    2,000 rows, each of which used to cast the 20 listed values again."""
    table = f"counted_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url,
        *COUNTED_DOMAIN_SQL,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, n counted_integer NOT NULL)",
        "SET counted.off = 'on'",
        f"INSERT INTO {table} SELECT g, g % 100 FROM generate_series(1, 2000) AS g",
    )
    listed = ",".join(str(n) for n in range(20))
    try:
        with running_server(database.url, tmp_path, use_copy=use_copy) as server:
            with server.client(database.key) as client:
                for params, expected in [
                    ({"n": f"in.({listed})"}, 400),
                    ({"n": f"not.in.({listed})"}, 1600),
                    ({"n": "gte.95", "id": "lt.1000"}, 50),
                ]:
                    for fmt in ("csv", "ndjson"):
                        response = client.get(f"/datasets/{table}.{fmt}", params=params)
                        assert response.status_code == 200, response.text
                        lines = response.text.splitlines()
                        assert len(lines) - (fmt == "csv") == expected, (params, fmt)
    finally:
        run_sql(database.url, f"DROP TABLE {table}")


def test_an_in_list_longer_than_the_setting_is_a_400_naming_the_limit(
    client: httpx.Client,
) -> None:
    items = ",".join(["1"] * 2001)
    response = client.get("/datasets/people.csv", params={"id": f"in.({items})"})
    assert response.status_code == 400, response.text[:300]
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["invalid-params"][0]["name"] == "id"
    assert "at most 2000 items" in problem["detail"]
    assert client.get("/datasets/people.csv", params={"id": f"in.({items[2:]})"}).status_code == 200


def test_a_pull_token_does_not_reveal_the_cluster_or_the_table(
    client: httpx.Client, database: ExportDatabase
) -> None:
    """Issue 14, defect 9: an `X-Export-Cursor` was signed but readable, the cluster's system
    identifier and the table's oid in the clear. Now sealed, and still a working cursor."""
    (facts,) = run_sql(
        database.url,
        "SELECT system_identifier, 'public.people'::regclass::oid AS relid"
        " FROM pg_control_system()",
    )
    first = client.get("/datasets/people.ndjson")
    assert first.status_code == 200
    token = first.headers["x-export-cursor"]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert struct.pack(">Q", facts["system_identifier"]) not in raw
    assert struct.pack(">I", facts["relid"]) not in raw
    pull = client.get("/datasets/people.ndjson", params={"since": token})
    assert pull.status_code == 200, pull.text
    assert pull.headers["x-export-cursor"] != token
