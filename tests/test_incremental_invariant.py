"""The invariant of incremental pulls, against a real server while writers run: a copy kept by a
full export and then `since=` pulls never misses a committed row version (late commits,
savepoints and PL/pgSQL exception blocks included), never shows one that was rolled back, and
repeats versions only as far as X-Export-Possibly-Repeated admits (tracked mode: never).
The workload is tests/support/workload.py; bench/soak_incremental.py runs it for minutes."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import ExportDatabase, new_key, run_sql
from tests.support.server import running_server
from tests.support.workload import Mode, Outcome, Workload, run_workload

WRITE_SECONDS = 5.0
SHOWN = 40  # problems shown in a failure message, of however many


def exporter_cli(database: ExportDatabase, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env={**os.environ, "EXPORTER_DATABASE_URL": database.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"exporter {' '.join(args)}: {done.stderr}"


@pytest.fixture(params=["snapshot", "tracked", "track-midway"])
def table(
    database: ExportDatabase, request: pytest.FixtureRequest
) -> Iterator[tuple[Mode, Workload]]:
    mode: Mode = request.param
    workload = Workload(f"invariant_{mode.replace('-', '_')}")
    run_sql(database.url, *workload.setup_sql())
    if mode == "tracked":
        exporter_cli(database, "track", workload.name)
    try:
        yield mode, workload
    finally:
        if mode != "snapshot":
            exporter_cli(database, "untrack", workload.name)
        run_sql(database.url, *workload.teardown_sql())


def shown(title: str, lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines[:SHOWN]) + more


def explain(outcome: Outcome, log: str) -> str:
    parts = [f"summary: {outcome.summary()}"]
    if outcome.problems:
        parts.append(shown("problems found pull by pull", outcome.problems))
    if outcome.differences:
        parts.append(shown("the copy against the table after the last pull", outcome.differences))
    parts.append("server log (tail):\n" + "\n".join(log.splitlines()[-20:]))
    return "\n".join(parts)


def test_pulls_keep_an_exact_copy_while_writers_run(
    database: ExportDatabase, table: tuple[Mode, Workload], tmp_path: Path
) -> None:
    mode, workload = table

    def track() -> None:
        exporter_cli(database, "track", workload.name)

    key = new_key(database.url)
    # Two worker processes: a pull need not reach the process that issued its cursor.
    with running_server(database.url, tmp_path, workers=2) as server:
        outcome = asyncio.run(
            run_workload(
                database.url,
                server.base_url,
                key,
                workload,
                mode,
                WRITE_SECONDS,
                track=track if mode == "track-midway" else None,
            )
        )
    print(outcome.summary())
    assert not outcome.problems and not outcome.differences, explain(outcome, server.log())

    # The run exercised what it is about: the kinds of writes that land late or not at all.
    for kind in (
        "late commits (open across 2+ pulls)",
        "savepoints released",
        "savepoints rolled back",
        "subtransaction caches overflowed",
        "exception blocks committed",
        "exception blocks rolled back",
        "rolled back transactions",
        "committed deletes",
        "key changes",
        "rows updated by multi-row updates",
    ):
        assert outcome.stats[kind] >= 1, f"no {kind}: {outcome.summary()}"
    pulls = outcome.pulls[1:]
    assert len(pulls) >= 10, outcome.summary()
    assert sum(p.rows for p in pulls) > 0
    if mode == "tracked":
        assert sum(p.tombstones for p in pulls) > 0, outcome.summary()
    if mode == "track-midway":
        # Pulls in snapshot mode, then (from the first cursor that saw tracking begin) tracked.
        modes = [p.mode for p in pulls]
        assert "snapshot" in modes and "tracked" in modes, modes
