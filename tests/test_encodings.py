"""A database whose encoding is not UTF-8 (LATIN1): a value it cannot hold (an emoji) is the
request's fault, a 400 naming the parameter, never a 500; and a state database in LATIN1 still
logs the request, the value backslash-escaped."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter.schema.migrate import upgrade
from tests.support.app import in_process_app
from tests.support.database import ExportDatabase, new_key, run_sql, with_database

EMOJI = "\U0001f600"


@pytest.fixture(scope="module")
def latin1_url(database: ExportDatabase) -> Iterator[str]:
    name = f"exporter_test_latin1_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url,
        f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    url = with_database(database.url, name)
    try:
        run_sql(
            url,
            "CREATE TABLE public.people (id int PRIMARY KEY, name text)",
            "INSERT INTO public.people VALUES (1, NULL), (2, 'Zoë')",
        )
        upgrade(url)
        yield url
    finally:
        run_sql(database.url, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def latin1_exports(
    database: ExportDatabase, latin1_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """Exports from the LATIN1 database; keys and the log in the (UTF-8) test database."""
    with in_process_app(
        latin1_url,
        tmp_path_factory.mktemp("latin1"),
        database.key,
        state_database_url=database.url,
    ) as client:
        yield client


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"null": EMOJI}, "null"),
        ({"name": f"eq.{EMOJI}"}, "name"),
        ({"name": f"in.(a,{EMOJI})"}, "name"),
        ({"name": f"like.*{EMOJI}*"}, "name"),
    ],
)
def test_a_value_the_database_cannot_hold_is_a_400(
    latin1_exports: httpx.Client, params: dict[str, str], parameter: str
) -> None:
    response = latin1_exports.get("/datasets/people.csv", params=params)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert [p["name"] for p in problem["invalid-params"]] == [parameter]
    assert "encoding" in problem["detail"]


def test_what_the_database_can_hold_is_exported(
    latin1_exports: httpx.Client,
) -> None:
    response = latin1_exports.get("/datasets/people.csv", params={"name": "eq.Zoë", "null": "ø"})
    assert response.status_code == 200, response.text
    assert response.text == "id,name\n2,Zoë\n"
    # The Excel profile's rule names non-LATIN1 characters (\u3000) as regex escapes only.
    excel = latin1_exports.get("/datasets/people.csv", params={"profile": "excel"})
    assert excel.status_code == 200, excel.text
    assert excel.text == "\ufeffid,name\r\n1,\r\n2,Zoë\r\n"


def test_a_latin1_state_database_logs_the_request_escaped(latin1_url: str, tmp_path: Path) -> None:
    key = new_key(latin1_url)
    with in_process_app(latin1_url, tmp_path, key) as client:
        response = client.get(
            "/datasets/people.csv", params={"null": EMOJI}, headers={"X-Request-Id": "emoji"}
        )
        assert response.status_code == 400, response.text
        # A job's parameters are kept exactly, to run it: a state database that cannot hold
        # one refuses the job.
        submitted = client.post(
            "/exports",
            json={"dataset": "people", "format": "csv", "params": {"name": f"eq.{EMOJI}"}},
        )
        assert submitted.status_code == 400, submitted.text
    ((parameters, status),) = run_sql(
        latin1_url,
        "SELECT parameters::text, status FROM exporter.export_log WHERE request_id = 'emoji'",
    )
    assert status == 400
    assert "\\\\U0001f600" in parameters
