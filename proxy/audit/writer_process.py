"""The server's handle on the audit writer process (:mod:`proxy.audit.writer`).

:class:`WriterProcess` starts the child, sends it append frames as records
come (never waiting for a commit before sending more), reads its answers,
restarts it when it dies and resends what it had not answered — exactly
once, by the batch marker — and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import seed_bytes
from llm_warden.proxy.audit.writer import AppendResult, WriterError, WriterGone, _split, append_parts, frame

if TYPE_CHECKING:
    from llm_warden.proxy.audit.record import Prepared

log = logging.getLogger("warden.audit")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


Settled = Callable[[AppendResult | None, BaseException | None], None]


@dataclass(slots=True)
class _Frame:
    id: int
    parts: list[bytes]
    records: int
    future: asyncio.Future[AppendResult]
    then: Settled | None = None
    sends: int = 0

    def settle(self, result: AppendResult | None, exc: BaseException | None) -> None:
        """Settle the future, and call ``then`` right away (not one event-loop turn later, as a done-callback would)."""
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
            self.future.exception()  # retrieved: a caller that only passed ``then`` need not await it
        else:
            assert result is not None
            self.future.set_result(result)
        if self.then is not None:
            self.then(result, exc)


class WriterProcess:
    """Starts, feeds, restarts and stops the writer child of one audit store.

    :meth:`submit` queues an append and returns a future of its
    :class:`AppendResult` (or :class:`WriterError` when the commit failed,
    :class:`WriterGone` when no writer could take it).  Frames stay here until
    answered: when the child dies they are resent, in order, to a new one
    (exactly once by the batch marker); a frame sent ``MAX_SENDS`` times
    without an answer fails instead, so a frame that kills the child cannot
    loop forever.
    """

    MAX_SENDS = 2
    RESTART_GAP_S = 0.5

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        origin: str,
        every: int,
        group_max: int,
        key: Ed25519PrivateKey,
        hide_env: Sequence[str] = (),
    ) -> None:
        self.path = path
        self._hide_env = frozenset(hide_env)
        self.synchronous = synchronous
        self.origin = origin
        self.every = every
        self.group_max = group_max
        self._seed = seed_bytes(key)
        self._token = os.urandom(12).hex()
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listen: asyncio.Task[None] | None = None
        self._frames: dict[int, _Frame] = {}
        self._init: asyncio.Future[dict[str, Any]] | None = None
        self._stop_answer: asyncio.Future[dict[str, Any]] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._next_id = 0
        self._closed = False
        self._ready = False
        self._spawned_at = 0.0
        self.restarts = 0
        self.on_commit: Callable[[float, int], None] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self._writer is not None and self._listen is not None and not self._listen.done()

    @property
    def inflight_records(self) -> int:
        """Records sent (or waiting to be resent) and not yet answered."""
        return sum(f.records for f in self._frames.values())

    async def start(self) -> None:
        """Start the child and wait until it has opened the database (raises :class:`WriterGone`)."""
        await self._spawn()

    async def _spawn(self) -> None:
        await self._kill()
        self._spawned_at = time.monotonic()
        try:
            parent, child = socket.socketpair()
        except OSError as e:
            raise WriterGone(f"cannot start the audit writer: {e}") from None
        # The signing key's variable stays out of the child's environment (it gets the key over the socket).
        env = {k: v for k, v in os.environ.items() if k not in self._hide_env}
        try:
            proc = await asyncio.to_thread(
                subprocess.Popen,
                # -P: ``-m`` would put the working directory first on sys.path (Warden's own start does not).
                [sys.executable, "-P", "-m", "llm_warden.proxy.audit.writer", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        except OSError as e:
            parent.close()
            raise WriterGone(f"cannot start the audit writer: {e}") from None
        finally:
            child.close()
        self._proc = proc
        reader, self._writer = await asyncio.open_connection(sock=parent, limit=1 << 20)
        self._init = asyncio.get_running_loop().create_future()
        self._listen = asyncio.create_task(self._read_answers(reader), name="audit-writer-answers")
        init = {"op": "init", "path": self.path, "synchronous": self.synchronous, "origin": self.origin, "every": self.every}
        self._writer.write(frame({**init, "group_max": self.group_max, "token": self._token}, self._seed))
        try:
            answer = await asyncio.wait_for(self._init, START_TIMEOUT_S)
        except (WriterGone, TimeoutError):
            await self._kill()
            raise WriterGone("the audit writer did not start") from None
        if not answer.get("ok"):
            await self._kill()
            raise WriterGone(f"the audit writer cannot open {self.path}: {answer.get('error')}")
        if self._listen.done():
            # It ended right after answering, and its end of stream was read before it counted as running
            # (so the reader scheduled no restart): a failed start, not a writer to send frames to.
            await self._kill()
            raise WriterGone("the audit writer ended as it started")
        self._ready = True

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        cancelled = False
        try:
            while True:
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                header, _ = _split(memoryview(await reader.readexactly(n)))
                self._answer(header)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, orjson.JSONDecodeError):
            pass
        except asyncio.CancelledError:
            # The event loop is shutting down (without stop()): the writer is alive and must be left to
            # commit what it was sent and exit at the end of the stream, not killed by a restart.
            cancelled = True
            raise
        finally:
            for fut in (self._init, self._stop_answer):
                if fut is not None and not fut.done():
                    fut.set_exception(WriterGone("the audit writer process ended"))
            # A writer that was running and ended on its own is replaced at once (not at the next
            # record), so readiness and the unanswered frames do not wait for traffic.
            if self._ready and not self._closed and self._restart is None and not cancelled:
                self._restart = asyncio.get_running_loop().create_task(self._respawn(), name="audit-writer-restart")
            self._ready = False

    def _answer(self, header: dict[str, Any]) -> None:
        bid = int(header.get("id", 0))
        if bid == 0:
            if self._init is not None and not self._init.done():
                self._init.set_result(header)
            return
        if bid < 0:
            if self._stop_answer is not None and not self._stop_answer.done():
                self._stop_answer.set_result(header)
            return
        fr = self._frames.pop(bid, None)
        if fr is None:
            return
        if not header.get("ok"):
            fr.settle(None, WriterError(str(header.get("error"))))
            return
        note = header.get("note")
        commit = header.get("commit")
        took = (int(commit[0]), int(commit[1])) if isinstance(commit, list) and len(commit) == 2 else None
        if took is not None and self.on_commit is not None:
            self.on_commit(took[0] / 1_000_000, took[1])
        fr.settle(AppendResult(note if isinstance(note, str) else None, int(header.get("seq") or 0), bool(header.get("dup")), took), None)

    def submit(self, preps: Sequence[Prepared], reason: str | None = None, then: Settled | None = None) -> asyncio.Future[AppendResult]:
        """Send an append now (or as soon as a restarted writer runs).

        The returned future settles with the answer; ``then(result, error)``,
        if given, is called the moment the answer is read.
        """
        if self._closed:
            raise WriterGone("the audit writer is stopped")
        self._next_id += 1
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        fr = _Frame(self._next_id, append_parts(self._next_id, preps, reason), len(preps), fut, then)
        self._frames[fr.id] = fr
        if self.alive and self._restart is None:
            self._send(fr)
        elif self._restart is None:
            self._restart = asyncio.get_running_loop().create_task(self._respawn(), name="audit-writer-restart")
        return fut

    async def append(self, preps: Sequence[Prepared], reason: str | None = None) -> AppendResult:
        """:meth:`submit` and wait for the answer."""
        return await self.submit(preps, reason)

    async def drain(self) -> None:
        """Wait while the socket's buffer is full (backpressure from a slow writer)."""
        if self.alive and self._writer is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._writer.drain()

    def _send(self, fr: _Frame) -> None:
        assert self._writer is not None
        fr.sends += 1
        # A failed write needs no handling here: the answer reader sees the end of the stream and
        # restarts the writer, which resends every unanswered frame (this one included).
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._writer.writelines(fr.parts)

    async def _respawn(self) -> None:
        """Start a new child and resend every unanswered frame to it, in order.

        Starts are at least ``RESTART_GAP_S`` apart, so a writer that dies at
        once (a broken disk) does not turn into a busy loop of restarts.

        A frame that is not resent (sent ``MAX_SENDS`` times, or no writer
        could be started) may still have been committed by a writer that died
        before answering.  Once every writer that had it is gone, the batch
        marker says which: those are answered as duplicates, not failed — a
        failed batch-mode record is retried as a new frame and would be
        written twice.  ``_restart`` stays set meanwhile, so nothing new is
        sent (and committed past them) before the marker is read.
        """
        old_gone = False
        try:
            if self._closed:
                raise WriterGone("the audit writer is stopped")
            self.restarts += 1
            log.error("audit: the writer process is not running; starting a new one (%d unanswered batches)", len(self._frames))
            await asyncio.sleep(max(0.0, self._spawned_at + self.RESTART_GAP_S - time.monotonic()))
            if self._closed:
                raise WriterGone("the audit writer is stopped")
            await self._kill()
            old_gone = True
            stuck = [fr for fr in self._frames.values() if fr.sends >= self.MAX_SENDS]
            if stuck:
                through = await self._committed_through()
                for fr in stuck:
                    self._frames.pop(fr.id, None)
                    self._settle_unanswered(fr, WriterGone(f"the audit writer ended {fr.sends} times while committing this batch"), through)
            await self._spawn()
        except Exception as e:
            if not isinstance(e, WriterGone):
                log.exception("audit: could not start the writer process")
                e = WriterGone(f"cannot start the audit writer: {type(e).__name__}: {e}")
                await self._kill()
            through = await self._committed_through() if old_gone and any(fr.sends for fr in self._frames.values()) else None
            self._restart = None
            self._fail_all(e, through)
            return
        self._restart = None
        for fr in list(self._frames.values()):
            self._send(fr)

    async def _committed_through(self) -> int | None:
        """This parent's batch marker: every frame with an id up to it was committed (``None``: unreadable)."""

        def read() -> int | None:
            try:
                conn = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=rw", uri=True, timeout=10)
            except sqlite3.Error:
                return None
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"writer:{self._token}",)).fetchone()
            except sqlite3.Error:
                return None
            finally:
                conn.close()
            return int(row[0]) if row is not None else 0

        return await asyncio.to_thread(read)

    @staticmethod
    def _settle_unanswered(fr: _Frame, err: Exception, through: int | None) -> None:
        if through is not None and fr.sends and fr.id <= through:
            fr.settle(AppendResult(None, 0, dup=True), None)
        else:
            fr.settle(None, err)

    def _fail_all(self, err: Exception, through: int | None = None) -> None:
        """Settle every frame: with ``err``, or as a duplicate when ``through`` (the marker) shows it committed."""
        frames, self._frames = self._frames, {}
        for fr in frames.values():
            self._settle_unanswered(fr, err, through)

    async def stop(self) -> None:
        """Ask the child to finish (after every frame sent) and wait for it; killed after ``STOP_TIMEOUT_S``."""
        self._closed = True
        if self._restart is not None:
            with contextlib.suppress(BaseException):
                await self._restart
        if self.alive and self._writer is not None:
            self._stop_answer = asyncio.get_running_loop().create_future()
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.write(frame({"op": "stop", "id": -1}))
            with contextlib.suppress(WriterGone, TimeoutError):
                await asyncio.wait_for(self._stop_answer, STOP_TIMEOUT_S)
        self._fail_all(WriterGone("the audit writer is stopped"))
        await self._close_transport()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def _kill(self) -> None:
        self._ready = False
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        await self._close_transport()
        if proc is not None:
            await asyncio.to_thread(proc.wait)

    async def _close_transport(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None
        if self._listen is not None:
            with contextlib.suppress(BaseException):
                await self._listen
            self._listen = None


