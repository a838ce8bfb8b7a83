"""What a failure of the database (rather than of the request) is explained as."""

import asyncpg

from exporter.db.pool import UNREACHABLE
from exporter.errors import ExporterError, ServiceUnavailable

# What PostgreSQL says of a character its database's encoding cannot hold (an emoji in a
# LATIN1 database).
ENCODING_ERRORS = (
    asyncpg.exceptions.UntranslatableCharacterError,
    asyncpg.exceptions.CharacterNotInRepertoireError,
)


def database_failure(exc: BaseException) -> ExporterError | None:
    """`exc` as an ExporterError if it is one, or an unreachable database's 503; None for
    anything else (a bug: a 500 with a traceback in the log)."""
    if isinstance(exc, ExporterError):
        return exc
    if isinstance(exc, UNREACHABLE):
        return ServiceUnavailable("the database is not reachable", headers={"Retry-After": "5"})
    return None
