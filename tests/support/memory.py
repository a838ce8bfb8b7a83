"""What a process holds, as Linux reports it in /proc."""

from pathlib import Path


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def mapped_files(pid: int) -> str:
    """The process's memory map (/proc/<pid>/maps): which files, libraries included, it has
    mapped."""
    return Path(f"/proc/{pid}/maps").read_text()
