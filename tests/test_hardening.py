"""Issue 14's defects, each reproduced against a real `exporter serve`: inputs that reached a
500, values from requests that reached the server log raw."""

import time
from pathlib import Path

import httpx
import pytest

from tests.support.database import ExportDatabase
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
