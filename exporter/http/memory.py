"""Give freed heap memory back to the operating system (glibc only; elsewhere a no-op).

Imports at startup and the first exports leave freed blocks in malloc's arenas; glibc keeps
them, so the process's resident size stays at its high-water mark. Trimming after startup and
after each export keeps the service's footprint at what it actually holds.
"""

import ctypes
import ctypes.util
import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[], None]:
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


release_free_memory = _malloc_trim()
