"""Background export jobs through real servers: submitted, claimed through PostgreSQL, written to
a gzip file, downloaded (resumably), cancelled, and finished elsewhere when their worker dies."""

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.database import ExportDatabase, new_key, run_sql
from tests.support.jobs import slow_view, submit, wait_for
from tests.support.server import Server, running_server

JOB_FILES = Path(f"/tmp/exporter-test-jobs-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def job_server(
    database: ExportDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("jobs")
    # A short lease: a cancellation is noticed within a third of it.
    try:
        with running_server(
            database.url,
            directory,
            job_dir=str(JOB_FILES),
            job_poll_s="0.5",
            job_concurrency="1",
            job_lease_s="1.5",
        ) as server:
            yield server
    finally:
        shutil.rmtree(JOB_FILES, ignore_errors=True)


def test_a_job_runs_and_its_file_is_the_direct_export(
    job_server: Server, database: ExportDatabase
) -> None:
    with job_server.client(database.key) as client:
        direct = client.get("/datasets/big.csv")
        assert direct.status_code == 200
        info = submit(client, {"dataset": "big", "format": "csv"})
        assert info["status"] == "queued"
        done, seen = wait_for(client, info["id"], "done", "failed")
        assert done["status"] == "done", done
        assert done["rows"] == 1_000_000 and done["bytes"] == len(direct.content)
        assert done["cursor"] and done["expires_at"] and done["finished_at"]
        head = client.head(info["status_url"])
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == "application/json"
        # Progress was visible while it ran, never going back.
        counts = [rows for status, rows in seen if status == "running" and rows is not None]
        assert counts == sorted(counts)

        identity = client.get(done["download_url"])
        assert identity.status_code == 200
        assert identity.content == direct.content
        assert identity.headers["accept-ranges"] == "bytes"
        assert identity.headers["etag"] and identity.headers["last-modified"]
        assert identity.headers["content-disposition"].startswith('attachment; filename="big-')

        # Seek points every 16 MiB of the export, and one at its end: a range from the middle
        # inflates from the last point before it.
        (points, file_bytes) = run_sql(
            database.url,
            f"SELECT seek_points, file_bytes FROM exporter.jobs WHERE id = '{info['id']}'",
        )[0]
        assert len(points) == 3 * (len(direct.content) // (16 * 1024 * 1024) + 1)
        assert points[-3] == len(direct.content) and points[-2] == file_bytes
        middle = len(direct.content) // 2 + 7
        ranged = client.get(done["download_url"], headers={"Range": f"bytes={middle}-"})
        assert (ranged.status_code, ranged.content) == (206, direct.content[middle:])

        with client.stream(
            "GET", done["download_url"], headers={"Accept-Encoding": "gzip"}
        ) as stored:
            assert stored.headers["content-encoding"] == "gzip"
            # As stored, undecoded.
            assert gzip.decompress(b"".join(stored.iter_raw())) == direct.content


def test_an_interrupted_download_resumes_with_curl(
    job_server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    with job_server.client(database.key) as client:
        direct = client.get("/datasets/small_copy.ndjson").content
        info = submit(client, {"dataset": "small_copy", "format": "ndjson"})
        done, _ = wait_for(client, info["id"], "done", "failed")
        assert done["status"] == "done", done
    target = tmp_path / "small_copy.ndjson"
    # The first part of a download whose connection broke.
    target.write_bytes(direct[: len(direct) // 2 + 12345])
    subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-C",
            "-",
            "-H",
            f"Authorization: Bearer {database.key}",
            "-o",
            str(target),
            job_server.base_url + done["download_url"],
        ],
        check=True,
        timeout=60,
    )
    assert target.read_bytes() == direct


def test_jobs_take_the_parameters_of_a_direct_export(
    job_server: Server, database: ExportDatabase
) -> None:
    with job_server.client(database.key) as client:
        params = {"select": "id,label", "id": "lte.3", "order": "id.desc"}
        direct = client.get("/datasets/big.ndjson", params=params).content
        info = submit(client, {"dataset": "big", "format": "ndjson", "params": params})
        done, _ = wait_for(client, info["id"], "done", "failed")
        assert client.get(done["download_url"]).content == direct
        assert direct.count(b"\n") == 3


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"dataset": "nope", "format": "csv"}, 404, "no dataset named"),
        ({"dataset": "big", "format": "xml"}, 400, "format"),
        ({"dataset": "big", "format": "csv", "params": {"nope": "eq.1"}}, 400, "unknown column"),
        ({"dataset": "big", "format": "csv", "params": {"since": "garbage"}}, 400, "cursor"),
        ({"dataset": "big", "format": "csv", "params": {"delimiter": "xx"}}, 400, "delimiter"),
        ({"format": "csv"}, 400, "dataset"),
        ({"dataset": "people", "format": "ndjson", "params": {"deletes": "true"}}, 400, "tracked"),
        ({"dataset": "people", "format": "csv", "params": {"deletes": "true"}}, 400, "NDJSON"),
    ],
)
def test_a_job_the_export_would_refuse_is_refused_at_once(
    job_server: Server, database: ExportDatabase, body: dict[str, Any], status: int, words: str
) -> None:
    with job_server.client(database.key) as client:
        response = client.post("/exports", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert words in response.text


def test_a_job_is_its_keys_alone(job_server: Server, database: ExportDatabase) -> None:
    with job_server.client(database.key) as client:
        info = submit(client, {"dataset": "people", "format": "csv"})
    with job_server.client(new_key(database.url)) as other:
        for method, path in [
            ("GET", info["status_url"]),
            ("GET", info["download_url"]),
            ("DELETE", info["status_url"]),
        ]:
            assert other.request(method, path).status_code == 404
    with job_server.client(new_key(database.url, admin=True)) as admin:
        assert admin.get(info["status_url"]).status_code == 200
    with job_server.client(None) as anonymous:
        assert anonymous.get(info["status_url"]).status_code == 401


def test_an_admin_key_sees_other_keys_jobs_only_within_its_scope_and_role(
    job_server: Server, database: ExportDatabase
) -> None:
    """Issue 14, defect 1: a scoped admin key reached every key's job. Outside its scope or
    its role's grants, another key's job is the 404 of a job that does not exist."""
    role = f"narrow_{uuid.uuid4().hex[:8]}"
    run_sql(
        database.url, f'CREATE ROLE "{role}" NOLOGIN', f'GRANT SELECT ON public.big TO "{role}"'
    )
    try:
        with job_server.client(database.key) as owner:
            info = submit(owner, {"dataset": "people", "format": "csv"})
            wait_for(owner, info["id"], "done", "failed")
        routes = [("GET", ""), ("HEAD", ""), ("GET", "/download"), ("GET", "/events")]
        routes.append(("DELETE", ""))  # last: were it to get through, the job would be gone
        unknown = f"/exports/{uuid.uuid4().hex}"
        for outsider in (
            new_key(database.url, admin=True, datasets=["big"]),
            new_key(database.url, admin=True, role=role),
        ):
            with job_server.client(outsider) as admin:
                for method, route in routes:
                    theirs = admin.request(method, f"{info['status_url']}{route}")
                    none = admin.request(method, f"{unknown}{route}")
                    assert theirs.status_code == none.status_code == 404, (method, route)
                    if method != "HEAD":
                        assert theirs.json()["detail"] == none.json()["detail"]
        # An export of its own under the job's id (request ids are the client's to choose)
        # shows the scoped admin its own events only, never the job's.
        with job_server.client(new_key(database.url, admin=True, datasets=["big"])) as admin:
            own = admin.get("/datasets/big.csv?limit=1", headers={"X-Request-Id": info["id"]})
            assert own.status_code == 200
            events = admin.get(info["events_url"])
            assert events.status_code == 200 and "event: done" in events.text
            assert "download_url" not in events.text, events.text
        with job_server.client(new_key(database.url, admin=True)) as admin:
            assert admin.get(info["status_url"]).json()["status"] == "done"
            assert admin.get(info["download_url"]).status_code == 200
            assert "event: done" in admin.get(info["events_url"]).text
        with job_server.client(database.key) as owner:
            assert owner.get(info["status_url"]).json()["status"] == "done"
    finally:
        run_sql(database.url, f'REVOKE ALL ON public.big FROM "{role}"', f'DROP ROLE "{role}"')


def test_deleting_a_finished_job_removes_its_file(
    job_server: Server, database: ExportDatabase
) -> None:
    with job_server.client(database.key) as client:
        info = submit(client, {"dataset": "people", "format": "csv"})
        done, _ = wait_for(client, info["id"], "done", "failed")
        assert client.get(done["download_url"]).status_code == 200
        deleted = client.delete(info["status_url"])
        assert deleted.status_code == 200 and deleted.json()["status"] == "expired"
        gone = client.get(done["download_url"])
        assert gone.status_code == 410, gone.text


def test_a_running_job_is_cancelled(job_server: Server, database: ExportDatabase) -> None:
    view = slow_view(database)
    try:
        with job_server.client(database.key) as client:
            info = submit(client, {"dataset": view, "format": "csv"})
            wait_for(client, info["id"], "running")
            assert client.delete(info["status_url"]).json()["status"] == "running"
            cancelled, _ = wait_for(client, info["id"], "cancelled", "done", "failed")
            assert cancelled["status"] == "cancelled"
            assert client.get(info["download_url"]).status_code == 410
        assert list(JOB_FILES.glob(f"{info['id']}*")) == []
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def run_job_cli(server: Server, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["EXPORTER_URL"] = server.base_url
    if key is not None:
        env["EXPORTER_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "exporter", "export", *args, "--job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_runs_an_export_as_a_job(
    job_server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    target = tmp_path / "big.ndjson"
    result = run_job_cli(
        job_server,
        database.key,
        "big",
        "--format",
        "ndjson",
        "--where",
        "id=lte.5000",
        "--select",
        "id,label",
        "-o",
        str(target),
    )
    assert result.returncode == 0, result.stderr
    assert "5000 rows" in result.stderr and "(job " in result.stderr
    with job_server.client(database.key) as client:
        direct = client.get(
            "/datasets/big.ndjson", params={"id": "lte.5000", "select": "id,label"}
        ).content
    assert target.read_bytes() == direct
    assert not target.with_name("big.ndjson.part").exists()


def test_the_cli_says_why_a_job_cannot_run(
    job_server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    target = tmp_path / "x.csv"
    refused = run_job_cli(job_server, database.key, "nope", "-o", str(target))
    assert refused.returncode == 2 and "404" in refused.stderr and "nope" in refused.stderr
    keyless = run_job_cli(job_server, None, "big", "-o", str(target))
    assert keyless.returncode == 2 and "EXPORTER_KEY" in keyless.stderr
    assert "Traceback" not in refused.stderr + keyless.stderr
    assert not target.exists()


def test_a_keys_jobs_are_bounded_and_bodies_too(
    job_server: Server, database: ExportDatabase, tmp_path: Path
) -> None:
    view = slow_view(database, seconds=4)
    # This server runs no jobs (job_server does) and allows one per key.
    try:
        with running_server(database.url, tmp_path, max_jobs_per_key="1") as server:
            with server.client(new_key(database.url)) as client:
                submit(client, {"dataset": view, "format": "csv"})
                second = client.post("/exports", json={"dataset": view, "format": "csv"})
                assert second.status_code == 429 and second.headers["retry-after"]
                huge = client.post(
                    "/exports",
                    content=json.dumps({"dataset": view, "format": "csv", "x": "y" * 100_000}),
                    headers={"Content-Type": "application/json"},
                )
                assert huge.status_code == 413, huge.text
                chunked = client.post(
                    "/exports", content=iter([b'{"dataset": "people", "format": "csv"}'])
                )
                assert chunked.status_code == 411, chunked.text
    finally:
        run_sql(database.url, f"DROP VIEW {view}")


def test_job_files_are_for_the_service_user_only(
    job_server: Server, database: ExportDatabase
) -> None:
    """0600 files in a 0700 directory that the service made (issue 14, defect 8), whatever
    the umask (the server's is the test's, typically 022)."""
    with job_server.client(database.key) as client:
        info = submit(client, {"dataset": "people", "format": "csv"})
        done, _ = wait_for(client, info["id"], "done", "failed")
        assert done["status"] == "done", done
    assert stat.S_IMODE(JOB_FILES.stat().st_mode) == 0o700
    files = list(JOB_FILES.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), [
        (f.name, oct(f.stat().st_mode)) for f in files
    ]
