"""`exporter demo`: no configuration at all; an embedded PostgreSQL in a local directory."""

import asyncio
import os
import sys
from pathlib import Path

from exporter.settings import Settings


async def _prepare(settings: Settings, rows: int) -> str:
    from sqlalchemy import delete

    from exporter.auth import create_key
    from exporter.db import create_engine
    from exporter.demo import seed
    from exporter.models import api_keys

    engine = create_engine(settings.database_url, pool_size=1)
    try:
        await seed(engine, rows)
        # Keys are shown once; a demo run replaces its key rather than reusing a lost one.
        async with engine.begin() as conn:
            await conn.execute(delete(api_keys).where(api_keys.c.name == "demo"))
        return await create_key(engine, "demo")
    finally:
        await engine.dispose()


def run_demo(data_dir: Path, host: str, port: int, rows: int) -> int:
    from exporter.cli import serve
    from exporter.embedded import EmbeddedPostgres
    from exporter.migrate import upgrade

    print(f"starting embedded PostgreSQL in {data_dir.resolve()} ...", file=sys.stderr)
    postgres = EmbeddedPostgres(data_dir.resolve())
    url = postgres.start()
    try:
        os.environ["EXPORTER_DATABASE_URL"] = url
        settings = Settings()
        upgrade(settings.state_url)
        print(f"seeding demo data ({rows:,} events; once per data directory) ...", file=sys.stderr)
        key = asyncio.run(_prepare(settings, rows))
        base = f"http://{host}:{port}"
        auth = f'-H "Authorization: Bearer {key}"'
        print(
            f"""
exporter demo is ready. Try:

  curl {auth} {base}/datasets
  curl -OJ {auth} '{base}/datasets/events.csv'
  curl {auth} '{base}/datasets/events.ndjson?select=id,kind,amount&kind=eq.purchase&limit=5'
  curl {auth} '{base}/datasets/customers.csv?country=in.(DE,FR)&order=signed_up.desc'

API docs: {base}/docs   (Ctrl-C stops the server and the embedded PostgreSQL)
""",
            file=sys.stderr,
        )
        serve(host, port, workers=1)
    finally:
        postgres.stop()
    return 0
