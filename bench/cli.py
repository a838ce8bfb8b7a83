"""uv run python -m bench [--rows N] [--repeat N] [--database-url URL] [--output FILE]
[--skip-baseline]: issue 3's measurements, printed as one table and written as JSON."""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import report
from bench.run import Bench, git_state, reference_sizes
from bench.server import REPO, create_key, migrate, revoke_key
from bench.table import prepare, server_version

DEFAULT_ROWS = 2_000_000


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--rows", type=int, default=DEFAULT_ROWS, help="rows in the big table (default 2M)"
    )
    parser.add_argument(
        "--small-rows",
        type=int,
        help="rows in the small table of the memory comparison (default: rows / 10)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--database-url",
        help="a database to use as is (default: database exporter_bench on "
        "postgresql://postgres@127.0.0.1:5432, created if missing)",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON results (default: bench/results/<timestamp>.json)"
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="skip the (slow) fetch-everything baseline"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.rows < 10 or args.repeat < 1:
        sys.exit("--rows must be at least 10 and --repeat at least 1")
    small_rows = args.small_rows or args.rows // 10
    started = datetime.datetime.now(datetime.UTC)
    output = args.output or REPO / "bench" / "results" / f"{started:%Y%m%dT%H%M%SZ}.json"
    load_before = report.load()
    log(f"load before: {load_before['uptime']}")
    if load_before["loadavg"][0] > 0.5 * (os.cpu_count() or 1):
        log("warning: the machine is busy; figures will be noisy (the load is in the JSON)")

    database = prepare(args.database_url, args.rows, small_rows, log)
    migrate(database.url)
    key_name, key = create_key(database.url)
    log_dir = Path(tempfile.mkdtemp(prefix="exporter-bench-"))
    try:
        log("sizing the psql references (untimed; also warms the caches)")
        sizes = reference_sizes(database.url)
        bench = Bench(database, key, log_dir, args.skip_baseline, log)
        for number in range(1, args.repeat + 1):
            log(f"round {number} of {args.repeat}")
            bench.round()
    except BaseException:
        log(f"failed; the servers' logs are in {log_dir}")
        raise
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    finally:
        revoke_key(database.url, key_name)
    load_after = report.load()
    log(f"load after: {load_after['uptime']}")

    lines = report.summarize(bench.runs, sizes)
    table = report.render(lines)
    sys.stderr.flush()
    print(
        f"{args.rows:,} rows (small table {small_rows:,}), {args.repeat} rounds, medians; "
        f"psql CSV {sizes['psql_csv'] / 1e6:.0f} MB, JSON {sizes['psql_json'] / 1e6:.0f} MB"
    )
    print(table)
    result = {
        "started": started.isoformat(),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "options": {
            "rows": args.rows,
            "small_rows": small_rows,
            "repeat": args.repeat,
            "skip_baseline": args.skip_baseline,
            "database": make_url(database.url).render_as_string(hide_password=True),
            "tables_created": database.created,
        },
        "git": git_state(),
        "machine": report.machine(server_version(database.url)),
        "load": {"before": load_before, "after": load_after},
        "bytes": {
            **sizes,
            **{name: runs[-1]["bytes"] for name, runs in bench.runs.items() if "bytes" in runs[-1]},
        },
        "codings_offered": bench.codings,
        "summary": report.as_json(lines),
        "table": table,
        "runs": bench.runs,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {output}")
