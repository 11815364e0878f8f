"""The audit writer process: the one place that appends to the chain.

Warden's event loop projects and redacts a record (CPU that belongs to the
request); everything after that — hashing the chain, the SQLite inserts, the
commit and its fsync, signing checkpoints — runs in this child process, on
another core and outside the parent's GIL.  In a thread the same work was
bounded by the GIL: the SQLite steps ran in parallel, but every return from
C code waited for a busy event loop to let go (a convoy), so the store and
the request path slowed each other down.

Protocol (a private ``socketpair``; the child is started by
:class:`WriterProcess` with ``python -P -m proxy.audit.writer FD``): every
message is a frame ``u32 total || u32 header_len || header JSON || blob``.

- parent -> child ``{"op": "init", "path", "synchronous", "origin", "every",
  "group_max", "token"}``, blob = the 32-byte Ed25519 seed (never on the
  command line or in the environment, where ``/proc`` would show it);
- ``{"op": "append", "id", "reason", "rows": [[ts_us, kind, request_id,
  tenant, subject, tools, call_ids, status, body_len], ...]}``, blob = the
  record bodies back to back;
- ``{"op": "stop", "id"}``;
- child -> parent, one answer per request, in order: ``{"id", "ok": true,
  "note", "seq", "dup", "commit"}`` or ``{"id", "ok": false, "error"}``.

Group commit happens here: the parent sends records as they come (it never
waits for a commit before sending more), and the child appends every frame
that arrived while it was committing — up to ``group_max`` records — in one
transaction, so one fsync covers them all.  The answer to the last frame of a
group carries ``commit = {"us", "records"}`` (the transaction's duration and
size, for the commit metrics).

Exactly once: each append carries a batch id, and the transaction that
appends also stores ``meta['writer:<token>']`` = the highest id it holds.
Frames resent after the child died (their answers lost) are skipped, and
answered ``dup``, when they were already committed, so a crash of the child
never writes a record twice.

Lifetime: the child ignores SIGINT/SIGTERM/SIGHUP (a Ctrl-C or a hang-up to
the process group must not cut a commit short; the parent drains and stops it,
and reloads on SIGHUP) and SIGXFSZ (a file-size limit becomes an I/O error of
the commit, not a kill).  It exits on
``stop`` or when the parent's end of the socket closes — also when the parent
was SIGKILLed, after committing every frame the parent had already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
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

from proxy.audit.chain import leaf_hash, make_checkpoint, seed_bytes

if TYPE_CHECKING:
    from proxy.audit.record import Prepared

log = logging.getLogger("warden.audit")

_HEAD = struct.Struct(">II")
_INSERT = (
    "INSERT INTO records (seq, ts_us, kind, request_id, tenant, subject, tools, call_ids, status, prev_hash, hash, body) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
_MULTI = (64, 16, 4)
_INSERT_MULTI = {n: _INSERT + ",(?,?,?,?,?,?,?,?,?,?,?,?)" * (n - 1) for n in _MULTI}
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class WriterGone(Exception):
    """The writer process ended (or could not start); its answer to a request is unknown."""


class WriterError(Exception):
    """The writer process answered that a commit failed (the transaction was rolled back)."""




# -- framing -----------------------------------------------------------------


def frame(header: dict[str, Any], blob: bytes = b"") -> bytes:
    """One message: ``u32 total || u32 header_len || header || blob``."""
    h = orjson.dumps(header)
    return _HEAD.pack(4 + len(h) + len(blob), len(h)) + h + blob


def append_parts(batch_id: int, preps: Sequence[Prepared], reason: str | None) -> list[bytes]:
    """The ``append`` frame of a group of records, as parts for ``writelines`` (the bodies are not copied)."""
    rows = [[p.ts_us, p.kind, p.request_id, p.tenant, p.subject, p.tools, p.call_ids, p.status, len(p.body)] for p in preps]
    h = orjson.dumps({"op": "append", "id": batch_id, "reason": reason, "rows": rows})
    size = sum(len(p.body) for p in preps)
    return [_HEAD.pack(4 + len(h) + size, len(h)) + h, *(p.body for p in preps)]


def _split(payload: memoryview) -> tuple[dict[str, Any], memoryview]:
    (hlen,) = struct.unpack_from(">I", payload)
    header = orjson.loads(payload[4 : 4 + hlen])
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, payload[4 + hlen :]


class _FrameReader:
    """Reads whole frames from a blocking socket into reused buffers (one per frame of a group).

    Reusing them keeps a group of a few MB from touching fresh memory each
    time; ``_batch`` copies each record body out into ``bytes`` (faster to
    bind and hash than a memoryview), so nothing points into a buffer once
    the next frame is read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._bufs: list[bytearray] = []
        self._head = bytearray(4)
        # poll, not select: the child keeps the fd number the parent had, which is above FD_SETSIZE (1024)
        # in a server with many connections, and select() refuses those.
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def _fill(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                return False
            got += n
        return True

    def read(self, slot: int) -> tuple[dict[str, Any], memoryview] | None:
        """The next frame (in buffer ``slot``), or ``None`` at the end of the stream."""
        if not self._fill(memoryview(self._head)):
            return None
        (n,) = struct.unpack(">I", self._head)
        while len(self._bufs) <= slot:
            self._bufs.append(bytearray())
        if len(self._bufs[slot]) < n:
            self._bufs[slot] = bytearray(max(n, 2 * len(self._bufs[slot])))  # a new one: views of the old may live on
        view = memoryview(self._bufs[slot])[:n]
        if not self._fill(view):
            return None
        return _split(view)

    def ready(self) -> bool:
        """Whether another frame (or the end of the stream) is already waiting."""
        return bool(self._poll.poll(0))


# -- the append transaction ------------------------------------------------------


@dataclass(slots=True)
class Batch:
    """One append request inside a group: its id, rows, bodies and checkpoint reason."""

    id: int
    rows: Sequence[Sequence[Any]]
    bodies: Sequence[bytes]
    reason: str | None = None


@dataclass(slots=True)
class AppendResult:
    """What a committed append returned: the checkpoint note it wrote (if any), the head
    sequence number after it, whether it had been committed before (``dup``), and for the
    last batch of a group the transaction's ``(µs, records)``."""

    note: str | None
    seq: int
    dup: bool = False
    commit: tuple[int, int] | None = None


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert rows with multi-row INSERTs of a few fixed sizes (cached statements: fewer steps)."""
    i, n = 0, len(rows)
    for size in _MULTI:
        sql = _INSERT_MULTI[size]
        while n - i >= size:
            conn.execute(sql, [v for r in rows[i : i + size] for v in r])
            i += size
    if i < n:
        conn.executemany(_INSERT, rows[i:])


def append_tx(
    conn: sqlite3.Connection,
    batches: Sequence[Batch],
    origin: str,
    key: Ed25519PrivateKey,
    every: int,
    marker: str | None = None,
) -> tuple[str | None, int, set[int]]:
    """Append a group of batches (and maybe a checkpoint) in one ``BEGIN IMMEDIATE`` transaction.

    The head is read inside the transaction, so several writers (processes)
    of one database keep one chain.  With ``marker`` (a meta key), batches
    whose id is at or below the marker's value were committed before and are
    skipped; the marker moves to the highest id appended.  Returns the
    checkpoint note (or ``None``), the head's sequence number and the ids
    skipped as duplicates.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        done_through = 0
        if marker is not None:
            got = conn.execute("SELECT value FROM meta WHERE key = ?", (marker,)).fetchone()
            done_through = int(got[0]) if got is not None else 0
        dups = {b.id for b in batches if b.id <= done_through}
        row = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
        seq, h = int(row[0]), bytes(row[1])
        start = seq
        out = []
        reason = None
        for b in batches:
            if b.id in dups:
                continue
            reason = reason or b.reason
            for r, body in zip(b.rows, b.bodies, strict=True):
                seq += 1
                prev, h = h, leaf_hash(h, seq, body)
                out.append((seq, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], prev, h, body))
        if out:
            _insert_rows(conn, out)
            conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, h))
        note = None
        why = reason or ("periodic" if seq // every > start // every else None)
        if why is not None and seq > 0:
            last = conn.execute("SELECT COALESCE(MAX(size), 0) FROM checkpoints").fetchone()
            if seq > int(last[0]):
                note = make_checkpoint(origin, seq, h, int(time.time()), key)
                conn.execute(
                    "INSERT INTO checkpoints (size, hash, note, created_us, reason) VALUES (?,?,?,?,?)",
                    (seq, h, note, int(time.time() * 1_000_000), why),
                )
        top = max((b.id for b in batches if b.id not in dups), default=0)
        if marker is not None and top:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (marker, str(top)),
            )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    return note, seq, dups


# -- the child ---------------------------------------------------------------------


def _batch(header: dict[str, Any], blob: memoryview) -> Batch:
    rows = header["rows"]
    bodies: list[bytes] = []
    pos = 0
    for r in rows:
        n = int(r[8])
        bodies.append(bytes(blob[pos : pos + n]))  # bytes bind and hash ~10 µs faster per record than memoryviews
        pos += n
    if pos != len(blob):
        raise ValueError("record bodies do not match their lengths")
    reason = header.get("reason")
    return Batch(int(header["id"]), rows, bodies, reason if isinstance(reason, str) else None)


def _commit_group(conn: sqlite3.Connection, group: list[Batch], origin: str, key: Ed25519PrivateKey, every: int, marker: str) -> bytes:
    """Commit one group; the answers to all its frames, as one buffer."""
    t0 = time.perf_counter()
    try:
        note, seq, dups = append_tx(conn, group, origin, key, every, marker)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        return b"".join(frame({"id": b.id, "ok": False, "error": err}) for b in group)
    took = int((time.perf_counter() - t0) * 1_000_000)
    records = sum(len(b.rows) for b in group if b.id not in dups)
    out = []
    for i, b in enumerate(group):
        last = i == len(group) - 1
        answer: dict[str, Any] = {"id": b.id, "ok": True, "seq": seq, "dup": b.id in dups, "note": note if last else None}
        if last:
            answer["commit"] = [took, records]
        out.append(frame(answer))
    return b"".join(out)


def _serve(sock: socket.socket) -> int:
    reader = _FrameReader(sock)
    first = reader.read(0)
    if first is None:
        return 0
    init, blob = first
    try:
        key = Ed25519PrivateKey.from_private_bytes(bytes(blob))
        # mode=rw: the server creates the database; a writer never makes a new, empty one where it vanished.
        conn = sqlite3.connect(f"file:{urllib.parse.quote(init['path'])}?mode=rw", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if init['synchronous'] == 'FULL' else 'NORMAL'}")
    except Exception as e:
        sock.sendall(frame({"id": 0, "ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 1
    sock.sendall(frame({"id": 0, "ok": True, "pid": os.getpid()}))
    origin, every, group_max = str(init["origin"]), int(init["every"]), int(init["group_max"])
    marker = f"writer:{init['token']}"
    try:
        while True:
            group: list[Batch] = []
            records = 0
            control: dict[str, Any] | None = None
            eof = False
            # Block for the first frame, then take every frame already waiting (they arrived
            # during the last commit) up to group_max records: that is the group commit.
            while not group or (records < group_max and reader.ready()):
                got = reader.read(len(group))
                if got is None:
                    eof = True
                    break
                header, blob = got
                if header.get("op") != "append":
                    control = header
                    break
                try:
                    b = _batch(header, blob)
                except (KeyError, TypeError, ValueError) as e:
                    sock.sendall(frame({"id": header.get("id", 0), "ok": False, "error": f"bad frame: {e}"}))
                    continue
                group.append(b)
                records += len(b.rows)
            if group:
                sock.sendall(_commit_group(conn, group, origin, key, every, marker))
            if eof:
                return 0
            if control is not None:
                if control.get("op") == "stop":
                    # Forget this parent's marker: a new parent brings a new token.
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("DELETE FROM meta WHERE key = ?", (marker,))
                    sock.sendall(frame({"id": control.get("id", 0), "ok": True}))
                    return 0
                sock.sendall(frame({"id": control.get("id", 0), "ok": False, "error": f"unknown op {control.get('op')!r}"}))
    except (BrokenPipeError, ConnectionResetError):
        return 0
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    """The child's entry point: ``python -m proxy.audit.writer FD``."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGXFSZ, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    try:
        return _serve(sock)
    except Exception as e:
        # A bug, not an I/O error (those are answered per frame): one log line like the server's.
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "error", "logger": "warden.audit.writer"}
        sys.stderr.write(orjson.dumps({**line, "msg": f"the audit writer failed: {type(e).__name__}: {e}"}).decode() + "\n")
        return 1
    finally:
        sock.close()


# -- the parent's handle ---------------------------------------------------------------


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
                [sys.executable, "-P", "-m", "proxy.audit.writer", str(child.fileno())],
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
