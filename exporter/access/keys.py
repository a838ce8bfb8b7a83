"""API keys: random, shown once, stored only as a digest; a FastAPI dependency checks them.

A key reaches the datasets its glob patterns match (`*` for all) until it expires or is
revoked; to a key, a dataset it may not read does not exist."""

import fnmatch
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from exporter.access.revocations import CHANNEL, JOB_REVOKED
from exporter.db.pool import Pool

KEY_PREFIX = "exp_"
MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 200


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    datasets: tuple[str, ...] = ("*",)
    role: str | None = None  # exports run as this PostgreSQL role (SET LOCAL ROLE)
    admin: bool = False  # may read the export log (GET /exports)

    def may_read(self, dataset: str) -> bool:
        return any(fnmatch.fnmatchcase(dataset, pattern) for pattern in self.datasets)


@dataclass(frozen=True)
class KeyInfo:
    name: str
    created_at: datetime
    revoked_at: datetime | None
    datasets: tuple[str, ...]
    expires_at: datetime | None
    role: str | None
    admin: bool = False


class KeyExists(ValueError):
    pass


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def check_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """The patterns as stored; ValueError for an empty or oversized list or pattern."""
    if not patterns:
        raise ValueError("a key needs at least one dataset pattern ('*' for all)")
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} dataset patterns")
    for pattern in patterns:
        if not pattern.strip() or len(pattern) > MAX_PATTERN_LENGTH or "\x00" in pattern:
            raise ValueError(f"not a dataset pattern: {pattern[:50]!r}")
    return tuple(dict.fromkeys(patterns))


async def create_key(
    pool: Pool,
    name: str,
    datasets: Sequence[str] = ("*",),
    expires_at: datetime | None = None,
    role: str | None = None,
    admin: bool = False,
) -> str:
    patterns = check_patterns(datasets)
    key = new_key()
    try:
        async with pool.connection() as connection:
            await connection.execute(
                "INSERT INTO exporter.api_keys (name, digest, datasets, expires_at, role, admin)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                name,
                digest(key),
                list(patterns),
                expires_at,
                role,
                admin,
            )
    except asyncpg.exceptions.UniqueViolationError as exc:
        raise KeyExists(f"a key named {name!r} exists already") from exc
    return key


async def list_keys(pool: Pool) -> list[KeyInfo]:
    async with pool.connection() as connection:
        rows = await connection.fetch(
            "SELECT name, created_at, revoked_at, datasets, expires_at, role, admin"
            " FROM exporter.api_keys ORDER BY name"
        )
    return [
        KeyInfo(
            row["name"],
            row["created_at"],
            row["revoked_at"],
            tuple(row["datasets"]),
            row["expires_at"],
            row["role"],
            row["admin"],
        )
        for row in rows
    ]


async def revoke_key(pool: Pool, name: str) -> bool:
    """Revoke the key, and end its work: its queued and running jobs fail saying so, its
    finished jobs' files expire (a 410; the sweep deletes them), and every serve process is
    notified (access/revocations.py) to cut its running exports and event streams. One
    transaction: the notification leaves with the commit."""
    async with pool.connection() as connection, connection.transaction():
        key_id = await connection.fetchval(
            "UPDATE exporter.api_keys SET revoked_at = now()"
            " WHERE name = $1 AND revoked_at IS NULL RETURNING id",
            name,
        )
        if key_id is None:
            return False
        await connection.execute(
            "UPDATE exporter.jobs SET status = 'failed', error = $2,"
            " finished_at = clock_timestamp(), lease_until = NULL"
            " WHERE key_id = $1 AND status IN ('queued', 'running')",
            key_id,
            JOB_REVOKED,
        )
        await connection.execute(
            "UPDATE exporter.jobs SET status = 'expired', expires_at = clock_timestamp()"
            " WHERE key_id = $1 AND status = 'done'",
            key_id,
        )
        await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, str(key_id))
    return True


async def authenticate(pool: Pool, key: str) -> ApiKey | None:
    """The key's record, or None (unknown, revoked or expired). The lookup is by digest; the
    final comparison is in constant time, so a near-miss takes as long as a far miss."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    wanted = digest(key)
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "SELECT id, name, digest, datasets, role, admin FROM exporter.api_keys"
            " WHERE digest = $1 AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > now())",
            wanted,
        )
    if row is None or not hmac.compare_digest(bytes(row["digest"]), wanted):
        return None
    return _api_key(row)


async def key_by_id(pool: Pool, key_id: int) -> ApiKey | None:
    """A key's record by id, for work done on its behalf later (a background job); None if it
    has been revoked or has expired since."""
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "SELECT id, name, datasets, role, admin FROM exporter.api_keys"
            " WHERE id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
            key_id,
        )
    if row is None:
        return None
    return _api_key(row)


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        datasets=tuple(row["datasets"]),
        role=row["role"],
        admin=row["admin"],
    )
