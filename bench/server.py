"""`exporter serve` as users run it: a subprocess on a real socket, with its memory watched."""

import http.client
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def exporter_command() -> list[str]:
    """The installed `exporter` script next to this interpreter, else `python -m exporter`."""
    script = Path(sys.executable).parent / "exporter"
    if script.exists():
        return [str(script)]
    found = shutil.which("exporter")
    return [found] if found else [sys.executable, "-m", "exporter"]


def exporter_env(database_url: str) -> dict[str, str]:
    # The concurrency measurement runs 8 exports of one key at once (the default limit per key
    # is 2); the warm-up of --workers 2 runs up to 8 as well. Settings from the environment
    # still win.
    return {
        "EXPORTER_MAX_EXPORTS_PER_KEY": "16",
        "EXPORTER_MAX_EXPORTS": "16",
        **os.environ,
        "EXPORTER_DATABASE_URL": database_url,
    }


def run_exporter(database_url: str, *args: str) -> str:
    """Run an `exporter` command to completion; its stdout."""
    done = subprocess.run(
        [*exporter_command(), *args],
        env=exporter_env(database_url),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"exporter {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def migrate(database_url: str) -> None:
    run_exporter(database_url, "migrate")


def create_key(database_url: str) -> tuple[str, str]:
    name = f"bench-{secrets.token_hex(4)}"
    out = run_exporter(database_url, "keys", "create", name)
    return name, out.strip().splitlines()[-1]


def revoke_key(database_url: str, name: str) -> None:
    run_exporter(database_url, "keys", "revoke", name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    workers: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tree(self) -> list[Any]:
        """The server's processes: the one we started and all its descendants."""
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: with --workers N > 1 uvicorn's children (not
        its supervisor), else the one process."""
        if self.workers == 1:
            return [self.process.pid]
        pids = []
        for child in psutil.Process(self.process.pid).children():
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "resource_tracker" not in cmdline:
                pids.append(child.pid)
        return pids

    def uss(self) -> int:
        total = 0
        for process in self.tree():
            try:
                total += int(process.memory_full_info().uss)
            except psutil.Error:
                continue
        return total

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def start_server(database_url: str, log_dir: Path, workers: int = 1) -> Server:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*exporter_command(), "serve", "--port", str(port), "--workers", str(workers)],
            env=exporter_env(database_url),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, port, workers, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exporter serve exited early:\n{server.log_tail()}")
        if _healthy(port) and len(server.worker_pids()) >= workers:
            return server
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"exporter serve did not start:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    server.process.terminate()
    try:
        server.process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    # Only the processes this server started, by pid, should any outlive their parent.
    for child in children:
        try:
            child.wait(timeout=5)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.Error:
            pass


def vm_hwm_bytes(pid: int) -> int | None:
    """The kernel's record of a process's peak RSS over its whole life."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class RssSampler:
    """Samples the RSS of a server's whole process tree every `interval_s` in a thread while
    in its `with` block: the peak of the tree's sum and the peak of each process. Also the
    CPU time the tree spent meanwhile."""

    server: Server
    interval_s: float = 0.02
    peak_total: int = 0
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    cpu_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _processes: dict[int, Any] = field(default_factory=dict)
    _cpu_start: float = 0.0

    def _refresh(self) -> None:
        try:
            for process in self.server.tree():
                self._processes.setdefault(process.pid, process)
        except psutil.Error:
            pass

    def _cpu(self) -> float:
        total = 0.0
        for process in self._processes.values():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def sample(self) -> None:
        total = 0
        for pid, process in list(self._processes.items()):
            try:
                rss = int(process.memory_info().rss)
            except psutil.Error:
                continue
            total += rss
            self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), rss)
        self.peak_total = max(self.peak_total, total)
        self.samples += 1

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 1:
                self._refresh()
                refreshed = time.monotonic()
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._refresh()
        self._cpu_start = self._cpu()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.cpu_s = self._cpu() - self._cpu_start

    def peak_worker(self, pids: list[int]) -> int:
        return max((self.peak_by_pid.get(pid, 0) for pid in pids), default=0)
