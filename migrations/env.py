"""Alembic environment: async, configured from Settings (no alembic.ini needed)."""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from exporter.db.pool import connect_url
from exporter.schema.models import metadata
from exporter.settings import OWN_SCHEMA, Settings

config = context.config


def _url() -> str:
    configured = config.get_main_option("sqlalchemy.url") or Settings().state_url
    # SQLAlchemy reaches PostgreSQL through asyncpg, as the service does.
    return "postgresql+asyncpg://" + connect_url(configured).partition("://")[2]


def _migrate(connection: Connection) -> None:
    # Several `exporter migrate` at once (replicas starting together) would race to create the
    # schema and the tables; the lock, held to the end of the one transaction, queues them, and
    # the later ones find nothing left to do.
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('exporter migrate'))"))
    # The version table lives in the own schema, which must exist before Alembic looks for it.
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{OWN_SCHEMA}"'))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=OWN_SCHEMA,
        include_schemas=True,
        include_name=lambda name, type_, parent: type_ != "schema" or name == OWN_SCHEMA,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run())
