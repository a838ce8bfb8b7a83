"""Time limits of an HTTP export: EXPORTER_MAX_SECONDS, and the slowest pace a client may read
at (EXPORTER_MIN_BYTES_PER_SECOND over EXPORTER_MIN_RATE_WINDOW_S).

A slow client shows as time spent inside the server's `send`: uvicorn's send waits while the
socket's buffers are full. So the client is judged by the bytes it took while the export was
waiting on it; an export that is slow because PostgreSQL is slow (a selective filter on a large
table) is not the client's fault and is not cut off.
"""

import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio

# How often the limits are checked: well within a second of their being reached.
_TICK_S = 0.25


class SendMeter:
    """Bytes sent so far, and the time spent waiting inside send()."""

    def __init__(self) -> None:
        self.bytes = 0
        self._waited_s = 0.0
        self._since: float | None = None

    @contextlib.contextmanager
    def sending(self, size: int) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._waited_s += time.monotonic() - self._since
            self._since = None
            self.bytes += size

    def waited_s(self) -> float:
        # A send still waiting counts too: a client that stopped reading never returns it.
        ongoing = time.monotonic() - self._since if self._since is not None else 0.0
        return self._waited_s + ongoing


@dataclass(frozen=True)
class PaceLimits:
    max_seconds: float | None = None
    min_bytes_per_second: int | None = None
    window_s: float = 30.0

    @property
    def active(self) -> bool:
        return self.max_seconds is not None or self.min_bytes_per_second is not None

    async def first_broken(self, meter: SendMeter, started: float) -> tuple[str, str]:
        """Wait until a limit is broken; its name (as the export log has it) and why."""
        # (time, bytes sent, time waited on the client) a tick apart, spanning the window.
        samples = collections.deque([(started, 0, 0.0)])
        while True:
            await anyio.sleep(_TICK_S)
            now = time.monotonic()
            if self.max_seconds is not None and now - started >= self.max_seconds:
                return "max_seconds", f"the export ran longer than {self.max_seconds:g} s"
            if self.min_bytes_per_second is None:
                continue
            samples.append((now, meter.bytes, meter.waited_s()))
            while len(samples) > 1 and samples[1][0] <= now - self.window_s:
                samples.popleft()
            then, sent_then, waited_then = samples[0]
            span = now - then
            if span < self.window_s:
                continue
            rate = (meter.bytes - sent_then) / span
            # Mostly waiting on the client, and the client took too little.
            if meter.waited_s() - waited_then >= span / 2 and rate < self.min_bytes_per_second:
                return (
                    "min_bytes_per_second",
                    f"the client read {rate:.0f} bytes/s over {span:.0f} s, below the "
                    f"minimum of {self.min_bytes_per_second}",
                )
