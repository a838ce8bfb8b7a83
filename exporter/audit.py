"""The export log: one row per export, written when it starts and completed when it ends."""

import logging
from typing import Any

import anyio
from sqlalchemy import func, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.models import export_log

log = logging.getLogger(__name__)


async def record_start(
    engine: AsyncEngine,
    *,
    request_id: str,
    key_name: str | None,
    dataset: str,
    format: str,
    parameters: dict[str, Any],
    client_addr: str | None,
) -> int:
    async with engine.begin() as conn:
        result = await conn.execute(
            insert(export_log)
            .values(
                request_id=request_id,
                key_name=key_name,
                dataset=dataset,
                format=format,
                parameters=parameters,
                client_addr=client_addr,
                outcome="running",
            )
            .returning(export_log.c.id)
        )
        return int(result.scalar_one())


async def record_end(
    engine: AsyncEngine,
    export_id: int,
    *,
    outcome: str,
    rows: int,
    bytes_sent: int,
    error: str | None = None,
) -> None:
    # Runs while the request is being torn down (the client may have left): shielded, bounded.
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    update(export_log)
                    .where(export_log.c.id == export_id)
                    .values(
                        outcome=outcome,
                        rows=rows,
                        bytes=bytes_sent,
                        error=error,
                        ended_at=func.clock_timestamp(),
                    )
                )
        except Exception:
            log.exception("could not complete export log entry %s", export_id)
