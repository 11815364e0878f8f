"""The audit database's schema and upkeep: retention, writers' batch markers, checkpoint-file bookkeeping.

Functions on a connection of the server's own (:class:`~proxy.audit.sqlite.SQLiteAuditLog`
calls them at start, hourly and at stop); the appends themselves happen in
the writer process (:mod:`proxy.audit.writer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiosqlite

from llm_warden.proxy.audit.chain import read_checkpoint_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    tenant TEXT,
    subject TEXT,
    tools TEXT,
    call_ids TEXT,
    status INTEGER,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
CREATE INDEX IF NOT EXISTS records_tenant_ts ON records (tenant, ts_us);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts_us);
CREATE INDEX IF NOT EXISTS records_subject ON records (subject);
CREATE INDEX IF NOT EXISTS records_status ON records (status);
CREATE INDEX IF NOT EXISTS records_kind ON records (kind);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    note TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, verifier TEXT NOT NULL, added_us INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
WHEN OLD.seq > COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_through'), 0)
BEGIN SELECT RAISE(ABORT, 'audit records are append-only (only retention pruning deletes)'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"""


def wall_us() -> int:
    """Wall-clock time in integer microseconds (how the log stores times)."""
    return int(time.time() * 1_000_000)


async def prune_mark(db: aiosqlite.Connection, cutoff: int) -> int:
    """Move ``pruned_through`` to the newest checkpoint eligible for ``cutoff``; the mark to delete through (0: none)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        async with db.execute("SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_through'), 0)") as cur:
            pruned = int((await cur.fetchone() or (0,))[0])
        async with db.execute("SELECT MIN(seq) FROM records WHERE ts_us >= ?", (cutoff,)) as cur:
            row = await cur.fetchone()
        bound = (int(row[0]) - 1) if row is not None and row[0] is not None else None
        if bound is None:
            async with db.execute("SELECT seq FROM head WHERE id = 1") as cur:
                bound = int((await cur.fetchone() or (0,))[0])
        async with db.execute("SELECT MAX(size) FROM checkpoints WHERE size > ? AND size <= ?", (pruned, bound)) as cur:
            row = await cur.fetchone()
        moved = int(row[0]) if row is not None and row[0] is not None else 0
        if moved:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_through', ?)", (str(moved),))
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            await db.execute("ROLLBACK")
        raise
    return moved or pruned


async def prune_delete(db: aiosqlite.Connection, through: int, chunk: int, pause_s: float) -> int:
    """Delete the records at or below ``through``, ``chunk`` at a time, each its own short transaction, pausing at
    least ``pause_s`` (and as long as the chunk took) between them; returns how many."""
    deleted = 0
    while True:
        t0 = time.monotonic()
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("SELECT MIN(seq) FROM records") as cur:
                row = await cur.fetchone()
            lo = int(row[0]) if row is not None and row[0] is not None else None
            if lo is None or lo > through:
                await db.execute("COMMIT")
                return deleted
            hi = min(through, lo + chunk - 1)
            cur2 = await db.execute("DELETE FROM records WHERE seq <= ?", (hi,))
            deleted += cur2.rowcount
            await cur2.close()
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        if hi >= through:
            return deleted
        # Let the writer (and other processes) in: they poll for the lock while it is held.
        await asyncio.sleep(max(pause_s, time.monotonic() - t0))


async def forget_stale_writers(db: aiosqlite.Connection, now: int, bound: int) -> int:
    """Delete the batch markers unchanged for ``bound`` µs since a start first saw them; returns how many.

    See :meth:`proxy.audit.sqlite.SQLiteAuditLog._forget_stale_writers` for why this is safe.
    """
    forgotten = 0
    await db.execute("BEGIN IMMEDIATE")
    try:
        async with db.execute("SELECT key, value FROM meta WHERE key LIKE 'writer:%' OR key LIKE 'writer-seen:%'") as cur:
            rows = {str(k): str(v) for k, v in await cur.fetchall()}
        for key, value in rows.items():
            if not key.startswith("writer:"):
                if "writer:" + key[len("writer-seen:") :] not in rows:
                    await db.execute("DELETE FROM meta WHERE key = ?", (key,))
                continue
            seen_key = "writer-seen:" + key[len("writer:") :]
            seen_value, _, seen_at = rows.get(seen_key, "").partition(" ")
            if seen_value == value and seen_at.isdigit() and now - int(seen_at) >= bound:
                await db.execute("DELETE FROM meta WHERE key IN (?, ?)", (key, seen_key))
                forgotten += 1
            elif seen_value != value or not seen_at.isdigit():
                await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (seen_key, f"{value} {now}"))
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            await db.execute("ROLLBACK")
        raise
    return forgotten


def note_size(note: str) -> int:
    """The tree size (second line) of a checkpoint note; 0 when unreadable."""
    parts = note.split("\n", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def file_sizes(path: Path, origin: str) -> set[int]:
    """The sizes of this log's notes in a checkpoint file (blocking)."""
    if not path.exists():
        return set()
    sizes = set()
    for note in read_checkpoint_file(path).notes:
        if note.split("\n", 1)[0] == origin:
            sizes.add(note_size(note))
    return sizes
