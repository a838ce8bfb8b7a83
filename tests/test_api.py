import asyncio
import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.app import in_process_app
from tests.support.database import ExportDatabase, asyncpg_dsn, logged_export, new_key, run_sql
from tests.support.server import Server, free_port, running_server


def test_datasets_lists_tables_and_views_with_columns(client: httpx.Client) -> None:
    response = client.get("/datasets")
    assert response.status_code == 200
    datasets = {d["name"]: d for d in response.json()}
    assert {"people", "adults", "big"} <= datasets.keys()
    assert "api_keys" not in datasets and "export_log" not in datasets
    assert "orders" not in datasets  # schema sales is not exposed
    people = datasets["people"]
    assert people["kind"] == "table"
    assert people["primary_key"] == ["id"]
    assert people["columns"][:4] == [
        {"name": "id", "type": "integer"},
        {"name": "name", "type": "text"},
        {"name": "age", "type": "integer"},
        {"name": "score", "type": "numeric(10,3)"},
    ]
    assert people["estimated_rows"] == 5
    assert datasets["adults"]["kind"] == "view"


def test_csv_export_streams_header_and_rows(client: httpx.Client) -> None:
    response = client.get("/datasets/people.csv", params={"select": "id,name,age"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="people-')
    assert "filename*=UTF-8''people-" in disposition and disposition.endswith(".csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["id", "name", "age"]
    assert rows[1:3] == [["1", "Ada", "36"], ["2", 'Bob, "the builder"', "45"]]
    assert len(rows) == 6


def test_ndjson_export_keeps_column_order_and_json_values(client: httpx.Client) -> None:
    response = client.get("/datasets/people.ndjson", params={"select": "doc,id,score"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.text.splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert list(first) == ["doc", "id", "score"]
    assert first == {"doc": {"a": 1}, "id": 1, "score": 99.5}
    assert '"score":100000.001' in lines[4]  # the digits PostgreSQL prints


def test_request_id_and_security_headers_on_streams(client: httpx.Client) -> None:
    response = client.get("/datasets/people.csv", headers={"X-Request-Id": "job-42.a"})
    assert response.headers["x-request-id"] == "job-42.a"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    generated = client.get("/datasets", headers={"X-Request-Id": "bad id; <script>" + "x" * 200})
    assert "script" not in generated.headers["x-request-id"]
    assert len(generated.headers["x-request-id"]) == 32


def test_missing_or_wrong_key_is_401(server: Server) -> None:
    with server.client(None) as anonymous:
        response = anonymous.get("/datasets")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"] == "application/problem+json"
        assert anonymous.get("/datasets/people.csv").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/openapi.json").status_code == 200
    with server.client("exp_not-a-real-key") as wrong:
        response = wrong.get("/datasets/people.csv")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_readyz_checks_the_database(client: httpx.Client) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}


def test_unreachable_database_is_a_503_not_a_500(database: ExportDatabase, tmp_path: Path) -> None:
    # The service starts without its database (connections are made on demand), reports it
    # in /readyz, and refuses requests with a 503 the client can retry.
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    for state_url in (nowhere, database.url):  # keys unreachable; then only the exported data
        with in_process_app(
            nowhere, tmp_path, database.key, state_database_url=state_url
        ) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503
            for path in ("/datasets", "/datasets/people.csv", "/datasets/people"):
                response = client.get(path)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["content-type"] == "application/problem+json"
                assert response.headers["retry-after"] == "5"
                assert response.json()["detail"] == "the database is not reachable"


def test_accept_negotiates_the_export(client: httpx.Client) -> None:
    as_json = client.get("/datasets/people")
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.json()["name"] == "people"
    as_csv = client.get("/datasets/people", headers={"Accept": "text/csv"})
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert as_csv.text.startswith("id,name,")
    as_ndjson = client.get(
        "/datasets/people", headers={"Accept": "application/x-ndjson, */*;q=0.1"}
    )
    assert as_ndjson.headers["content-type"] == "application/x-ndjson"
    refused = client.get("/datasets/people", headers={"Accept": "application/xml"})
    assert refused.status_code == 406
    assert refused.headers["content-type"] == "application/problem+json"
    browser = client.get("/datasets/people", headers={"Accept": "text/html,*/*;q=0.8"})
    assert browser.headers["content-type"] == "application/json"


def test_unknown_dataset_is_404_problem(client: httpx.Client) -> None:
    for path in ("/datasets/nope", "/datasets/nope.csv", "/datasets/api_keys.ndjson"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 404


def test_openapi_documents_export_media_types(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    csv_route = spec["paths"]["/datasets/{name}.csv"]["get"]
    assert "text/csv" in csv_route["responses"]["200"]["content"]
    ndjson_route = spec["paths"]["/datasets/{name}.ndjson"]["get"]
    assert "application/x-ndjson" in ndjson_route["responses"]["200"]["content"]


def test_export_log_records_completed_exports(
    client: httpx.Client, database: ExportDatabase
) -> None:
    response = client.get("/datasets/people.ndjson", params={"age": "gt.30"})
    row = logged_export(database.url, response.headers["x-request-id"])
    assert (row["key_name"], row["dataset"], row["format"]) == ("tests", "people", "ndjson")
    assert json.loads(row["parameters"]) == {"age": ["gt.30"]}
    assert row["rows"] == 2
    assert row["bytes"] == len(response.content)
    assert row["outcome"] == "completed"
    # CSV through COPY: rows as COPY counts them, though a field holds a line break.
    response = client.get("/datasets/people.csv")
    assert b"multi\nline" in response.content
    logged = logged_export(database.url, response.headers["x-request-id"])
    assert (logged["rows"], logged["bytes"]) == (5, len(response.content))


def test_a_column_named_like_the_row_alias_exports(
    client: httpx.Client, database: ExportDatabase
) -> None:
    run_sql(
        database.url,
        "CREATE TABLE public.rcol (id integer PRIMARY KEY, r text, t text)",
        "INSERT INTO public.rcol VALUES (1, 'a', 'b')",
    )
    try:
        response = client.get("/datasets/rcol.ndjson")
        assert response.status_code == 200
        assert response.json() == {"id": 1, "r": "a", "t": "b"}
        assert client.get("/datasets/rcol.csv").text == "id,r,t\n1,a,b\n"
    finally:
        run_sql(database.url, "DROP TABLE public.rcol")


def test_a_dataset_that_fails_to_read_is_not_blamed_on_the_request(
    client: httpx.Client, database: ExportDatabase
) -> None:
    run_sql(database.url, "CREATE VIEW public.broken AS SELECT id, 1 / (id - 1) AS x FROM people")
    try:
        response = client.get("/datasets/broken.csv", params={"id": "gte.1"})
        assert response.status_code == 500
        body = response.json()
        assert body["title"] == "Dataset could not be read"
        assert "division by zero" in body["detail"]
        assert "invalid-params" not in body
        # A value PostgreSQL rejects is still the request's fault, and named.
        bad = client.get("/datasets/people.csv", params={"born": "eq.notadate"})
        assert bad.status_code == 400
        assert [p["name"] for p in bad.json()["invalid-params"]] == ["born"]
    finally:
        run_sql(database.url, "DROP VIEW public.broken")


def test_a_service_at_its_limit_is_a_quick_429_and_the_rest_still_answers(
    database: ExportDatabase, tmp_path: Path
) -> None:
    # One export at a time (EXPORTER_POOL_SIZE=1): the next is refused by the slots at once,
    # not after waiting for a connection; listing, describing and readiness have pools of
    # their own.
    with running_server(database.url, tmp_path, pool_size="1", pool_timeout_s="0.5") as server:
        with server.client(database.key) as holder, server.client(new_key(database.url)) as other:
            with holder.stream("GET", "/datasets/big.csv") as streaming:
                raw = streaming.iter_raw()
                next(raw)
                refused = other.get("/datasets/people.csv")
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == "10"
                assert refused.headers["content-type"] == "application/problem+json"
                assert "the service already runs its maximum of 1" in refused.json()["detail"]
                assert other.get("/datasets").status_code == 200
                assert other.get("/readyz").status_code == 200


def test_json_values_with_line_breaks_stay_on_one_ndjson_line(
    client: httpx.Client, database: ExportDatabase
) -> None:
    run_sql(
        database.url,
        "CREATE TABLE public.jsonish (id integer PRIMARY KEY, j json, js json[], t text)",
        "INSERT INTO public.jsonish VALUES "
        "(1, E'{\"a\":\\n 1,\\r\\n\"b\": \"x\\\\ny\"}', ARRAY[E'[1,\\n2]'::json], E'two\\nlines'), "
        "(2, NULL, NULL, NULL)",
    )
    try:
        lines = client.get("/datasets/jsonish.ndjson").text.split("\n")
        assert lines[-1] == "" and len(lines) == 3
        assert json.loads(lines[0]) == {
            "id": 1,
            "j": {"a": 1, "b": "x\ny"},
            "js": [[1, 2]],
            "t": "two\nlines",
        }
        assert json.loads(lines[1]) == {"id": 2, "j": None, "js": None, "t": None}
    finally:
        run_sql(database.url, "DROP TABLE public.jsonish")


def test_cursor_and_copy_exports_agree(
    client: httpx.Client, database: ExportDatabase, tmp_path: Path
) -> None:
    with in_process_app(database.url, tmp_path, database.key, use_copy="false") as through_cursor:
        for path in (
            "/datasets/people.ndjson",
            "/datasets/big.ndjson?limit=20000&order=id.desc",
            "/datasets/big.csv?limit=20000&select=at,label,id,amount",
        ):
            assert through_cursor.get(path).content == client.get(path).content, path
        # Through a cursor, CSV cannot yet tell NULL from the empty string; COPY can.
        assert b'\n3,"",' in client.get("/datasets/people.csv").content


def test_a_line_break_that_would_split_an_ndjson_line_fails_the_export(
    client: httpx.Client, database: ExportDatabase, tmp_path: Path
) -> None:
    run_sql(
        database.url,
        "CREATE TYPE public.wrapped AS (doc json)",
        "CREATE TABLE public.wrapping (id integer PRIMARY KEY, w public.wrapped)",
        "INSERT INTO public.wrapping VALUES (1, ROW(E'{\"a\":\\n1}'::json))",
    )
    try:
        with running_server(database.url, tmp_path, use_copy="false") as cursor_server:
            with cursor_server.client(database.key) as through_cursor:
                for http in (client, through_cursor):
                    with http.stream("GET", "/datasets/wrapping.ndjson?limit=5000") as response:
                        with pytest.raises(httpx.RemoteProtocolError):
                            response.read()
    finally:
        run_sql(database.url, "DROP TABLE public.wrapping", "DROP TYPE public.wrapped")


def test_csv_loads_back_with_copy_into_an_identical_table(
    client: httpx.Client, database: ExportDatabase
) -> None:
    exported = client.get("/datasets/people.csv").content

    async def load_back() -> list[Any]:
        conn = await asyncpg.connect(asyncpg_dsn(database.url))
        try:
            await conn.execute("CREATE TEMP TABLE people_again (LIKE public.people)")
            await conn.copy_to_table(
                "people_again", source=io.BytesIO(exported), format="csv", header=True
            )
            # Row for row, NULLs included: IS DISTINCT FROM treats NULL = NULL as equal.
            differences: list[Any] = await conn.fetch(
                "SELECT * FROM public.people p FULL JOIN people_again a ON p.id = a.id "
                "WHERE p IS DISTINCT FROM a"
            )
            return differences
        finally:
            await conn.close()

    assert asyncio.run(load_back()) == []


@pytest.mark.parametrize("use_copy", ["true", "false"])
def test_a_table_altered_between_exports_exports_again(
    database: ExportDatabase, tmp_path: Path, use_copy: str
) -> None:
    # One export connection, so the second export runs on the first one's connection, where
    # asyncpg caches prepared statements: every export's result is text, so a cached plan
    # stays valid when a column's type changes.
    run_sql(database.url, "CREATE TABLE altered (id integer PRIMARY KEY, v integer)")
    run_sql(database.url, "INSERT INTO altered VALUES (1, 10)")
    try:
        with in_process_app(
            database.url, tmp_path, database.key, pool_size="1", use_copy=use_copy
        ) as client:
            first = client.get("/datasets/altered.ndjson", params={"select": "v"})
            assert first.text == '{"v":10}\n'
            run_sql(database.url, "ALTER TABLE altered ALTER COLUMN v TYPE text")
            second = client.get("/datasets/altered.ndjson", params={"select": "v"})
            assert second.status_code == 200, second.text
            assert second.text == '{"v":"10"}\n'
    finally:
        run_sql(database.url, "DROP TABLE altered")


def test_refused_export_requests_are_in_the_export_log(
    server: Server, database: ExportDatabase
) -> None:
    """Every export request of a valid key is audited, the refused ones too: who asked, for
    what, and why not (one without a valid key is not: tests/test_export_log.py). Hostile
    values are stored bounded and cleaned (NUL cannot be stored), never failing the answer."""
    cases = [
        (database.key, "/datasets/no_such_table.csv", 404, "tests"),
        (database.key, "/datasets/people.csv?nope=eq.1", 400, "tests"),
        (database.key, "/datasets/people.csv?age=eq.%00" + "x" * 5000, 400, "tests"),
        # Refused by PostgreSQL's date input, after the export's connection was taken.
        (database.key, "/datasets/people.csv?born=eq.2024-13-45", 400, "tests"),
    ]
    run = uuid.uuid4().hex[:8]
    for index, (key, path, status, key_name) in enumerate(cases):
        request_id = f"refused-{index}-{run}"
        with server.client(key) as client:
            response = client.get(path, headers={"X-Request-Id": request_id})
        assert response.status_code == status, response.text
        logged = logged_export(database.url, request_id)
        assert (logged["outcome"], logged["status"], logged["key_name"]) == (
            "refused",
            status,
            key_name,
        )
        assert logged["dataset"] == path.removeprefix("/datasets/").split(".")[0]
        assert logged["client_addr"] == "127.0.0.1"
        assert logged["error"]
    parameters = json.loads(logged_export(database.url, f"refused-2-{run}")["parameters"])
    assert parameters["age"] == ["eq.\ufffd" + "x" * 996]
    assert parameters["_truncated"] == ["true"]
    # The export that is not refused says 200.
    with server.client(database.key) as client:
        response = client.get("/datasets/people.csv")
    assert logged_export(database.url, response.headers["x-request-id"])["status"] == 200


def test_a_long_unknown_dataset_name_is_not_echoed_whole(client: httpx.Client) -> None:
    response = client.get("/datasets/" + "n" * 5000 + ".csv")
    assert response.status_code == 404
    assert len(response.json()["detail"]) < 150
