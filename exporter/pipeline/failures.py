"""What a failure before an export's first byte is explained as, HTTP export, job or CLI
alike: the request's fault (a 400 naming its parameters), the database's state (403, 503), or
the data's own (a view dividing by zero)."""

import asyncpg

from exporter.db.failures import ENCODING_ERRORS, database_failure
from exporter.errors import (
    DatasetUnreadable,
    ExporterError,
    Forbidden,
    InvalidRequest,
    ServiceUnavailable,
)
from exporter.pipeline.query import ExportQuery


def export_failure(exc: BaseException, query: ExportQuery) -> ExporterError | None:
    """`exc`, raised opening `query`'s export, as an ExporterError; None for anything else
    (a bug: a 500 with a traceback in the log)."""
    if isinstance(exc, asyncpg.exceptions.UndefinedFunctionError):
        # No operator for a column's type: `eq` on a json column, say.
        return _invalid(
            f"PostgreSQL rejected the query: {exc}",
            [f.parameter for f in query.filters],
            str(exc),
            title="Invalid query parameter",
        )
    if isinstance(exc, ENCODING_ERRORS):
        # A filter value or a format option (null=): the request's fault, not the service's.
        reason = f"a value the database's encoding cannot hold: {exc}"
        return _invalid(
            reason,
            [f.parameter for f in query.filters if not _ascii(f.value)]
            + [name for name, value in query.options if not value.isascii()],
            reason,
            title="Invalid query parameter",
        )
    if isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
        return Forbidden(str(exc))
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        # statement_timeout before the first rows.
        return ServiceUnavailable(
            "the query timed out before its first rows", headers={"Retry-After": "30"}
        )
    if isinstance(exc, asyncpg.exceptions.DataError):
        # Filter values were checked before the query ran (source.check_filter_values), so
        # this is the data's own fault: a view dividing by zero, say.
        return DatasetUnreadable(f"PostgreSQL: {exc}")
    return database_failure(exc)


def _invalid(detail: str, parameters: list[str], reason: str, title: str) -> InvalidRequest:
    names = dict.fromkeys(parameters)
    return InvalidRequest(
        detail, title=title, invalid_params=[{"name": name, "reason": reason} for name in names]
    )


def _ascii(value: str | tuple[str, ...]) -> bool:
    return all(part.isascii() for part in ((value,) if isinstance(value, str) else value))
