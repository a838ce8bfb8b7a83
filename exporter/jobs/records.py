"""Background export jobs: their records in the state database.

A job is submitted (queued), claimed by one worker process of any replica (running, with a
lease it renews while it works), and ends done (a gzip file in the store), failed or cancelled;
a done job's file expires after the retention. Claims go through PostgreSQL: `FOR UPDATE SKIP
LOCKED` hands each queued job to one claimant, and a running job whose lease ran out (its
worker died) is claimed again. Every write of a running job is conditioned on the claim
(worker and attempt), so a worker that lost its lease cannot overwrite the job's new run.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from asyncpg import Record

from exporter.db.pool import Pool
from exporter.jobs.seekable_gzip import SeekPoint, flatten, unflatten

# NOTIFY channel: a submitted job wakes the claimants at once.
CHANNEL = "exporter_jobs"
STATUSES = ("queued", "running", "done", "failed", "cancelled", "expired")
# Advisory lock class of job submissions (per key); the limits and pruning use others.
_SUBMIT_LOCK = 0x45784A42
# A job that failed this many runs (its worker died each time) is failed for good.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Job:
    id: str
    key_id: int
    key_name: str
    dataset: str
    format: str
    params: tuple[tuple[str, str], ...]
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    attempts: int
    worker: str | None
    cancel_requested: bool
    rows: int | None
    bytes: int | None
    file_name: str | None
    file_bytes: int | None
    # Where inflating may start (exporter/jobs/seekable_gzip.py); empty for older files.
    seek_points: tuple[SeekPoint, ...]
    cursor: str | None
    error: str | None

    @classmethod
    def of(cls, row: Record) -> "Job":
        return cls(
            id=row["id"],
            key_id=row["key_id"],
            key_name=row["key_name"],
            dataset=row["dataset"],
            format=row["format"],
            params=tuple((str(n), str(v)) for n, v in json.loads(row["params"])),
            status=row["status"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            expires_at=row["expires_at"],
            attempts=row["attempts"],
            worker=row["worker"],
            cancel_requested=row["cancel_requested"],
            rows=row["rows"],
            bytes=row["bytes"],
            file_name=row["file_name"],
            file_bytes=row["file_bytes"],
            seek_points=unflatten(row["seek_points"]),
            cursor=row["cursor"],
            error=row["error"],
        )


async def submit(
    pool: Pool,
    job_id: str,
    key_id: int,
    key_name: str,
    dataset: str,
    format: str,
    params: list[tuple[str, str]],
    max_per_key: int,
) -> Job | None:
    """The queued job; None if the key has max_per_key jobs queued or running already."""
    async with pool.connection() as connection, connection.transaction():
        # One key's submissions at a time, so that the count below holds until the insert.
        await connection.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", _SUBMIT_LOCK, key_id % 2**31
        )
        row = await connection.fetchrow(
            "INSERT INTO exporter.jobs (id, key_id, key_name, dataset, format, params, status)"
            " SELECT $1, $2, $3, $4, $5, $6::jsonb, 'queued'"
            " WHERE (SELECT count(*) FROM exporter.jobs"
            "        WHERE key_id = $2 AND status IN ('queued', 'running')) < $7"
            " RETURNING *",
            job_id,
            key_id,
            key_name,
            dataset,
            format,
            json.dumps([list(p) for p in params]),
            max_per_key,
        )
        if row is None:
            return None
        # Delivered at commit.
        await connection.execute(f"NOTIFY {CHANNEL}")
    return Job.of(row)


async def get(pool: Pool, job_id: str) -> Job | None:
    async with pool.connection() as connection:
        row = await connection.fetchrow("SELECT * FROM exporter.jobs WHERE id = $1", job_id)
    return None if row is None else Job.of(row)


async def claim(pool: Pool, worker: str, lease_s: float, per_key: int) -> Job | None:
    """The oldest queued job, or a running one whose worker stopped renewing its lease, of a
    key running fewer than `per_key` jobs: a key at its limit of concurrent exports would only
    have its job handed back, and its queue must not hold up other keys'."""
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "UPDATE exporter.jobs SET status = 'running', worker = $1, attempts = attempts + 1,"
            " lease_until = clock_timestamp() + make_interval(secs => $2),"
            " started_at = coalesce(started_at, clock_timestamp())"
            " WHERE id = (SELECT j.id FROM exporter.jobs AS j"
            "   WHERE (j.status = 'queued' OR (j.status = 'running'"
            "     AND j.lease_until < clock_timestamp() AND NOT j.cancel_requested))"
            "   AND (SELECT count(*) FROM exporter.jobs AS r WHERE r.key_id = j.key_id"
            "        AND r.status = 'running' AND r.lease_until >= clock_timestamp()) < $3"
            "   ORDER BY j.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            worker,
            float(lease_s),
            per_key,
        )
    return None if row is None else Job.of(row)


async def renew(pool: Pool, job: Job, lease_s: float, rows: int, size: int) -> tuple[bool, bool]:
    """Extend the claim and note the progress: (still ours, cancel requested)."""
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "UPDATE exporter.jobs SET lease_until = clock_timestamp() + make_interval(secs => $4),"
            " rows = $5, bytes = $6"
            " WHERE id = $1 AND worker = $2 AND attempts = $3 AND status = 'running'"
            " RETURNING cancel_requested",
            job.id,
            job.worker,
            job.attempts,
            float(lease_s),
            rows,
            size,
        )
    return (row is not None, bool(row and row["cancel_requested"]))


async def finish(
    pool: Pool,
    job: Job,
    *,
    rows: int,
    size: int,
    file_name: str,
    file_bytes: int,
    seek_points: Sequence[SeekPoint],
    cursor: str | None,
    retention_s: float,
) -> bool:
    """Record the finished file; False if the claim was lost meanwhile (the caller then
    deletes its file: the job's new run writes its own)."""
    async with pool.connection() as connection:
        status = await connection.execute(
            "UPDATE exporter.jobs SET status = 'done', finished_at = clock_timestamp(),"
            " expires_at = clock_timestamp() + make_interval(secs => $4),"
            " rows = $5, bytes = $6, file_name = $7, file_bytes = $8, cursor = $9,"
            " seek_points = $10, lease_until = NULL"
            " WHERE id = $1 AND worker = $2 AND attempts = $3 AND status = 'running'"
            # DELETE between the last heartbeat and the end: cancelled, not done.
            " AND NOT cancel_requested",
            job.id,
            job.worker,
            job.attempts,
            float(retention_s),
            rows,
            size,
            file_name,
            file_bytes,
            cursor,
            flatten(seek_points),
        )
    return bool(status == "UPDATE 1")


async def end(pool: Pool, job: Job, status: str, error: str | None) -> bool:
    """End a claimed job as failed or cancelled."""
    async with pool.connection() as connection:
        result = await connection.execute(
            "UPDATE exporter.jobs SET status = $4, error = $5, finished_at = clock_timestamp(),"
            " lease_until = NULL"
            " WHERE id = $1 AND worker = $2 AND attempts = $3 AND status = 'running'",
            job.id,
            job.worker,
            job.attempts,
            status,
            error,
        )
    return bool(result == "UPDATE 1")


async def requeue(pool: Pool, job: Job, *, counts: bool) -> None:
    """Give a claimed job back: it runs later. A run refused for want of an export slot, or
    stopped by a shutdown, does not count as an attempt; one that met the database
    unreachable does (MAX_ATTEMPTS bounds them)."""
    async with pool.connection() as connection:
        await connection.execute(
            "UPDATE exporter.jobs SET status = 'queued', worker = NULL, lease_until = NULL,"
            " attempts = attempts - CASE WHEN $4 THEN 0 ELSE 1 END"
            " WHERE id = $1 AND worker = $2 AND attempts = $3 AND status = 'running'"
            " AND NOT cancel_requested",
            job.id,
            job.worker,
            job.attempts,
            counts,
        )


async def fail_exhausted(pool: Pool) -> None:
    """Jobs whose worker died MAX_ATTEMPTS times are failed rather than claimed again, and
    those asked to stop whose worker died are cancelled."""
    async with pool.connection() as connection:
        await connection.execute(
            "UPDATE exporter.jobs SET status = 'cancelled', finished_at = clock_timestamp(),"
            " lease_until = NULL"
            " WHERE status = 'running' AND lease_until < clock_timestamp() AND cancel_requested"
        )
        await connection.execute(
            "UPDATE exporter.jobs SET status = 'failed', finished_at = clock_timestamp(),"
            " error = 'the job''s worker stopped ' || attempts || ' times', lease_until = NULL"
            " WHERE status = 'running' AND lease_until < clock_timestamp() AND attempts >= $1"
            " AND NOT cancel_requested",
            MAX_ATTEMPTS,
        )


async def cancel(pool: Pool, job_id: str) -> Job | None:
    """DELETE /exports/{id}: a queued job is cancelled at once, a running one asked to stop
    (its worker notices within a heartbeat); a finished one's file is expired."""
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "UPDATE exporter.jobs SET"
            " status = CASE status WHEN 'queued' THEN 'cancelled'"
            "   WHEN 'done' THEN 'expired' ELSE status END,"
            " cancel_requested = cancel_requested OR status = 'running',"
            " finished_at = CASE WHEN status = 'queued' THEN clock_timestamp()"
            "   ELSE finished_at END,"
            " expires_at = CASE WHEN status = 'done' THEN clock_timestamp() ELSE expires_at END"
            " WHERE id = $1 RETURNING *",
            job_id,
        )
    return None if row is None else Job.of(row)


async def expire(pool: Pool) -> list[Job]:
    """Done jobs past their expiry: expired (the caller deletes their files)."""
    async with pool.connection() as connection:
        rows = await connection.fetch(
            "UPDATE exporter.jobs SET status = 'expired'"
            " WHERE status = 'done' AND expires_at <= clock_timestamp() RETURNING *"
        )
    return [Job.of(row) for row in rows]


async def files_in_use(pool: Pool) -> set[str]:
    """The names a running attempt writes (its spool part, and its file while it is stored) or
    a done job keeps."""
    async with pool.connection() as connection:
        rows = await connection.fetch(
            "SELECT file_name AS name FROM exporter.jobs"
            " WHERE status = 'done' AND file_name IS NOT NULL"
            " UNION ALL SELECT id || '-' || attempts || suffix FROM exporter.jobs,"
            " (VALUES ('.part'), ('.gz')) AS running (suffix) WHERE status = 'running'"
        )
    return {row["name"] for row in rows}
