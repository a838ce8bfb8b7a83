"""API keys: random, shown once, stored only as a digest; a FastAPI dependency checks them."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from exporter.db import Pool

KEY_PREFIX = "exp_"


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str


@dataclass(frozen=True)
class KeyInfo:
    name: str
    created_at: datetime
    revoked_at: datetime | None


class KeyExists(ValueError):
    pass


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_key(pool: Pool, name: str) -> str:
    key = new_key()
    try:
        async with pool.connection() as connection:
            await connection.execute(
                "INSERT INTO exporter.api_keys (name, digest) VALUES ($1, $2)", name, digest(key)
            )
    except asyncpg.exceptions.UniqueViolationError as exc:
        raise KeyExists(f"a key named {name!r} exists already") from exc
    return key


async def list_keys(pool: Pool) -> list[KeyInfo]:
    async with pool.connection() as connection:
        rows = await connection.fetch(
            "SELECT name, created_at, revoked_at FROM exporter.api_keys ORDER BY name"
        )
    return [KeyInfo(row["name"], row["created_at"], row["revoked_at"]) for row in rows]


async def revoke_key(pool: Pool, name: str) -> bool:
    async with pool.connection() as connection:
        status = await connection.execute(
            "UPDATE exporter.api_keys SET revoked_at = now()"
            " WHERE name = $1 AND revoked_at IS NULL",
            name,
        )
    return bool(status != "UPDATE 0")


async def authenticate(pool: Pool, key: str) -> ApiKey | None:
    """The key's record, or None. The lookup is by digest; the final comparison is in
    constant time, so a near-miss takes as long as a far miss."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    wanted = digest(key)
    async with pool.connection() as connection:
        row = await connection.fetchrow(
            "SELECT id, name, digest FROM exporter.api_keys"
            " WHERE digest = $1 AND revoked_at IS NULL",
            wanted,
        )
    if row is None or not hmac.compare_digest(bytes(row["digest"]), wanted):
        return None
    return ApiKey(id=row["id"], name=row["name"])
