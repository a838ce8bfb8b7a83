"""The measurements. Each round runs every measurement once, in a fixed order, so that a
change in the machine's load lands on all of them alike; the report takes medians."""

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import clients
from bench.server import (
    REPO,
    RssSampler,
    Server,
    start_server,
    stop_server,
    vm_hwm_bytes,
)
from bench.table import SMALL_TABLE, TABLE, BenchDatabase

PSQL_CSV = f"\\copy (select * from {TABLE}) to stdout (format csv, header)"
PSQL_JSON = f"\\copy (select row_to_json(t) from {TABLE} t) to stdout"
# Issue 14's long in.() filter, on the unindexed `quantity`: 1,799 values, about 17,000 rows.
# psql's query has the list as a constant, which PostgreSQL hashes.
IN_ITEMS = ",".join(str(n) for n in range(1799))
IN_QUERY = f"?quantity=in.({IN_ITEMS})"
PSQL_IN = (
    f"\\copy (select * from {TABLE} where quantity in ({IN_ITEMS}) order by id)"
    " to stdout (format csv, header)"
)
CONCURRENT_CLIENTS = 8
CONCURRENT_WORKERS = 2
CODINGS = ("gzip", "zstd")

Runs = dict[str, list[dict[str, Any]]]


@dataclass
class Bench:
    database: BenchDatabase
    key: str
    log_dir: Path
    skip_baseline: bool
    log: Any
    runs: Runs = field(default_factory=dict)
    codings: list[str] = field(default_factory=list)  # those the server offers

    def record(self, name: str, **values: Any) -> None:
        self.runs.setdefault(name, []).append(values)

    def url(self, server: Server, table: str, extension: str, query: str = "") -> str:
        return f"{server.base_url}/datasets/{table}.{extension}{query}"

    def warm_up(self, server: Server, table: str) -> None:
        """Pools, catalog and code paths warmed, as on a server that has been up a while."""
        urls = [self.url(server, table, ext, "?limit=1") for ext in ("csv", "ndjson")]
        # Several at once, so that each worker of a multi-worker server likely gets some.
        clients.fetch_concurrently(urls * max(1, 4 * (server.workers - 1)), self.key)
        clients.fetch_concurrently(urls, self.key)

    def export(self, server: Server, name: str, url: str, coding: str | None = None) -> RssSampler:
        with RssSampler(server) as rss:
            result = clients.fetch(url, self.key, coding)
        if coding and result.content_encoding != coding:
            raise RuntimeError(f"{url}: asked for {coding}, got {result.content_encoding!r}")
        self.record(
            name,
            **asdict(result),
            server_cpu_s=rss.cpu_s,
            server_peak_rss_bytes=rss.peak_total,
            rss_samples=rss.samples,
        )
        self.log(
            f"  {name}: {result.wall_s:.2f} s, {result.bytes / 1e6:.1f} MB, "
            f"TTFB {result.ttfb_s * 1000:.0f} ms, server peak RSS {rss.peak_total / 2**20:.1f} MiB"
        )
        return rss

    def psql(self, name: str, command: str) -> None:
        run = clients.psql_copy(self.database.url, command)
        self.record(name, **asdict(run))
        self.log(f"  {name}: {run.wall_s:.2f} s")

    def idle(self, server: Server) -> dict[str, int]:
        """RSS of the warmed, idle server, and its USS (what is not shared libraries)."""
        with RssSampler(server) as rss:
            pass
        return {"idle_rss_bytes": rss.peak_total, "idle_uss_bytes": server.uss()}

    def round(self) -> None:
        self.main_exports()
        if not self.skip_baseline:
            self.baseline()
        self.small_exports()
        self.concurrency()

    def main_exports(self) -> None:
        """On a fresh, warmed server: our CSV and NDJSON of the big table, each right after the
        psql reference it is compared with, then the CSV compressed with each coding the server
        offers (`curl --compressed`, asking for that coding)."""
        server = start_server(self.database.url, self.log_dir)
        try:
            self.warm_up(server, TABLE)
            idle = self.idle(server)
            self.psql("psql_csv", PSQL_CSV)
            csv = self.export(server, "ours_csv", self.url(server, TABLE, "csv"))
            self.psql("psql_json", PSQL_JSON)
            ndjson = self.export(server, "ours_ndjson", self.url(server, TABLE, "ndjson"))
            self.psql("psql_in", PSQL_IN)
            self.export(server, "ours_in", self.url(server, TABLE, "csv", IN_QUERY))
            self.record(
                "memory_big",
                **idle,
                peak_rss_bytes=max(csv.peak_total, ndjson.peak_total),
                vm_hwm_bytes=vm_hwm_bytes(server.process.pid),
            )
            # Probed only now: the first zstd request imports zstandard, which the memory
            # figures above (compared with a server that never compresses) must not include.
            # Large enough for a compressing middleware's minimum size.
            probe_url = self.url(server, TABLE, "csv", "?limit=1000")
            self.codings = [
                coding
                for coding in CODINGS
                if clients.curl_decodes(coding)
                and clients.fetch(probe_url, self.key, coding).content_encoding == coding
            ]
            for coding in self.codings:
                url = self.url(server, TABLE, "csv")
                self.export(server, f"ours_csv_{coding}", url, coding=coding)
        finally:
            stop_server(server)

    def small_exports(self) -> None:
        """The same exports of the small table on a fresh server warmed the same way: the
        peak should not depend on the table's size."""
        server = start_server(self.database.url, self.log_dir)
        try:
            self.warm_up(server, SMALL_TABLE)
            idle = self.idle(server)
            csv = self.export(server, "small_csv", self.url(server, SMALL_TABLE, "csv"))
            ndjson = self.export(server, "small_ndjson", self.url(server, SMALL_TABLE, "ndjson"))
            self.record(
                "memory_small",
                **idle,
                peak_rss_bytes=max(csv.peak_total, ndjson.peak_total),
                vm_hwm_bytes=vm_hwm_bytes(server.process.pid),
            )
        finally:
            stop_server(server)

    def baseline(self) -> None:
        command = [sys.executable, "-m", "bench.baseline", self.database.url, TABLE]
        started = clients.Running(command)
        done = started.finish()
        result = json.loads(done.stdout)
        self.record("baseline", wall_s=done.wall_s, **result)
        self.log(
            f"  baseline: {done.wall_s:.2f} s, peak RSS {result['max_rss_bytes'] / 2**20:.0f} MiB"
        )

    def concurrency(self) -> None:
        """One export, then CONCURRENT_CLIENTS at once, on a fresh `--workers 2` server."""
        server = start_server(self.database.url, self.log_dir, workers=CONCURRENT_WORKERS)
        try:
            self.warm_up(server, TABLE)
            url = self.url(server, TABLE, "csv")
            with RssSampler(server) as single_rss:
                single = clients.fetch(url, self.key)
            workers = server.worker_pids()
            with RssSampler(server) as rss:
                wall_s, results = clients.fetch_concurrently([url] * CONCURRENT_CLIENTS, self.key)
            sizes = {r.bytes for r in results}
            if sizes != {single.bytes}:
                raise RuntimeError(f"concurrent exports differ in size: {sizes} vs {single.bytes}")
            self.record(
                "concurrency",
                workers=CONCURRENT_WORKERS,
                clients=CONCURRENT_CLIENTS,
                single_wall_s=single.wall_s,
                single_bytes=single.bytes,
                single_peak_worker_rss_bytes=single_rss.peak_worker(workers),
                wall_s=wall_s,
                bytes=sum(r.bytes for r in results),
                client_wall_s=[r.wall_s for r in results],
                client_ttfb_s=[r.ttfb_s for r in results],
                peak_worker_rss_bytes=rss.peak_worker(workers),
                peak_tree_rss_bytes=rss.peak_total,
                worker_vm_hwm_bytes=[vm_hwm_bytes(pid) for pid in workers],
                server_cpu_s=rss.cpu_s,
            )
            ratio = (sum(r.bytes for r in results) / wall_s) / (single.bytes / single.wall_s)
            self.log(
                f"  concurrency: one {single.wall_s:.2f} s, {CONCURRENT_CLIENTS} in {wall_s:.2f} s "
                f"(aggregate {ratio:.2f}x), peak worker RSS "
                f"{rss.peak_worker(workers) / 2**20:.1f} MiB"
            )
        finally:
            stop_server(server)


def reference_sizes(database_url: str) -> dict[str, int]:
    """Bytes of each psql reference, from untimed runs that also warm the caches."""
    return {
        "psql_csv": clients.psql_copy_bytes(database_url, PSQL_CSV),
        "psql_json": clients.psql_copy_bytes(database_url, PSQL_JSON),
        "psql_in": clients.psql_copy_bytes(database_url, PSQL_IN),
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
