"""The server log's formatter: a value from a request (a path, a header, a parameter, a name)
can hold control characters, and written raw they would move a terminal's cursor, recolour
it, or start what looks like a log line of its own. Every message is written with them
escaped, whoever logs it (our loggers and uvicorn's)."""

import logging
import re
from types import TracebackType

# C0 and C1 controls (NUL to US, DEL, 0x80 to 0x9f: ESC, CR, LF, VT, NEL, ...), Unicode's own
# line and paragraph separators, and its bidirectional controls (which reorder what a
# terminal shows).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a Python escape (`\\x1b`)."""
    return _CONTROLS.sub(_escaped, text)


# Before every line of a traceback: an exception's message may hold a request's text, line
# breaks included, and an indented line can never pass for a record of its own.
TRACEBACK_INDENT = "  "


class EscapingFormatter(logging.Formatter):
    """A record's message is one line, its controls escaped. A traceback keeps its line
    breaks, each of its lines indented and every other control escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: ExcInfo) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    return "\n".join(TRACEBACK_INDENT + escape_controls(line) for line in text.split("\n"))
