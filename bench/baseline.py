"""The fetch-everything pattern the service exists to avoid: every row into a list, the whole
CSV into one string, then "sent" (to /dev/null). Run as its own process by the harness, so its
peak RSS is its own: `python -m bench.baseline DATABASE_URL TABLE`; prints JSON."""

import asyncio
import csv
import io
import json
import os
import resource
import sys
import time
from typing import Any

import asyncpg


async def fetch_all(database_url: str, table: str) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[Any] = await conn.fetch(f'SELECT * FROM public."{table}"')
        return rows
    finally:
        await conn.close()


def main() -> None:
    database_url, table = sys.argv[1:3]
    started = time.perf_counter()
    rows = asyncio.run(fetch_all(database_url, table))
    fetched = time.perf_counter()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if rows:
        writer.writerow(list(rows[0].keys()))
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    with open(os.devnull, "wb") as sink:
        sink.write(data)
    ended = time.perf_counter()
    result = {
        "rows": len(rows),
        "bytes": len(data),
        "fetch_s": fetched - started,
        "total_s": ended - started,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
