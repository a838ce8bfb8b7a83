"""API keys: random, shown once, stored only as a digest; a FastAPI dependency checks them."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.models import api_keys

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


async def create_key(engine: AsyncEngine, name: str) -> str:
    key = new_key()
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(api_keys).values(name=name, digest=digest(key)))
    except IntegrityError as exc:
        raise KeyExists(f"a key named {name!r} exists already") from exc
    return key


async def list_keys(engine: AsyncEngine) -> list[KeyInfo]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(api_keys.c.name, api_keys.c.created_at, api_keys.c.revoked_at).order_by(
                api_keys.c.name
            )
        )
        return [KeyInfo(row.name, row.created_at, row.revoked_at) for row in result]


async def revoke_key(engine: AsyncEngine, name: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(
            update(api_keys)
            .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now().astimezone())
        )
        return bool(result.rowcount)


async def authenticate(engine: AsyncEngine, key: str) -> ApiKey | None:
    """The key's record, or None. The lookup is by digest; the final comparison is in
    constant time, so a near-miss takes as long as a far miss."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    wanted = digest(key)
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(api_keys.c.id, api_keys.c.name, api_keys.c.digest).where(
                    api_keys.c.digest == wanted, api_keys.c.revoked_at.is_(None)
                )
            )
        ).first()
    if row is None or not hmac.compare_digest(bytes(row.digest), wanted):
        return None
    return ApiKey(id=row.id, name=row.name)
