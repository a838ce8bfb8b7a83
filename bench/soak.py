"""uv run python -m bench.soak [--seconds 180] [--clients 16] [--keys 4] [--workers 2]
[--cut 0.3] [--database-url URL] [--output FILE]: a bounded soak of a real `exporter serve`.
Clients of several keys export the small benchmark table over and over (CSV and NDJSON, plain,
gzip and zstd, a random prefix of the table each time), a share of them leaving midway; every
transfer that is read to its end is checked row by row, and the server's memory and its
database backends are sampled. Reports wrong rows, 5xx answers, leaked backends and
tracebacks in the server log, and exits 1 unless all four are 0."""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.server import RssSampler, create_key, migrate, revoke_key, start_server, stop_server
from bench.table import SMALL_TABLE, prepare

LOG_FAULTS = ("Traceback", "Exception in ASGI application", "unhandled error")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180, help="how long clients run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--keys", type=int, default=4, help="keys the clients share")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--cut", type=float, default=0.3, help="share of transfers cut midway")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the big table")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--database-url",
        help="a database to use as is (default: the benchmark's, exporter_bench)",
    )
    parser.add_argument("--output", type=Path, help="also write the report as JSON")
    return parser


@dataclass
class Tally:
    transfers: int = 0
    verified: int = 0
    cut: int = 0
    wrong_rows: int = 0
    server_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, problem: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(problem)


def client_loop(
    base_url: str,
    keys: list[str],
    rows: int,
    cut_share: float,
    seed: int,
    until: float,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        key = rng.choice(keys)
        fmt = rng.choice(["csv", "ndjson"])
        coding = rng.choice(["identity", "gzip", "zstd"])
        wanted = rng.randint(1, rows)
        # Only numbers: a CSV line is a row, and the rows can be checked one by one.
        params = {"select": "id,quantity", "id": f"lte.{wanted}"}
        cut = rng.random() < cut_share
        headers = {"Authorization": f"Bearer {key}", "Accept-Encoding": coding}
        try:
            with (
                httpx.Client(base_url=base_url, headers=headers, timeout=60) as http,
                http.stream("GET", f"/datasets/{SMALL_TABLE}.{fmt}", params=params) as response,
            ):
                with tally.lock:
                    tally.transfers += 1
                    tally.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    with tally.lock:
                        tally.server_errors += 1
                    tally.note(f"{response.status_code}: {response.read()[:300]!r}")
                    continue
                if response.status_code != 200:
                    response.read()
                    continue
                if cut:
                    for i, _ in enumerate(response.iter_raw()):
                        if i >= rng.randint(0, 4):
                            break
                    with tally.lock:
                        tally.cut += 1
                    continue
                body = response.read()
        except httpx.HTTPError as exc:
            if not cut:
                with tally.lock:
                    tally.wrong_rows += 1
                tally.note(f"an uncut transfer broke: {exc!r}")
            continue
        if _checked(body, fmt, wanted, rows, tally):
            with tally.lock:
                tally.verified += 1


def _checked(body: bytes, fmt: str, wanted: int, rows: int, tally: Tally) -> bool:
    lines = body.decode().splitlines()
    if fmt == "csv":
        if lines[:1] != ["id,quantity"]:
            tally.note(f"csv header {lines[:1]!r}")
            return _wrong(tally)
        ids = [int(line.split(",")[0]) for line in lines[1:]]
    else:
        ids = [json.loads(line)["id"] for line in lines]
    expected = min(wanted, rows)
    if ids != list(range(1, expected + 1)):
        tally.note(f"{fmt} of {wanted}: {len(ids)} rows, not 1..{expected} in order")
        return _wrong(tally)
    return True


def _wrong(tally: Tally) -> bool:
    with tally.lock:
        tally.wrong_rows += 1
    return False


async def export_backends(url: str) -> list[dict[str, Any]]:
    """Backends of exports still in flight: named after a request, or not idle."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT pid, state, application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'exporter%' AND application_name <> 'exporter listen'"
            " AND (state <> 'idle' OR application_name <> 'exporter')"
        )
    finally:
        await connection.close()
    return [dict(row) for row in rows]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    database = prepare(args.database_url, args.rows, args.rows // 10, log)
    small_rows = args.rows // 10
    migrate(database.url)
    keys = [create_key(database.url) for _ in range(args.keys)]
    log_dir = Path(tempfile.mkdtemp(prefix="exporter-soak-"))
    server = start_server(database.url, log_dir, workers=args.workers)
    tally = Tally()
    backends_seen: list[int] = []
    try:
        until = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(
                    server.base_url,
                    [secret for _, secret in keys],
                    small_rows,
                    args.cut,
                    args.seed + i,
                    until,
                    tally,
                ),
            )
            for i in range(args.clients)
        ]
        log(f"{args.clients} clients, {args.keys} keys, --workers {args.workers}")
        with RssSampler(server, interval_s=0.2) as rss:
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                backends_seen.append(len(asyncio.run(export_backends(database.url))))
                time.sleep(1)
                log(
                    f"  {tally.transfers} transfers, {tally.verified} verified, {tally.cut} cut,"
                    f" RSS {rss.peak_total / 2**20:.0f} MiB"
                )
            workers = server.worker_pids()
        # Every export has ended: within a few seconds no backend is left holding one.
        deadline = time.monotonic() + 10
        while (
            leaked := asyncio.run(export_backends(database.url))
        ) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_server(server)
        for name, _ in keys:
            revoke_key(database.url, name)
    faults = [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if any(fault in line for fault in LOG_FAULTS)
    ]
    result = {
        "seconds": args.seconds,
        "clients": args.clients,
        "keys": args.keys,
        "workers": args.workers,
        "transfers": tally.transfers,
        "verified": tally.verified,
        "cut": tally.cut,
        "statuses": dict(sorted(tally.statuses.items())),
        "wrong_rows": tally.wrong_rows,
        "server_errors": tally.server_errors,
        "leaked_backends": len(leaked),
        "log_tracebacks": len(faults),
        "peak_backends_in_flight": max(backends_seen, default=0),
        "peak_worker_rss_mib": round(rss.peak_worker(workers) / 2**20, 1),
        "peak_tree_rss_mib": round(rss.peak_total / 2**20, 1),
        "problems": tally.problems[:20] + faults[:20] + [str(b) for b in leaked[:20]],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    for problem in result["problems"]:
        print(f"  {problem}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    # A soak that checked nothing, or met refusals other than the limits' 429, proves nothing.
    refused = sum(
        n for status, n in tally.statuses.items() if 400 <= status < 500 and status != 429
    )
    if tally.verified == 0 or refused:
        log(f"nothing was checked, or {refused} requests were refused: {dict(tally.statuses)}")
    failed = tally.wrong_rows or tally.server_errors or leaked or faults or refused
    failed = failed or not tally.verified
    if failed:
        log(f"the soak failed; the server's log is in {log_dir}")
        sys.exit(1)
    log(f"clean; the server's log is in {log_dir}")


if __name__ == "__main__":
    main()
