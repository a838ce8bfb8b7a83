"""The server log's formatter (exporter/http/logs.py), without a server: a message is one line
whatever it holds; a traceback keeps its own line breaks and loses every other control."""

import logging
import sys

from exporter.http.logs import EscapingFormatter, escape_controls


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "exporter.test",
        logging.WARNING,
        __file__,
        1,
        message,
        args,
        sys.exc_info() if exc_info else None,
    )


def test_every_control_character_is_escaped() -> None:
    controls = "".join(
        chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x2028, 0x202F)]
    )
    escaped = escape_controls(f"a{controls}b")
    assert escaped.isprintable() and escaped.startswith("a\\x00\\x01") and escaped.endswith("b")
    assert "\\x1b" in escaped and "\\x85" in escaped and "\\u2028" in escaped
    assert escape_controls("Zoë, 東京, \\x1b as text") == "Zoë, 東京, \\x1b as text"


def test_a_message_is_one_line_whatever_its_arguments() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    line = formatter.format(record("path %s", "/a\r\nWARNING forged\x1b[2J"))
    assert line == "WARNING path /a\\x0d\\x0aWARNING forged\\x1b[2J"


def test_a_traceback_keeps_its_lines_and_loses_other_controls() -> None:
    formatter = EscapingFormatter("%(message)s")
    try:
        raise ValueError("bad \x1b[31mvalue\x0b\n2026-01-01 INFO forged")
    except ValueError:
        text = formatter.format(record("failed", exc_info=True))
    lines = text.split("\n")
    assert lines[0] == "failed" and lines[1] == "  Traceback (most recent call last):"
    assert lines[-2:] == ["  ValueError: bad \\x1b[31mvalue\\x0b", "  2026-01-01 INFO forged"]
    # Only the record's own first line starts at the margin: nothing can pass for a record.
    assert all(line.startswith("  ") and line.isprintable() for line in lines[1:])


def test_bidirectional_controls_are_escaped() -> None:
    assert escape_controls("a\u202eb\u2066c\u200fd") == "a\\u202eb\\u2066c\\u200fd"
