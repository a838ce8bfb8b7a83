"""One exception hierarchy for everything the service or the `exporter` command explains to a
person rather than a traceback.

Each error knows its HTTP status, title and problem type once (on its class), and its exit
code. http/problems.py renders one as `application/problem+json`, cli/main.py as a one-line
message and an exit code, and the export log records its status as a refusal's. The same
`problem()` document carries an export's or a job's failure in progress events.
"""

from collections.abc import Mapping, Sequence
from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
# No problem type of our own yet: RFC 9457's "about:blank" (the title is the status phrase).
ABOUT_BLANK = "about:blank"

# Exit codes of the `exporter` command: the operation failed (a duplicate key, an export broken
# off midway); it could not start (bad arguments or configuration, an unknown dataset or
# column, a value PostgreSQL rejects, an unreachable database), as argparse uses 2 for usage
# errors; interrupted (Ctrl-C), as shells report SIGINT.
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130


def problem(
    status: int | None, title: str, detail: str | None = None, **members: Any
) -> dict[str, Any]:
    """An RFC 9457 problem document (without `status` if None); `members` are extensions
    (None ones are left out)."""
    body: dict[str, Any] = {"type": ABOUT_BLANK, "title": title}
    if status is not None:
        body["status"] = status
    if detail:
        body["detail"] = detail
    body.update((name, value) for name, value in members.items() if value is not None)
    return body


class ExporterError(Exception):
    """An error a client or a user is told about. `detail` says what went wrong in this
    instance (str(error) unless given apart); `title` may be made more precise than the
    class's; `headers` go on the HTTP response (Retry-After, WWW-Authenticate)."""

    status = 500
    title = "Internal Server Error"
    exit_code = FAILED

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: str | None = None,
        title: str | None = None,
        invalid_params: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message or detail or self.title)
        self.detail = detail if detail is not None else message
        if title is not None:
            self.title = title
        if exit_code is not None:
            self.exit_code = exit_code
        self.invalid_params = list(invalid_params)
        self.headers = dict(headers or {})

    def problem(self, **members: Any) -> dict[str, Any]:
        return problem(
            self.status,
            self.title,
            self.detail,
            **({"invalid-params": self.invalid_params} if self.invalid_params else {}),
            **members,
        )


class InvalidRequest(ExporterError):
    status = 400
    title = "Invalid request"
    exit_code = BAD_INPUT


class InvalidParameter(InvalidRequest):
    """A query parameter (or a CLI option that stands for one) that cannot be honoured."""

    title = "Invalid query parameter"

    def __init__(self, parameter: str, reason: str, **kwargs: Any) -> None:
        super().__init__(
            reason,
            detail=f"{parameter}: {reason}",
            invalid_params=[{"name": parameter, "reason": reason}],
            **kwargs,
        )
        self.parameter = parameter
        self.reason = reason


class Unauthorized(ExporterError):
    status = 401
    title = "Unauthorized"
    exit_code = BAD_INPUT


class Forbidden(ExporterError):
    status = 403
    title = "Forbidden"
    exit_code = BAD_INPUT


class NotFound(ExporterError):
    status = 404
    title = "Not Found"
    exit_code = BAD_INPUT


class NotAcceptable(ExporterError):
    status = 406
    title = "Not Acceptable"
    exit_code = BAD_INPUT


class Conflict(ExporterError):
    status = 409
    title = "Conflict"


class Gone(ExporterError):
    status = 410
    title = "Gone"


class LengthRequired(ExporterError):
    status = 411
    title = "Length Required"
    exit_code = BAD_INPUT


class PreconditionFailed(ExporterError):
    status = 412
    title = "Precondition Failed"


class ContentTooLarge(ExporterError):
    status = 413
    title = "Content Too Large"
    exit_code = BAD_INPUT


class RangeNotSatisfiable(ExporterError):
    status = 416
    title = "Range Not Satisfiable"


class LimitExceeded(ExporterError):
    """A job ended by one of the service's caps (EXPORTER_MAX_ROWS, _BYTES, _SECONDS)."""

    status = 422
    title = "Job stopped by a limit"


class TooManyRequests(ExporterError):
    status = 429
    title = "Too Many Requests"


class HeaderFieldsTooLarge(ExporterError):
    status = 431
    title = "Request Header Fields Too Large"
    exit_code = BAD_INPUT


class ClientClosedRequest(ExporterError):
    """The client left, or cancelled the job, before the end; nginx's code for it."""

    status = 499
    title = "Client Closed Request"


class DatasetUnreadable(ExporterError):
    """PostgreSQL failed reading the data itself (a view dividing by zero, say)."""

    title = "Dataset could not be read"


class ServiceUnavailable(ExporterError):
    """The database or the store is unreachable or busy: worth trying again later."""

    status = 503
    title = "Service Unavailable"
