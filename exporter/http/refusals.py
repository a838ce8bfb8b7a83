"""Requests refused for want of a valid key (401s). Anyone who can reach the port can send
them, as many as they like: one row each in the export log would let them grow the state
database without bound and occupy its small pool. They are counted instead, and written to
the server log at most once a minute, as one line that says how many and the latest."""

import logging
import math
import time

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 60.0
# The latest refused path, as the log line shows it.
MAX_SHOWN_PATH = 200


class UnauthenticatedRefusals:
    def __init__(self, report_interval_s: float = REPORT_INTERVAL_S) -> None:
        self.report_interval_s = report_interval_s
        self.total = 0
        self._unreported = 0
        self._last_report = -math.inf

    def refused(self, path: str, client: str | None) -> None:
        self.total += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._last_report < self.report_interval_s:
            return
        shown = path if len(path) <= MAX_SHOWN_PATH else path[:MAX_SHOWN_PATH] + "..."
        log.warning(
            "%d requests refused without a valid key since the last such line (%d since this"
            " process started); the latest: %s from %s",
            self._unreported,
            self.total,
            shown,
            client or "-",
        )
        self._unreported = 0
        self._last_report = now
