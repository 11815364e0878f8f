"""The audit writer process: the one place that appends to the chain.

Warden's event loop projects and redacts a record (CPU that belongs to the
request); everything after that — hashing the chain, the SQLite inserts, the
commit and its fsync, signing checkpoints — runs in this child process, on
another core and outside the parent's GIL.  In a thread the same work was
bounded by the GIL: the SQLite steps ran in parallel, but every return from
C code waited for a busy event loop to let go (a convoy), so the store and
the request path slowed each other down.

Protocol (a private ``socketpair``; the child is started by
:class:`~proxy.audit.writer_process.WriterProcess` with ``python -P -m proxy.audit.writer FD``): every
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

import contextlib
import logging
import os
import select
import signal
import socket
import sqlite3
import struct
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import leaf_hash, make_checkpoint

if TYPE_CHECKING:
    from llm_warden.proxy.audit.record import Prepared

log = logging.getLogger("warden.audit")

_HEAD = struct.Struct(">II")
_INSERT = (
    "INSERT INTO records (seq, ts_us, kind, request_id, tenant, subject, tools, call_ids, status, prev_hash, hash, body) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
_MULTI = (64, 16, 4)
_INSERT_MULTI = {n: _INSERT + ",(?,?,?,?,?,?,?,?,?,?,?,?)" * (n - 1) for n in _MULTI}


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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
