"""Give memory back after a burst: an idle-time collection and heap trim.

After a burst of concurrent streams, no Python object of it survives, but
the allocators keep the memory they grew to (pymalloc arenas pinned by a few
long-lived blocks, glibc's freed heap), so RSS stays at the burst's
high-water mark.  ``bench/stream_memory.py`` measures it; the remedy that
brings RSS back within 10 % of the pre-burst figure is ``PYTHONMALLOC=malloc``
(set in the container image) plus this task: once nothing has been in flight
for ``[server] idle_trim_s`` after some traffic, it runs ``gc.collect()`` and
glibc's ``malloc_trim(0)``.  A trim walks the heap (10–120 ms), so it runs
only when the process is idle, and at most once per quiet period.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("warden.memory")


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


async def idle_trim(busy: Callable[[], int], served: Callable[[], int], idle_s: float) -> None:
    """Run forever: after traffic, once ``busy()`` has been 0 for ``idle_s``, collect and trim once.

    ``busy`` counts requests in flight; ``served`` only grows (requests begun),
    so a quiet process is not collected again and again.
    """
    trim = _malloc_trim()
    last_served = served()
    quiet_since: float | None = None
    step = max(0.5, idle_s / 4)
    while True:
        await asyncio.sleep(step)
        now = time.monotonic()
        if busy() or served() == last_served:
            quiet_since = None if busy() else quiet_since
            continue
        if quiet_since is None:
            quiet_since = now
            continue
        if now - quiet_since < idle_s:
            continue
        last_served = served()
        quiet_since = None
        t0 = time.perf_counter()
        gc.collect()
        released = trim() if trim is not None else 0
        log.debug("idle memory trim: %.1f ms (released: %s)", (time.perf_counter() - t0) * 1000, bool(released))
