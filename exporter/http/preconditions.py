"""Conditional and range requests (RFC 9110 §13, §14.1-14.2), as functions of the request's
header fields and a representation's validators: nothing here touches a file or a socket."""

import enum
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.datastructures import Headers

# etagc = %x21 / %x23-7E / obs-text (§8.8.3). What this service generates never has obs-text.
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_LIST_SEPARATOR = re.compile(r"[ \t]*(?:,[ \t]*)*")
OPAQUE_TAG = re.compile(r"[\x21\x23-\x7e]*")

# Larger than any file; a position with more digits than this is read as this (Python refuses
# to parse an int of more than 4300 digits, and would spend time on one of 4000).
_HUGE = 10**18
_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")


@dataclass(frozen=True)
class EntityTag:
    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'{"W/" if self.weak else ""}"{self.opaque}"'

    def strong_match(self, other: "EntityTag") -> bool:
        return not self.weak and not other.weak and self.opaque == other.opaque

    def weak_match(self, other: "EntityTag") -> bool:
        return self.opaque == other.opaque


def parse_entity_tags(value: str) -> list[EntityTag] | None:
    """The entity-tags of an If-Match or If-None-Match value; None for `*`. A malformed value has
    no tags: If-Match then fails (the safe side for a client that meant a condition) and
    If-None-Match never matches (the full response, which is always correct)."""
    if value.strip() == "*":
        return None
    tags: list[EntityTag] = []
    position = 0
    while True:
        separator = _LIST_SEPARATOR.match(value, position)
        assert separator is not None, "matches the empty string"
        position = separator.end()
        if position == len(value):
            return tags
        if tags and "," not in separator[0]:
            return []  # two tags without a comma between them
        tag = _ENTITY_TAG.match(value, position)
        if tag is None:
            return []
        tags.append(EntityTag(tag[2], weak=tag[1] is not None))
        position = tag.end()


def format_http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    """An HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms), aware; None when
    the value is not one."""
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # asctime has no zone; HTTP-dates are all UTC.
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _field(headers: Headers, name: str) -> str | None:
    """A field's value, several fields of the name making one list (§5.3)."""
    values = headers.getlist(name)
    return ", ".join(values) if values else None


def _date_field(headers: Headers, name: str) -> datetime | None:
    """A date field's value, None if absent, malformed or sent more than once: such a field is
    ignored (§13.1.3, §13.1.4)."""
    values = headers.getlist(name)
    return parse_http_date(values[0]) if len(values) == 1 else None


class Outcome(enum.Enum):
    PROCEED = 200
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412


def evaluate_preconditions(
    headers: Headers, method: str, etag: EntityTag, last_modified: datetime
) -> Outcome:
    """The outcome of If-Match, If-Unmodified-Since, If-None-Match and If-Modified-Since for a
    representation that exists, in the order of §13.2.2 (If-Range is the range's business).
    `last_modified` is the Last-Modified sent, whole seconds, as the client's dates are."""
    safe = method in ("GET", "HEAD")
    if_match = _field(headers, "if-match")
    if if_match is not None:
        tags = parse_entity_tags(if_match)
        if tags is not None and not any(etag.strong_match(tag) for tag in tags):
            return Outcome.PRECONDITION_FAILED
    else:
        unmodified_since = _date_field(headers, "if-unmodified-since")
        if unmodified_since is not None and last_modified > unmodified_since:
            return Outcome.PRECONDITION_FAILED
    if_none_match = _field(headers, "if-none-match")
    if if_none_match is not None:
        tags = parse_entity_tags(if_none_match)
        if tags is None or any(etag.weak_match(tag) for tag in tags):
            return Outcome.NOT_MODIFIED if safe else Outcome.PRECONDITION_FAILED
    elif safe:
        modified_since = _date_field(headers, "if-modified-since")
        if modified_since is not None and last_modified <= modified_since:
            return Outcome.NOT_MODIFIED
    return Outcome.PROCEED


def if_range_holds(value: str, etag: EntityTag, last_modified: datetime) -> bool:
    """Whether If-Range lets a range through (§13.1.5): an entity-tag matching strongly, or a
    date equal to Last-Modified (the caller vouches that it is a strong validator)."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        tags = parse_entity_tags(value)
        return tags is not None and len(tags) == 1 and etag.strong_match(tags[0])
    date = parse_http_date(value)
    return date is not None and date == last_modified


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def content_range(self, length: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{length}"


class Unsatisfiable(enum.Enum):
    UNSATISFIABLE = 416


UNSATISFIABLE = Unsatisfiable.UNSATISFIABLE


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _HUGE


def parse_range(value: str, length: int) -> ByteRange | Unsatisfiable | None:
    """The byte range a Range value asks of a representation of `length` bytes, UNSATISFIABLE
    (416), or None: send the whole representation (200).

    None for a malformed value or another unit (§14.2: ignored), and for several ranges: the
    RFC lets a server ignore Range, and multipart/byteranges is worth its complexity to no
    client of this service (resuming a download asks for one range: curl, wget, browsers,
    download managers that split a file open one connection per range). None too for an empty
    representation, whose only satisfiable range, a suffix, would be zero bytes with no
    Content-Range to say so.
    """
    unit, equals, range_set = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]  # empty list elements are allowed (§5.6.1.2)
    if len(specs) != 1 or length == 0:
        return None
    int_range = _INT_RANGE.fullmatch(specs[0])
    if int_range is not None:
        first = _position(int_range[1])
        last = _position(int_range[2]) if int_range[2] else _HUGE
        if last < first:
            return None  # invalid, so ignored
        if first >= length:
            return UNSATISFIABLE
        return ByteRange(first, min(last + 1, length))
    suffix_range = _SUFFIX_RANGE.fullmatch(specs[0])
    if suffix_range is not None:
        suffix = _position(suffix_range[1])
        if suffix == 0:
            return UNSATISFIABLE
        return ByteRange(max(length - suffix, 0), length)
    return None
