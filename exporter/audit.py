"""The export log: one row per export, written when it starts and completed when it ends."""

import json
import logging
from typing import Any

import anyio

from exporter.db import Pool

log = logging.getLogger(__name__)


async def record_start(
    pool: Pool,
    *,
    request_id: str,
    key_name: str | None,
    dataset: str,
    format: str,
    parameters: dict[str, Any],
    client_addr: str | None,
) -> int:
    async with pool.connection() as connection:
        export_id = await connection.fetchval(
            "INSERT INTO exporter.export_log"
            " (request_id, key_name, dataset, format, parameters, client_addr, outcome)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6, 'running') RETURNING id",
            request_id,
            key_name,
            dataset,
            format,
            json.dumps(parameters),
            client_addr,
        )
    return int(export_id)


async def record_end(
    pool: Pool,
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
            async with pool.connection() as connection:
                await connection.execute(
                    "UPDATE exporter.export_log"
                    " SET outcome = $2, rows = $3, bytes = $4, error = $5,"
                    " ended_at = clock_timestamp()"
                    " WHERE id = $1",
                    export_id,
                    outcome,
                    rows,
                    bytes_sent,
                    error,
                )
        except Exception:
            log.exception("could not complete export log entry %s", export_id)
