"""The app learns that its process begins to shut down (SIGTERM, Ctrl-C) from a handler chained
in front of uvicorn's."""

import asyncio
import signal
import threading
from types import FrameType

import pytest

from exporter.shutdown import ShutdownSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_noted_and_reaches_the_handler_it_chains(sig: signal.Signals) -> None:
    received: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    # Standing in for uvicorn's handler (and keeping asyncio.run's own SIGINT handler out).
    original = signal.signal(sig, previous)
    try:

        async def main() -> None:
            shutdown = ShutdownSignal()
            shutdown.install()
            try:
                assert not shutdown.started.is_set()
                signal.raise_signal(sig)
                async with asyncio.timeout(1):
                    await shutdown.started.wait()
            finally:
                shutdown.uninstall()
            assert signal.getsignal(sig) is previous

        asyncio.run(main())
    finally:
        signal.signal(sig, original)
    assert received == [sig]


def test_a_signal_nobody_handles_is_left_alone() -> None:
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:

        async def main() -> None:
            shutdown = ShutdownSignal()
            shutdown.install()
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            shutdown.uninstall()

        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        async def main() -> None:
            ShutdownSignal().install()

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
