"""The embedded store of record: SQLite (WAL), one process writing.

Documents, chunks (with their vectors), ACLs and a change log: every write
appends to ``changes`` (``seq`` AUTOINCREMENT: positions only grow) in the
same transaction.  There is one writer connection and every write is one
transaction, so positions commit in order.  Which position each engine has
applied is not stored here but next to the engines (see
:mod:`plugins.retrieval.applier`).

Counters (documents, chunks, vectors per tenant) are maintained by triggers
in ``stats``: a write costs O(1) beyond its own rows, and reading the counts
never scans the documents.

Two connections: one writer (all writes, each a single transaction) and one
reader, so searches read a committed snapshot and never a half-written
document.  Every query names the tenant: tenant isolation does not depend on
the caller passing the right chunk ids.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import numpy as np
import orjson

from llm_warden.plugins.retrieval.records import (
    Change,
    ChangeBatch,
    ChunkRow,
    DocKind,
    DocumentInput,
    DocumentRow,
    UpsertResult,
    blob_vector,
    check_key,
    index_text,
    vector_blob,
)

__all__ = ["DocKind", "DocumentInput", "DocumentRow", "ChunkRow", "Store", "UpsertResult", "check_key", "index_text"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    uri TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL DEFAULT '',
    updated_at TEXT,
    content_hash TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '[]',
    acl TEXT NOT NULL,
    indexed_at REAL NOT NULL,
    embedding_model TEXT,
    n_chunks INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (tenant, doc_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS documents_source ON documents (tenant, source);
CREATE INDEX IF NOT EXISTS documents_updated ON documents (updated_at);
CREATE INDEX IF NOT EXISTS documents_tenant_updated ON documents (tenant, updated_at);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    heading_path TEXT NOT NULL,
    start_offset INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    index_text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    vector BLOB
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (tenant, doc_id, n);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete', 'acl')),
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Counters kept by triggers: created, and filled from the tables once, when missing.
STATS = [
    """CREATE TABLE stats (
        tenant TEXT PRIMARY KEY,
        documents INTEGER NOT NULL DEFAULT 0,
        chunks INTEGER NOT NULL DEFAULT 0,
        vectors INTEGER NOT NULL DEFAULT 0,
        last_ingest REAL
    ) WITHOUT ROWID""",
    "INSERT INTO stats (tenant, documents, chunks, last_ingest) SELECT tenant, count(*), sum(n_chunks), max(indexed_at) FROM documents GROUP BY tenant",
    "UPDATE stats SET vectors = (SELECT count(*) FROM chunks c WHERE c.tenant = stats.tenant AND c.vector IS NOT NULL)",
    """CREATE TRIGGER stats_doc_insert AFTER INSERT ON documents BEGIN
        INSERT INTO stats (tenant, documents, chunks, last_ingest) VALUES (new.tenant, 1, new.n_chunks, new.indexed_at)
        ON CONFLICT (tenant) DO UPDATE SET documents = documents + 1, chunks = chunks + excluded.chunks,
            last_ingest = max(coalesce(last_ingest, excluded.last_ingest), excluded.last_ingest);
    END""",
    """CREATE TRIGGER stats_doc_delete AFTER DELETE ON documents BEGIN
        UPDATE stats SET documents = documents - 1, chunks = chunks - old.n_chunks WHERE tenant = old.tenant;
    END""",
    """CREATE TRIGGER stats_doc_update AFTER UPDATE OF n_chunks, indexed_at ON documents BEGIN
        UPDATE stats SET chunks = chunks - old.n_chunks + new.n_chunks,
            last_ingest = max(coalesce(last_ingest, new.indexed_at), new.indexed_at) WHERE tenant = new.tenant;
    END""",
    """CREATE TRIGGER stats_vec_insert AFTER INSERT ON chunks WHEN new.vector IS NOT NULL BEGIN
        INSERT INTO stats (tenant, vectors) VALUES (new.tenant, 1) ON CONFLICT (tenant) DO UPDATE SET vectors = vectors + 1;
    END""",
    """CREATE TRIGGER stats_vec_delete AFTER DELETE ON chunks WHEN old.vector IS NOT NULL BEGIN
        UPDATE stats SET vectors = vectors - 1 WHERE tenant = old.tenant;
    END""",
    """CREATE TRIGGER stats_vec_update AFTER UPDATE OF vector ON chunks BEGIN
        UPDATE stats SET vectors = vectors + (new.vector IS NOT NULL) - (old.vector IS NOT NULL) WHERE tenant = new.tenant;
    END""",
]

_DOC_COLS = "tenant, doc_id, source, uri, title, updated_at, content_hash, labels, acl, indexed_at, embedding_model, n_chunks, tokens, size"
_CHUNK_COLS = "chunk_id, tenant, doc_id, n, heading_path, start_offset, end_offset, kind, text, index_text, tokens"


def _doc(row: Any) -> DocumentRow:
    return DocumentRow(
        tenant=row[0], doc_id=row[1], source=row[2], uri=row[3], title=row[4], updated_at=row[5], content_hash=row[6],
        labels=orjson.loads(row[7]), acl=orjson.loads(row[8]), indexed_at=row[9], embedding_model=row[10],
        n_chunks=row[11], tokens=row[12], size=row[13],
    )


def _chunk(row: Any, with_vector: bool) -> ChunkRow:
    vec = blob_vector(row[11]) if with_vector else None
    return ChunkRow(row[0], row[1], row[2], row[3], orjson.loads(row[4]), row[5], row[6], row[7], row[8], row[9], row[10], vec)


def _counts(row: Any) -> dict[str, Any]:
    docs, chunks, vectors, last, tenants, oldest = row
    return {"documents": int(docs), "chunks": int(chunks), "vectors": int(vectors), "last_ingest": last,
            "oldest_source_update": oldest, "tenants": int(tenants)}


class _Rows:
    """Rows already fetched, with the cursor methods the readers use."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    async def fetchall(self) -> list[Any]:
        return self._rows

    async def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None


class Store:
    """Async access to the SQLite store of record (open with :meth:`open`)."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Open both connections, enable WAL, create the schema (and the counters, once)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._w = await aiosqlite.connect(self.path, isolation_level=None)
        await self._w.execute("PRAGMA journal_mode=WAL")
        await self._w.execute("PRAGMA synchronous=NORMAL")
        await self._w.execute("PRAGMA busy_timeout=5000")
        await self._w.executescript(SCHEMA)
        await self._w.execute("BEGIN IMMEDIATE")
        try:
            async with self._w.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stats'") as cur:
                missing = await cur.fetchone() is None
            if missing:
                for stmt in STATS:
                    await self._w.execute(stmt)
            async with self._w.execute("SELECT value FROM meta WHERE key = 'store_id'") as cur:
                if await cur.fetchone() is None:
                    await self._w.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            async with self._w.execute("SELECT value FROM meta WHERE key = 'pruned_upto'") as cur:
                if await cur.fetchone() is None:
                    # A store from before the bound was kept: whatever was pruned is at or below its head.
                    await self._w.execute(
                        "INSERT INTO meta (key, value) SELECT 'pruned_upto', CAST(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0) AS TEXT)"
                    )
            await self._w.execute("COMMIT")
        except BaseException:
            await self._w.execute("ROLLBACK")
            raise
        self._r = await aiosqlite.connect(self.path, isolation_level=None)
        await self._r.execute("PRAGMA busy_timeout=5000")
        await self._r.execute("PRAGMA query_only=1")

    async def close(self) -> None:
        for conn in (self._r, self._w):
            if conn is not None:
                await conn.close()
        self._r = self._w = None

    @property
    def w(self) -> aiosqlite.Connection:
        if self._w is None:
            raise RuntimeError("store is not open")
        return self._w

    @property
    def r(self) -> aiosqlite.Connection:
        if self._r is None:
            raise RuntimeError("store is not open")
        return self._r

    @contextlib.asynccontextmanager
    async def read(self, sql: str, params: Iterable[Any] = ()) -> AsyncIterator[_Rows]:
        """Run one query on the reader connection to completion, in one step.

        A cursor left open between ``execute`` and ``fetch`` keeps a read
        transaction (an old WAL snapshot) open on the shared reader connection,
        and every statement interleaved from another task would then miss what
        the writer committed meanwhile.  Fetching in the same thread call closes
        that window.
        """
        rows = await self.r.execute_fetchall(sql, tuple(params))
        yield _Rows(list(rows))

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """One process owns an embedded store's index (the index lock): nothing more to hold."""
        yield

    async def identity(self) -> str:
        return await self.get_meta("store_id") or ""

    # -- reads -----------------------------------------------------------

    async def get_document(self, tenant: str, doc_id: str) -> DocumentRow | None:
        async with self.read(f"SELECT {_DOC_COLS} FROM documents WHERE tenant = ? AND doc_id = ?", (tenant, doc_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else _doc(row)

    async def get_documents(self, tenant: str, doc_ids: Iterable[str]) -> dict[str, DocumentRow]:
        ids = list(doc_ids)
        out: dict[str, DocumentRow] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT {_DOC_COLS} FROM documents WHERE tenant = ? AND doc_id IN ({','.join('?' * len(part))})"
            async with self.read(q, (tenant, *part)) as cur:
                for row in await cur.fetchall():
                    out[row[1]] = _doc(row)
        return out

    async def list_documents(self, tenant: str, limit: int = 100, after: str = "", source_prefix: str | None = None) -> list[DocumentRow]:
        q = f"SELECT {_DOC_COLS} FROM documents WHERE tenant = ? AND doc_id > ?"
        params: list[Any] = [tenant, after]
        if source_prefix is not None:
            q += " AND substr(source, 1, ?) = ?"
            params += [len(source_prefix), source_prefix]
        q += " ORDER BY doc_id LIMIT ?"
        params.append(limit)
        async with self.read(q, params) as cur:
            return [_doc(row) for row in await cur.fetchall()]

    async def chunks_of(self, keys: Iterable[tuple[str, str]], with_vector: bool = True) -> dict[tuple[str, str], list[ChunkRow]]:
        out: dict[tuple[str, str], list[ChunkRow]] = {}
        vec = ", vector" if with_vector else ", NULL"
        for tenant, doc_id in keys:
            q = f"SELECT {_CHUNK_COLS}{vec} FROM chunks WHERE tenant = ? AND doc_id = ? ORDER BY n"
            async with self.read(q, (tenant, doc_id)) as cur:
                out[(tenant, doc_id)] = [_chunk(row, with_vector) for row in await cur.fetchall()]
        return out

    async def fetch_chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, tuple[ChunkRow, DocumentRow]]:
        out: dict[str, tuple[ChunkRow, DocumentRow]] = {}
        cols = ", ".join(f"c.{c}" for c in _CHUNK_COLS.split(", "))
        dcols = ", ".join(f"d.{c}" for c in _DOC_COLS.split(", "))
        for i in range(0, len(chunk_ids), 500):
            part = chunk_ids[i : i + 500]
            q = (
                f"SELECT {cols}, NULL, {dcols} FROM chunks c JOIN documents d ON d.tenant = c.tenant AND d.doc_id = c.doc_id "
                # "+c.tenant": keep the planner on the chunk_id primary key; with the
                # (tenant, doc_id) index it scanned every chunk of the tenant.
                f"WHERE +c.tenant = ? AND c.chunk_id IN ({','.join('?' * len(part))})"
            )
            async with self.read(q, (tenant, *part)) as cur:
                for row in await cur.fetchall():
                    out[row[0]] = (_chunk(row[:12], False), _doc(row[12:]))
        return out

    async def iter_chunks(self, batch: int = 2000, with_vector: bool = True) -> AsyncIterator[tuple[list[ChunkRow], dict[tuple[str, str], dict[str, Any]]]]:
        last = ""
        vec = ", c.vector" if with_vector else ", NULL"
        cols = ", ".join(f"c.{c}" for c in _CHUNK_COLS.split(", "))
        while True:
            q = (f"SELECT {cols}{vec}, d.acl FROM chunks c JOIN documents d ON d.tenant = c.tenant AND d.doc_id = c.doc_id "
                 "WHERE c.chunk_id > ? ORDER BY c.chunk_id LIMIT ?")
            async with self.read(q, (last, batch)) as cur:
                raw = await cur.fetchall()
            if not raw:
                return
            last = raw[-1][0]
            rows = [_chunk(r, with_vector) for r in raw]
            acls = {(r[1], r[2]): orjson.loads(r[12]) for r in raw}
            yield rows, acls

    async def changes_after(self, seq: int, limit: int = 10_000) -> ChangeBatch:
        # One statement: the changes and the log's bounds come from one snapshot.
        q = (
            "SELECT seq, tenant, doc_id, op, NULL FROM (SELECT * FROM changes WHERE seq > ? ORDER BY seq LIMIT ?) "
            "UNION ALL SELECT -1, key, value, NULL, NULL FROM meta WHERE key IN ('pruned_upto', 'vectors_generation', 'embedding_model', 'embedding_dim') "
            "UNION ALL SELECT -2, 'head', CAST(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0) AS TEXT), NULL, NULL"
        )
        async with self.read(q, (seq, limit)) as cur:
            rows = await cur.fetchall()
        changes = sorted((Change(r[0], r[1], r[2], r[3]) for r in rows if r[0] >= 0), key=lambda c: c.seq)
        meta = {r[1]: r[2] for r in rows if r[0] < 0}
        return _batch(changes, meta)

    async def head(self) -> int:
        async with self.read("SELECT seq FROM sqlite_sequence WHERE name = 'changes'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def oldest_change_after(self, seq: int) -> float | None:
        async with self.read("SELECT at FROM changes WHERE seq > ? ORDER BY seq LIMIT 1", (seq,)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    async def get_meta(self, key: str) -> str | None:
        async with self.read("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    def _counts_sql(self, tenant: str | None) -> tuple[str, tuple[Any, ...]]:
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        return (
            "SELECT coalesce(sum(documents), 0), coalesce(sum(chunks), 0), coalesce(sum(vectors), 0), max(last_ingest), "
            f"count(*) FILTER (WHERE documents > 0), (SELECT min(updated_at) FROM documents {where}) FROM stats {where}",
            params * 2,
        )

    async def counts(self, tenant: str | None = None) -> dict[str, Any]:
        sql, params = self._counts_sql(tenant)
        async with self.read(sql, params) as cur:
            return _counts(await cur.fetchone())

    async def counts_at_head(self) -> tuple[int, dict[str, Any]]:
        sql, params = self._counts_sql(None)
        async with self.read(f"SELECT *, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0) FROM ({sql})", params) as cur:
            row = await cur.fetchone()
        return int(row[6]), _counts(row[:6])

    async def tenant_counts(self) -> dict[str, tuple[int, int]]:
        async with self.read("SELECT tenant, documents, chunks FROM stats") as cur:
            return {row[0]: (int(row[1]), int(row[2])) for row in await cur.fetchall()}

    async def distinct_acls(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        async with self.read("SELECT DISTINCT acl FROM documents WHERE tenant = ? LIMIT ?", (tenant, limit)) as cur:
            return [orjson.loads(r[0]) for r in await cur.fetchall()]

    async def all_doc_keys(self) -> list[tuple[str, str]]:
        async with self.read("SELECT tenant, doc_id FROM documents") as cur:
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def embedding_models(self) -> dict[str | None, int]:
        async with self.read("SELECT embedding_model, count(*) FROM documents GROUP BY embedding_model") as cur:
            return {row[0]: row[1] for row in await cur.fetchall()}

    # -- writes (each one transaction on the writer connection) ---------

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        await self.w.execute("BEGIN IMMEDIATE")
        try:
            yield self.w
            await self.w.execute("COMMIT")
        except BaseException:
            await self.w.execute("ROLLBACK")
            raise

    async def write_documents(self, items: list[tuple[DocumentRow, list[ChunkRow]]]) -> int:
        now = time.time()
        async with self._tx() as w:
            keys = [(d.tenant, d.doc_id) for d, _ in items]
            # Delete, then insert: the counter triggers see the old row leave and the new one come.
            await w.executemany("DELETE FROM chunks WHERE tenant = ? AND doc_id = ?", keys)
            await w.executemany("DELETE FROM documents WHERE tenant = ? AND doc_id = ?", keys)
            await w.executemany(
                f"INSERT INTO documents ({_DOC_COLS}) VALUES ({','.join('?' * 14)})",
                [
                    (d.tenant, d.doc_id, d.source, d.uri, d.title, d.updated_at, d.content_hash, orjson.dumps(d.labels).decode(),
                     orjson.dumps(d.acl).decode(), d.indexed_at or now, d.embedding_model, d.n_chunks, d.tokens, d.size)
                    for d, _ in items
                ],
            )
            await w.executemany(
                f"INSERT INTO chunks ({_CHUNK_COLS}, vector) VALUES ({','.join('?' * 12)})",
                [
                    (c.chunk_id, c.tenant, c.doc_id, c.n, orjson.dumps(c.heading_path).decode(), c.start, c.end, c.kind, c.text,
                     c.index_text, c.tokens, vector_blob(c.vector))
                    for _, chunks in items for c in chunks
                ],
            )
            return await self._log([(d.tenant, d.doc_id, "upsert") for d, _ in items], now)

    async def update_documents_meta(self, docs: list[DocumentRow], acl_changed: list[bool]) -> int:
        now = time.time()
        async with self._tx() as w:
            await w.executemany(
                "UPDATE documents SET source = ?, uri = ?, updated_at = ?, labels = ?, acl = ?, indexed_at = ? WHERE tenant = ? AND doc_id = ?",
                [(d.source, d.uri, d.updated_at, orjson.dumps(d.labels).decode(), orjson.dumps(d.acl).decode(), now, d.tenant, d.doc_id) for d in docs],
            )
            return await self._log([(d.tenant, d.doc_id, "acl") for d, changed in zip(docs, acl_changed, strict=True) if changed], now)

    async def delete_documents(self, keys: list[tuple[str, str]]) -> tuple[int, int]:
        now = time.time()
        async with self._tx() as w:
            deleted = 0
            for tenant, doc_id in keys:
                cur = await w.execute("DELETE FROM documents WHERE tenant = ? AND doc_id = ?", (tenant, doc_id))
                deleted += cur.rowcount
                await w.execute("DELETE FROM chunks WHERE tenant = ? AND doc_id = ?", (tenant, doc_id))
            seq = await self._log([(t, d, "delete") for t, d in keys], now)
        return deleted, seq

    async def set_vectors(self, rows: list[tuple[str, np.ndarray]], model: str, docs: list[tuple[str, str]]) -> None:
        async with self._tx() as w:
            await w.executemany("UPDATE chunks SET vector = ? WHERE chunk_id = ?", [(vector_blob(v), cid) for cid, v in rows])
            await w.executemany("UPDATE documents SET embedding_model = ? WHERE tenant = ? AND doc_id = ?", [(model, t, d) for t, d in docs])

    async def new_vectors_generation(self) -> str:
        gen = uuid.uuid4().hex
        await self.set_meta("vectors_generation", gen)
        return gen

    async def _log(self, entries: list[tuple[str, str, str]], now: float) -> int:
        if not entries:
            return 0
        await self.w.executemany("INSERT INTO changes (tenant, doc_id, op, at) VALUES (?, ?, ?, ?)", [(t, d, op, now) for t, d, op in entries])
        async with self.w.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def set_meta(self, key: str, value: str) -> None:
        await self.w.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def prune(self, applied: int, retention_s: float) -> int:
        """Drop entries at or below ``applied``: the one process owning the engines has applied them (the documents stay the truth)."""
        async with self._tx() as w:
            await w.execute("DELETE FROM changes WHERE seq <= ?", (applied,))
            await w.execute("UPDATE meta SET value = CAST(max(CAST(value AS INTEGER), ?) AS TEXT) WHERE key = 'pruned_upto'", (applied,))
            async with w.execute("SELECT value FROM meta WHERE key = 'pruned_upto'") as cur:
                row = await cur.fetchone()
        return int(row[0]) if row else applied


def _batch(changes: list[Change], meta: dict[str, Any]) -> ChangeBatch:
    dim = meta.get("embedding_dim")
    return ChangeBatch(
        changes, int(meta.get("head") or 0), int(meta.get("pruned_upto") or 0), str(meta.get("vectors_generation") or ""),
        meta.get("embedding_model"), int(dim) if dim else None,
    )
