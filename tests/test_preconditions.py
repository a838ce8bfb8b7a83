"""exporter/http/preconditions.py on its own: entity-tags, HTTP-dates, conditional requests,
If-Range and Range, as functions of header values (no database, no socket). What a download
does with them on a real socket is tests/test_downloads.py."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from starlette.datastructures import Headers

from exporter.http.preconditions import (
    UNSATISFIABLE,
    ByteRange,
    EntityTag,
    Outcome,
    Unsatisfiable,
    evaluate_preconditions,
    format_http_date,
    if_range_holds,
    parse_entity_tags,
    parse_http_date,
    parse_range,
)

ETAG = EntityTag("v1")
LAST_MODIFIED = datetime(2026, 1, 7, 14, 0, 0, tzinfo=UTC)
SENT = "Wed, 07 Jan 2026 14:00:00 GMT"
EARLIER = "Wed, 07 Jan 2026 13:59:59 GMT"


def headers(*fields: tuple[str, str]) -> Headers:
    """Header fields as a request sends them, the same name possibly more than once."""
    return Headers(raw=[(name.lower().encode(), value.encode()) for name, value in fields])


def outcome(method: str, *fields: tuple[str, str]) -> Outcome:
    return evaluate_preconditions(headers(*fields), method, ETAG, LAST_MODIFIED)


# --- entity-tags -------------------------------------------------------------------------------


def test_parse_entity_tags() -> None:
    assert parse_entity_tags("*") is None
    assert parse_entity_tags(' "a" ,W/"b",, "c,d" ') == [
        EntityTag("a"),
        EntityTag("b", weak=True),
        EntityTag("c,d"),
    ]
    assert parse_entity_tags('"a" "b"') == []
    assert parse_entity_tags('"a", b') == []
    assert parse_entity_tags("") == []


def test_entity_tags_print_and_compare_as_the_rfc_says() -> None:
    weak = EntityTag("v1", weak=True)
    assert (str(ETAG), str(weak)) == ('"v1"', 'W/"v1"')
    # Strong comparison: both strong and the same; weak comparison: the same opaque tag.
    assert ETAG.strong_match(EntityTag("v1"))
    assert not ETAG.strong_match(weak) and not weak.strong_match(ETAG)
    assert not weak.strong_match(weak)
    assert ETAG.weak_match(weak) and weak.weak_match(ETAG)
    assert not ETAG.weak_match(EntityTag("v2"))


def test_a_malformed_entity_tag_list_has_no_tags() -> None:
    for value in ('"unterminated', 'W/"a', '"a"x', "a", '"a" ; "b"', '"quote"inside"'):
        assert parse_entity_tags(value) == [], value


# --- HTTP-dates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        SENT,  # IMF-fixdate
        "Wednesday, 07-Jan-26 14:00:00 GMT",  # RFC 850
        "Wed Jan  7 14:00:00 2026",  # asctime, no zone: UTC
        f"  {SENT}  ",
    ],
)
def test_the_three_http_date_forms_parse_to_the_same_moment(value: str) -> None:
    parsed = parse_http_date(value)
    assert parsed == LAST_MODIFIED
    assert parsed is not None and parsed.tzinfo is not None


@pytest.mark.parametrize("value", ["", "yesterday", "Wed, 32 Jan 2026 14:00:00 GMT", "0"])
def test_what_is_not_an_http_date_is_none(value: str) -> None:
    assert parse_http_date(value) is None


def test_dates_are_formatted_in_gmt_whatever_their_zone() -> None:
    in_paris = LAST_MODIFIED.astimezone(timezone(timedelta(hours=1)))
    assert format_http_date(in_paris) == SENT
    assert parse_http_date(format_http_date(in_paris)) == LAST_MODIFIED


# --- conditional requests (§13.2.2) ------------------------------------------------------------


def test_no_condition_proceeds() -> None:
    for method in ("GET", "HEAD", "DELETE"):
        assert outcome(method) is Outcome.PROCEED


def test_if_none_match_on_an_unsafe_method_is_a_failed_precondition_not_a_304() -> None:
    for value in ('"v1"', 'W/"v1"', "*"):
        assert outcome("GET", ("If-None-Match", value)) is Outcome.NOT_MODIFIED
        assert outcome("DELETE", ("If-None-Match", value)) is Outcome.PRECONDITION_FAILED
    assert outcome("DELETE", ("If-None-Match", '"v2"')) is Outcome.PROCEED


def test_if_modified_since_counts_for_get_and_head_only() -> None:
    assert outcome("HEAD", ("If-Modified-Since", SENT)) is Outcome.NOT_MODIFIED
    assert outcome("DELETE", ("If-Modified-Since", SENT)) is Outcome.PROCEED
    assert outcome("GET", ("If-Modified-Since", EARLIER)) is Outcome.PROCEED


def test_a_date_field_sent_twice_is_ignored() -> None:
    assert outcome("GET", ("If-Modified-Since", SENT), ("If-Modified-Since", SENT)) == (
        Outcome.PROCEED
    )
    twice = (("If-Unmodified-Since", EARLIER), ("If-Unmodified-Since", EARLIER))
    assert outcome("GET", *twice) is Outcome.PROCEED
    assert outcome("GET", twice[0]) is Outcome.PRECONDITION_FAILED


def test_several_if_match_fields_make_one_list() -> None:
    assert outcome("GET", ("If-Match", '"x"'), ("If-Match", '"v1"')) is Outcome.PROCEED
    assert outcome("GET", ("If-Match", '"x"'), ("If-Match", '"y"')) is (Outcome.PRECONDITION_FAILED)
    none_match = (("If-None-Match", '"x"'), ("If-None-Match", '"v1"'))
    assert outcome("GET", *none_match) is Outcome.NOT_MODIFIED


def test_if_match_comes_first_and_hides_if_unmodified_since() -> None:
    # If-Match holds: If-Unmodified-Since (which would fail) is not looked at.
    assert outcome("DELETE", ("If-Match", '"v1"'), ("If-Unmodified-Since", EARLIER)) is (
        Outcome.PROCEED
    )
    # If-Match fails before If-None-Match could say 304.
    assert outcome("GET", ("If-Match", '"x"'), ("If-None-Match", '"v1"')) is (
        Outcome.PRECONDITION_FAILED
    )


# --- If-Range (§13.1.5) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "holds"),
    [
        ('"v1"', True),
        (' "v1" ', True),
        ('W/"v1"', False),  # weak: never for a range
        ('"v2"', False),
        ('"v1", "v2"', False),  # one entity-tag, not a list
        ("*", False),
        (SENT, True),
        ("Wednesday, 07-Jan-26 14:00:00 GMT", True),
        (EARLIER, False),
        ("Wed, 07 Jan 2026 14:00:01 GMT", False),  # later is not equal either
        ("not a validator", False),
        ("", False),
    ],
)
def test_if_range(value: str, holds: bool) -> None:
    assert if_range_holds(value, ETAG, LAST_MODIFIED) is holds


# --- Range (§14.1-14.2) ------------------------------------------------------------------------


def test_parse_range_edges() -> None:
    assert parse_range("bytes=0-", 0) is None
    assert parse_range("bytes=-0", 10) is UNSATISFIABLE
    assert parse_range("bytes=10-", 10) is UNSATISFIABLE
    assert parse_range("bytes=9-", 10) == ByteRange(9, 10)
    assert parse_range("bytes=" + "9" * 5000 + "-", 10) is UNSATISFIABLE
    assert parse_range("bytes=-" + "9" * 5000, 10) == ByteRange(0, 10)
    assert parse_range("bytes=0-" + "9" * 5000, 10) == ByteRange(0, 10)
    assert parse_range("bytes=٣-٤", 10) is None  # Unicode digits are not DIGIT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-0", ByteRange(0, 1)),
        ("bytes=2-5", ByteRange(2, 6)),
        ("bytes=5-100", ByteRange(5, 10)),  # the end is cut to the length
        ("bytes=-3", ByteRange(7, 10)),
        ("bytes=-30", ByteRange(0, 10)),  # a suffix longer than the representation
        ("bytes=0002-0005", ByteRange(2, 6)),  # leading zeros
        ("BYTES=2-5", ByteRange(2, 6)),  # the unit is case-insensitive
        ("bytes= 2-5 ", ByteRange(2, 6)),
        ("bytes=, 2-5,", ByteRange(2, 6)),  # empty list elements are allowed
        ("bytes=5-2", None),  # invalid, so ignored
        ("bytes=1-2,4-5", None),  # several ranges: the whole representation
        ("bytes=2 -5", None),
        ("items=0-5", None),
        ("bytes 0-5", None),
        ("bytes=", None),
        ("bytes=10-20", UNSATISFIABLE),
    ],
)
def test_parse_range(value: str, expected: ByteRange | Unsatisfiable | None) -> None:
    assert parse_range(value, 10) == expected


def test_content_range_names_the_last_byte_not_the_end() -> None:
    assert ByteRange(0, 1).content_range(10) == "bytes 0-0/10"
    assert ByteRange(7, 10).content_range(10) == "bytes 7-9/10"
