"""A LISTEN connection that comes back: reconnected (with backoff) when PostgreSQL ends it or a
health check finds it dead, so that a process restarted database or a terminated backend does
not leave a worker polling for the rest of its life."""

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg
from asyncpg import Record

from exporter.db.pool import connect_url

log = logging.getLogger(__name__)

# A connection that answers nothing for this long is taken for dead (a half-open socket is
# otherwise never noticed: nothing is sent on a LISTEN connection).
HEALTH_CHECK_S = 30.0
MAX_BACKOFF_S = 30.0


class Listener:
    def __init__(
        self,
        url: str,
        channel: str,
        on_notify: Callable[[str], None],
        on_connect: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.channel = channel
        self.on_notify = on_notify
        # Notifications sent while it was away are lost: whoever waits re-reads the state.
        self.on_connect = on_connect
        self.connected = False

    async def run_forever(self) -> None:
        backoff = 1.0
        while True:
            connection: asyncpg.Connection[Record] | None = None
            try:
                connection = await asyncpg.connect(
                    connect_url(self.url), server_settings={"application_name": "exporter listen"}
                )
                lost = asyncio.Event()
                connection.add_termination_listener(_setter(lost))
                await connection.add_listener(
                    self.channel, lambda _c, _pid, _channel, payload: self.on_notify(payload)
                )
                self.connected = True
                backoff = 1.0
                self.on_connect()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(HEALTH_CHECK_S):
                            await lost.wait()
                    if not lost.is_set():
                        async with asyncio.timeout(10):
                            await connection.fetchval("SELECT 1")
                log.warning("LISTEN %s: the connection ended; reconnecting", self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN %s: %s; reconnecting in %.0f s", self.channel, exc, backoff)
            finally:
                self.connected = False
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _connection: event.set()
