"""How a replica learns that the store of record changed: wake-ups plus catch-up by position.

The follower runs the replica's catch-up (:meth:`RetrievalService.sync`)
whenever it is woken and at least every ``sync_interval_s``:

- a write made by this process wakes it directly;
- on PostgreSQL, a ``LISTEN`` connection of its own receives the trigger's
  ``NOTIFY`` (payload: the new position) from every replica and
  ``warden ingest``.  Notifications are only a wake-up: they are lost while
  the connection is down, so after every (re)connection the follower catches
  up by position, and the timer catches up anyway when one is missed.  The
  listening connection is probed every ``sync_interval_s`` (a dropped or
  half-open connection is replaced, with backoff);
- on SQLite, the timer picks up what ``warden ingest`` wrote from another process.

Freshness is measured by the applier (``caught_up_at``: when the last
catch-up that found nothing left began); the service turns it into
readiness.  The follower keeps running whatever fails, and says what failed
(:attr:`Follower.last_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("warden.retrieval")


class Follower:
    """The background catch-up of one replica (see the module docstring)."""

    def __init__(
        self,
        sync: Callable[[], Awaitable[int]],
        interval_s: float,
        *,
        connect: Callable[[], Awaitable[Any]] | None = None,
        channel: str = "",
        prune: Callable[[], Awaitable[None]] | None = None,
        prune_every_s: float = 300.0,
    ) -> None:
        self._sync = sync
        self.interval_s = interval_s
        self._connect = connect
        self.channel = channel
        self._prune = prune
        self.prune_every_s = prune_every_s
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False
        """Whether the LISTEN connection is up (always false without one)."""
        self.notified = 0
        """The newest position a notification announced."""
        self.last_error: str | None = None
        self.reconnects = 0
        self._last_prune = time.monotonic()
        self._stopping = False

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._loop(), name="retrieval-follow"))
        if self._connect is not None:
            self._tasks.append(asyncio.create_task(self._listen(), name="retrieval-listen"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    def wake(self) -> None:
        """Catch up now (a local write, a notification, a reconnection)."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
                if self._prune is not None and time.monotonic() - self._last_prune >= self.prune_every_s:
                    self._last_prune = time.monotonic()
                    await self._prune()
                if self.last_error is not None and not self.last_error.startswith("listen"):
                    log.info("retrieval: caught up with the store again")
                    self.last_error = None
            except Exception as e:  # the loop must survive a bad moment (store down, disk full...) and say so
                first = self.last_error is None
                self.last_error = f"catch-up: {type(e).__name__}: {e}"
                if first:
                    log.warning("retrieval: cannot catch up with the store: %s", self.last_error)
                # Back off a little so a store that is down is not hammered by every wake-up.
                await asyncio.sleep(min(self.interval_s, 1.0))

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            pos = int(payload)
        except ValueError:
            return
        self.notified = max(self.notified, pos)
        self._wake.set()

    async def _listen(self) -> None:
        assert self._connect is not None
        backoff = 0.05
        while not self._stopping:
            conn: Any = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(self.channel, self._notified)
                self.listening = True
                backoff = 0.05
                if self.last_error is not None and self.last_error.startswith("listen"):
                    log.info("retrieval: listening for changes again")
                    self.last_error = None
                # Whatever was notified while this connection was down is lost: catch up by position.
                self.wake()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.interval_s):
                            await lost.wait()
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1")  # a half-open connection fails here (command timeout)
                raise ConnectionError("the listening connection was closed")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.listening or self.last_error is None:
                    log.warning("retrieval: change notifications interrupted (%s: %s); reconnecting", type(e).__name__, e)
                self.last_error = f"listen: {type(e).__name__}: {e}"
            finally:
                self.listening = False
                if conn is not None:
                    conn.terminate()
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.interval_s)
