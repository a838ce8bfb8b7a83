"""exporter/errors.py on its own: the problem document, what an error carries, and the status
and exit code each class says once. How routes render them is tests/test_api.py and
tests/test_filters.py; how the command prints them, tests/test_cli.py."""

import pytest

from exporter import errors
from exporter.errors import (
    ABOUT_BLANK,
    BAD_INPUT,
    FAILED,
    ExporterError,
    InvalidParameter,
    InvalidRequest,
    problem,
)


def test_problem_leaves_out_what_is_none_or_empty() -> None:
    assert problem(404, "Not Found") == {"type": ABOUT_BLANK, "title": "Not Found", "status": 404}
    assert problem(400, "Bad", "", instance=None, request_id="r-1") == {
        "type": ABOUT_BLANK,
        "title": "Bad",
        "status": 400,
        "request_id": "r-1",
    }
    # Falsy members that are not None are kept: a count of 0 rows is worth saying.
    assert problem(500, "Failed", "it broke", rows=0, partial=False)["rows"] == 0
    assert problem(500, "Failed", "it broke", rows=0, partial=False)["partial"] is False
    assert problem(500, "Failed", "it broke")["detail"] == "it broke"


def test_an_error_says_its_message_detail_and_title() -> None:
    plain = ExporterError("the store said no")
    assert (str(plain), plain.detail, plain.title) == (
        "the store said no",
        "the store said no",
        "Internal Server Error",
    )
    # A detail apart from the message, a more precise title, headers.
    apart = InvalidRequest(
        "short", detail="the long story", title="Bad cursor", headers={"Retry-After": "5"}
    )
    assert (str(apart), apart.detail, apart.title) == ("short", "the long story", "Bad cursor")
    assert apart.headers == {"Retry-After": "5"}
    assert InvalidRequest.title == "Invalid request"  # the class's title is left alone
    # Nothing said: the title stands in for the message, and there is no detail.
    bare = InvalidRequest()
    assert (str(bare), bare.detail) == ("Invalid request", None)
    assert "detail" not in bare.problem()


def test_invalid_parameter_names_the_parameter() -> None:
    error = InvalidParameter("limit", "must be a whole number")
    assert (error.parameter, error.reason) == ("limit", "must be a whole number")
    assert str(error) == "must be a whole number"
    assert error.detail == "limit: must be a whole number"
    assert error.invalid_params == [{"name": "limit", "reason": "must be a whole number"}]
    assert error.problem(request_id="r-2") == {
        "type": ABOUT_BLANK,
        "title": "Invalid query parameter",
        "status": 400,
        "detail": "limit: must be a whole number",
        "invalid-params": [{"name": "limit", "reason": "must be a whole number"}],
        "request_id": "r-2",
    }
    assert isinstance(error, InvalidRequest) and error.exit_code == BAD_INPUT


def test_no_invalid_params_member_without_invalid_params() -> None:
    assert "invalid-params" not in InvalidRequest("no body").problem()


def test_an_instance_may_say_another_exit_code() -> None:
    assert InvalidRequest("x", exit_code=FAILED).exit_code == FAILED
    assert InvalidRequest("x").exit_code == BAD_INPUT


# What a client can fix is BAD_INPUT for the command (it could not start); what went wrong on
# the way, or may go right later, FAILED.
CLASSES = [
    ("ExporterError", 500, FAILED),
    ("InvalidRequest", 400, BAD_INPUT),
    ("InvalidParameter", 400, BAD_INPUT),
    ("Unauthorized", 401, BAD_INPUT),
    ("Forbidden", 403, BAD_INPUT),
    ("NotFound", 404, BAD_INPUT),
    ("NotAcceptable", 406, BAD_INPUT),
    ("Conflict", 409, FAILED),
    ("Gone", 410, FAILED),
    ("LengthRequired", 411, BAD_INPUT),
    ("PreconditionFailed", 412, FAILED),
    ("ContentTooLarge", 413, BAD_INPUT),
    ("RangeNotSatisfiable", 416, FAILED),
    ("LimitExceeded", 422, FAILED),
    ("TooManyRequests", 429, FAILED),
    ("HeaderFieldsTooLarge", 431, BAD_INPUT),
    ("ClientClosedRequest", 499, FAILED),
    ("DatasetUnreadable", 500, FAILED),
    ("ServiceUnavailable", 503, FAILED),
]


@pytest.mark.parametrize(("name", "status", "exit_code"), CLASSES)
def test_each_class_says_its_status_and_exit_code(name: str, status: int, exit_code: int) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, ExporterError)
    assert (cls.status, cls.exit_code) == (status, exit_code)
    assert cls.title
    instance = cls("x") if name != "InvalidParameter" else cls("p", "x")
    assert instance.problem()["status"] == status


def test_every_error_class_is_in_the_table_above() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, ExporterError)
    }
    assert classes == {name for name, _, _ in CLASSES}
