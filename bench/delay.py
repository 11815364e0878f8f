"""Provider times for benchmarks, kept to a fraction of a millisecond.

uvloop's timers count whole milliseconds (``asyncio.sleep(0.0014)`` ends
after 1 ms or 2 ms, depending on where in the millisecond it began), so two
paths whose real difference is 0.3 ms can show any difference between -1 and
+1 ms when each waits for a simulated provider.  A thread in the same process
would be precise but needs the GIL to wake the event loop, which makes a busy
loop look slower than it is.  So the waiting happens where a real provider's
does: in another process, answered over a socket.

:class:`Delays` starts that process; ``await delays.sleep(s)`` sends it a
deadline (``time.monotonic()`` is the same clock in every process) and
resolves when the answer arrives — the same event-loop wake-up as a
response from a provider.  The child keeps a heap of deadlines in one thread
(``threading.Condition.wait`` with a timeout: tens of microseconds late, the
same for every path).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

_MSG = struct.Struct(">Qd")

CHILD = r"""
import heapq, socket, struct, sys, threading, time
sock = socket.socket(fileno=int(sys.argv[1]))
heap, cond = [], threading.Condition()
def timer():
    while True:
        with cond:
            while not heap:
                cond.wait()
            when, tag = heap[0]
            left = when - time.monotonic()
            if left > 0:
                cond.wait(left)
                continue
            heapq.heappop(heap)
        try:
            sock.sendall(tag)
        except OSError:
            return
threading.Thread(target=timer, daemon=True).start()
buf = b""
while True:
    data = sock.recv(1 << 16)
    if not data:
        break
    buf += data
    n = len(buf) // 16 * 16
    with cond:
        for i in range(0, n, 16):
            heapq.heappush(heap, (struct.unpack_from(">d", buf, i + 8)[0], buf[i : i + 8]))
        cond.notify()
    buf = buf[n:]
"""


class Delays:
    """Sleeps measured by another process (see the module's docstring)."""

    def __init__(self) -> None:
        self._futures: dict[bytes, asyncio.Future[None]] = {}
        self._next = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        mine, theirs = socket.socketpair()
        self._proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=mine)
        self._task = asyncio.create_task(self._answers(reader))
        # One round trip: the child is up (a Python start takes tens of ms) before the first timed sleep.
        await self.sleep(0)

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        while True:
            tag = await reader.readexactly(8)
            fut = self._futures.pop(tag, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        assert self._writer is not None, "start() first"
        self._next += 1
        msg = _MSG.pack(self._next, time.monotonic() + seconds)
        fut = asyncio.get_running_loop().create_future()
        self._futures[msg[:8]] = fut
        self._writer.write(msg)
        await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._proc is not None:
            await asyncio.wait_for(self._proc.wait(), 10)
