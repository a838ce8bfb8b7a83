"""The type of a database connection as the service's code holds one."""

from typing import TypeAlias

import asyncpg
import asyncpg.pool

# A connection lent by a pool (asyncpg hands out a proxy of the connection).
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
