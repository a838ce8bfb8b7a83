"""Export slots, counted by PostgreSQL so that every worker process and every replica of the
service shares them.

A slot is a transaction-level advisory lock taken in the export's own snapshot transaction:
PostgreSQL releases it when that transaction ends (ROLLBACK when the export ends in any way, or
the backend's exit when its connection is lost), never a timer or the garbage collector.
"""

from dataclasses import dataclass

from exporter.db.connection import Connection
from exporter.errors import TooManyRequests

# Advisory locks in their two-integer form. Other applications on the same database use
# advisory locks too; these class ids are out of the way of small integers and hashtext().
# A key's slots: class KEY_SLOTS + slot number, object = the key's id.
_KEY_SLOTS = 0x45786B00
# The service's slots: class TOTAL_SLOTS, object = slot number.
_TOTAL_SLOTS = 0x45787054
MAX_SLOTS_PER_KEY = 1000  # keeps the key classes below _TOTAL_SLOTS
_INT4 = 2**31

# One round trip. The key's slot is tried first, so that a key at its own limit never holds a
# slot of the service's; the CASE tries the service's only when the key got one. Each LIMIT 1
# stops at the first lock taken.
_CLAIM = """
WITH key_slot AS (
    SELECT s FROM generate_series(0, $1::int - 1) AS s
    WHERE pg_catalog.pg_try_advisory_xact_lock($2::int + s, $3::int)
    LIMIT 1
)
SELECT
    EXISTS (SELECT FROM key_slot) AS key_slot,
    CASE WHEN EXISTS (SELECT FROM key_slot) THEN EXISTS (
        SELECT FROM generate_series(0, $4::int - 1) AS s
        WHERE pg_catalog.pg_try_advisory_xact_lock($5::int, s)
        LIMIT 1
    ) END AS total_slot
"""


# Exports last seconds to hours; a client refused for want of a slot retries after this long.
RETRY_AFTER_S = 10


class TooManyExports(TooManyRequests):
    """No slot was free: `scope` is "key" (the key's own limit) or "total" (the service's)."""

    def __init__(self, scope: str, limit: int) -> None:
        what = "this key" if scope == "key" else "the service"
        message = f"{what} already runs its maximum of {limit} concurrent exports"
        super().__init__(
            message,
            detail=f"{message}; try again when one has finished",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        self.scope = scope
        self.limit = limit


@dataclass(frozen=True)
class Slots:
    """What one export needs: a slot of its key's and one of the service's."""

    key_id: int
    per_key: int
    total: int

    async def claim(self, connection: Connection) -> None:
        """Take both slots for the rest of the connection's transaction, or TooManyExports."""
        row = await connection.fetchrow(
            _CLAIM,
            self.per_key,
            _KEY_SLOTS,
            # Key ids are a bigint identity; beyond 2**31 keys, two keys would share slots.
            self.key_id % _INT4,
            self.total,
            _TOTAL_SLOTS,
        )
        assert row is not None  # a SELECT without FROM: one row
        if not row["key_slot"]:
            raise TooManyExports("key", self.per_key)
        if not row["total_slot"]:
            raise TooManyExports("total", self.total)
