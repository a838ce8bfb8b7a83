"""Knowing, inside the app, that this process has begun to shut down.

On SIGTERM or SIGINT uvicorn stops accepting connections, waits up to its graceful-shutdown
timeout (EXPORTER_SHUTDOWN_GRACE_S) for the open ones to end, and only then runs the lifespan's
shutdown. Nothing in ASGI tells the app that the wait has begun; but a job claimed meanwhile
would run where it is about to be cancelled, and an event stream, which never ends on its own
while its export runs, would hold the process for the whole grace period.

uvicorn learns of the signal through handlers it installs with signal.signal
(Server.capture_signals) in every worker process, `--workers N` included (the supervisor
forwards SIGTERM to its children), before the lifespan starts. The lifespan chains its own
handler in front: it notes the signal, then calls uvicorn's. The alternatives are worse:
loop.add_signal_handler would replace uvicorn's handler (uvicorn would never stop), and the app
holds no reference to uvicorn's Server to watch its should_exit.
"""

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]

# Ctrl-C and `kill`/orchestrators: the two signals uvicorn shuts down gracefully on.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ShutdownSignal:
    """`started` is set once this process received SIGTERM or SIGINT (while installed)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self._chained: dict[int, tuple[Handler, Handler]] = {}

    def install(self) -> None:
        # Only the main thread may set signal handlers: an app served from another thread
        # (a test's) learns of its shutdown at the lifespan's end only.
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            # SIG_DFL, SIG_IGN or a handler not set from Python: whoever runs the app does not
            # shut down gracefully on this signal, and we must not change what it does.
            if not callable(previous):
                continue
            handler = self._chain(loop, previous)
            signal.signal(sig, handler)
            self._chained[sig] = (handler, previous)

    def _chain(self, loop: asyncio.AbstractEventLoop, previous: Handler) -> Handler:
        def handler(signum: int, frame: FrameType | None) -> Any:
            # Python runs signal handlers in the main thread between two bytecodes, possibly
            # inside the event loop's own code: the event is set from the loop, through the
            # one call that is safe there (and wakes the loop).
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(self.started.set)
            # Then uvicorn's (or whoever's) handler, as if ours were not there: a second
            # Ctrl-C still forces the exit.
            return previous(signum, frame)

        return handler

    def uninstall(self) -> None:
        for sig, (handler, previous) in self._chained.items():
            # Only if it is still ours: whoever replaced it restores its own.
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)
        self._chained.clear()
