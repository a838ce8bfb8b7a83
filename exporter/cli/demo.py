"""`exporter demo`: no configuration at all; an embedded PostgreSQL in a local directory."""

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from exporter.errors import InvalidRequest
from exporter.settings import Settings


async def _prepare(settings: Settings, data_dir: Path, rows: int) -> str:
    from exporter.access.keys import create_key
    from exporter.cli.demo_data import is_seeded, seed
    from exporter.db.pool import Pool

    pool = await Pool.open(settings.database_url, size=1)
    try:
        if await is_seeded(pool):
            print(f"reusing the demo data in {data_dir}", file=sys.stderr)
        else:
            print(f"seeding the demo data ({rows:,} events) ...", file=sys.stderr)
            await seed(pool, rows)
        # Keys are shown once; a demo run replaces its key rather than reusing a lost one.
        async with pool.connection() as connection:
            await connection.execute("DELETE FROM exporter.api_keys WHERE name = 'demo'")
        return await create_key(pool, "demo")
    finally:
        await pool.close()


def _check_port(host: str, port: int) -> None:
    """Fail now, not after a minute of seeding, if the port is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # create_server sets SO_REUSEADDR, as uvicorn does.
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise InvalidRequest(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _only_demo_on(data_dir: Path) -> Iterator[None]:
    """One demo per data directory: a second one would replace the first one's key and, when
    it stops, stop the PostgreSQL that the first one still uses."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; don't run two demos on one directory there.
        yield
        return
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequest(
                f"another `exporter demo` is running on {data_dir}; stop it, or pass a "
                "different --data-dir"
            ) from None
        yield
    finally:
        os.close(fd)


def _exit_on(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the `finally` that stops PostgreSQL; the default action of
    # SIGTERM (which uvicorn re-raises after its graceful shutdown) or SIGHUP would kill the
    # process on the spot and leave the server running.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    handled = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, _exit_on) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _client_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _base_url(host: str, port: int) -> str:
    host = _client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announce_when_listening(host: str, port: int, message: Callable[[], str]) -> None:
    """Print `message` once the server accepts connections, so that the first pasted command
    works: uvicorn binds its socket only after the app's startup."""

    def wait() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((_client_host(host), port), timeout=1):
                    print(message(), file=sys.stderr, flush=True)
                    return
            except OSError:
                time.sleep(0.05)

    threading.Thread(target=wait, name="demo-announce", daemon=True).start()


def run_demo(data_dir: Path, host: str, port: int, rows: int) -> int:
    from exporter.cli.embedded import EmbeddedPostgres, require_embedded
    from exporter.cli.serve import serve
    from exporter.schema.migrate import upgrade

    require_embedded()
    started = time.monotonic()
    data_dir = data_dir.resolve()
    if rows < 0:
        raise InvalidRequest("--rows must be 0 or more")
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
        # initdb would refuse it anyway, but as root the library first hands the directory
        # over to its `pgserver` user.
        raise InvalidRequest(f"{data_dir} is neither empty nor a demo's data directory")
    _check_port(host, port)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _only_demo_on(data_dir), _signals_unwind():
        print(f"starting embedded PostgreSQL in {data_dir} ...", file=sys.stderr)
        postgres = EmbeddedPostgres(data_dir)
        try:
            url = postgres.start()
        except Exception as exc:
            raise InvalidRequest(
                f"could not start the embedded PostgreSQL in {data_dir}: {exc!r} "
                f"(its log: {data_dir / 'log'})"
            ) from None
        try:
            # The demo's own database, whatever the environment says.
            os.environ["EXPORTER_DATABASE_URL"] = url
            os.environ.pop("EXPORTER_STATE_DATABASE_URL", None)
            os.environ["EXPORTER_SCHEMAS"] = "public"
            # Its job files in its own directory, not in the checkout's .exporter-jobs: a
            # service and a demo sharing one directory would each sweep the other's files
            # away as files no job of theirs needs. (PostgreSQL leaves alone what it does not
            # know in its data directory; deleting the directory deletes them too.)
            os.environ["EXPORTER_JOB_DIR"] = str(data_dir / "exporter-jobs")
            settings = Settings()
            upgrade(settings.state_url)
            key = asyncio.run(_prepare(settings, data_dir, rows))
            base = _base_url(host, port)
            curl = f'curl -H "Authorization: Bearer {key}"'
            examples = [
                f"{curl} {base}/datasets",
                f"{curl} -OJ '{base}/datasets/events.csv'",
                f"{curl} '{base}/datasets/events.ndjson?select=id,kind,amount&kind=eq.purchase"
                "&limit=5'",
                f"{curl} '{base}/datasets/customers.csv?country=in.(DE,FR)&active=is.true"
                "&order=signed_up.desc'",
            ]
            _announce_when_listening(
                host,
                port,
                lambda: (
                    f"\nexporter demo is ready (in {time.monotonic() - started:.1f} s). Try:\n\n"
                    + "".join(f"  {example}\n" for example in examples)
                    + f"\nAPI docs: {base}/docs\n"
                    "For the CLI (keys, the export log, exports) and the docs' examples, in "
                    "another shell:\n\n"
                    f"  export EXPORTER_DATABASE_URL={shlex.quote(url)}\n"
                    f"  export EXPORTER_KEY={key} KEY={key}\n\n"
                    "Ctrl-C stops the server and the embedded PostgreSQL. The data stays in "
                    f"{data_dir} for the next run; delete it to start over.\n"
                ),
            )
            serve(host, port, workers=1)
        finally:
            print("stopping the embedded PostgreSQL ...", file=sys.stderr)
            # A second Ctrl-C (impatience, or `uv run` passing the signal on) must not cut
            # the shutdown short and leave the server running.
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                postgres.stop()
            finally:
                signal.signal(signal.SIGINT, interrupt)
    return 0
