"""uv run python -m bench.soak_incremental [--seconds 300]
[--mode snapshot|tracked|track-midway|all] [--database-url URL]: the invariant of incremental
pulls (tests/test_incremental_invariant.py) held for minutes instead of seconds. Writers insert,
update and delete rows of a table of their own (late commits, savepoints, PL/pgSQL exception
blocks, rollbacks) while a poller keeps a copy by `since=` pulls from a real `exporter serve`;
reports pulls, rows, repeats and misses. Exits 1 if a pull missed a version, delivered one never
committed, or repeated more than its X-Export-Possibly-Repeated (tracked mode: any)."""

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.server import create_key, migrate, revoke_key, run_exporter, start_server, stop_server
from bench.table import default_database
from tests.support.workload import Mode, Outcome, Workload, run_statements, run_workload

SHOWN = 20
# Its own database by default: the benchmark's may be in use by a server of another version.
SOAK_DATABASE = "exporter_soak"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_incremental", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=300, help="how long writers run, each mode"
    )
    parser.add_argument(
        "--mode",
        choices=("snapshot", "tracked", "track-midway", "all"),
        default="all",
        help="track-midway: `exporter track` runs a third of the way in (default: all three)",
    )
    parser.add_argument(
        "--database-url",
        help="a database to use as is (default: database exporter_soak on "
        "postgresql://postgres@127.0.0.1:5432, created if missing)",
    )
    parser.add_argument("--writers", type=int, default=4, help="writer connections (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.02,
        help="at most this many seconds between a writer's transactions (default 0.02)",
    )
    parser.add_argument("--output", type=Path, help="also write the summaries as JSON")
    return parser


def soak(url: str, key: str, mode: Mode, args: argparse.Namespace, log_dir: Path) -> Outcome:
    workload = Workload(f"soak_incremental_{mode.replace('-', '_')}", writers=args.writers)
    asyncio.run(run_statements(url, workload.setup_sql()))
    if mode == "tracked":
        run_exporter(url, "track", workload.name)

    def track() -> None:
        run_exporter(url, "track", workload.name)

    server = start_server(url, log_dir, workers=args.workers)
    try:
        log(f"{mode}: writers run for {args.seconds:.0f} s")
        return asyncio.run(
            run_workload(
                url,
                server.base_url,
                key,
                workload,
                mode,
                args.seconds,
                pause_s=args.pause,
                progress=lambda line: log(f"{mode}: {line}"),
                track=track if mode == "track-midway" else None,
            )
        )
    finally:
        stop_server(server)
        if mode != "snapshot":
            run_exporter(url, "untrack", workload.name)
        asyncio.run(run_statements(url, workload.teardown_sql()))


def report(outcome: Outcome) -> dict[str, Any]:
    summary = outcome.summary()
    pulls = outcome.pulls[1:]
    misses = [p for p in outcome.problems if ": missed " in p]
    summary["misses"] = len(misses)
    summary["other problems"] = len(outcome.problems) - len(misses)
    summary["slowest pull (s)"] = round(max((p.ended - p.started for p in pulls), default=0), 3)
    print(f"\n{outcome.mode} mode")
    for name, value in summary.items():
        if name != "writers":
            print(f"  {name}: {value}")
    print("  writers: " + ", ".join(f"{k} {v}" for k, v in summary["writers"].items()))
    for title, lines in (("problems", outcome.problems), ("differences", outcome.differences)):
        for line in lines[:SHOWN]:
            print(f"  {title[:-1]}: {line}")
        if len(lines) > SHOWN:
            print(f"  ... {len(lines) - SHOWN} more {title}")
    return summary


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    url = args.database_url or default_database(SOAK_DATABASE)
    migrate(url)
    key_name, key = create_key(url)
    log_dir = Path(tempfile.mkdtemp(prefix="exporter-soak-"))
    modes: list[Mode] = (
        ["snapshot", "tracked", "track-midway"] if args.mode == "all" else [args.mode]
    )
    summaries = []
    failed = False
    try:
        for mode in modes:
            outcome = soak(url, key, mode, args, log_dir)
            summaries.append(report(outcome))
            failed = failed or bool(outcome.problems or outcome.differences)
    except BaseException:
        log(f"failed; the servers' logs are in {log_dir}")
        raise
    finally:
        revoke_key(url, key_name)
    if args.output:
        args.output.write_text(json.dumps(summaries, indent=2) + "\n")
    if failed:
        log(f"the invariant failed; the servers' logs are in {log_dir}")
        sys.exit(1)
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
