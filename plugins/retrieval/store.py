"""The store of record: documents, chunks, vectors, ACLs and a change log (SQLite, WAL).

The lexical and vector indexes are derived from this database.  Every write
appends to ``changes`` (a monotonically increasing ``seq``) in the same
transaction, and each engine's applied sequence lives in ``engines``; so after
a crash between a commit here and an engine commit, the engines catch up from
the log (see :class:`~plugins.retrieval.service.RetrievalService`).

Two connections: one writer (all writes, each a single transaction) and one
reader, so searches read a committed snapshot and never a half-written
document.  Every query names the tenant: tenant isolation does not depend on
the caller passing the right chunk ids.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import numpy as np
import orjson

from plugins.retrieval.acl import Acl
from proxy.errors import BadRequest

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
CREATE TABLE IF NOT EXISTS engines (
    name TEXT PRIMARY KEY,
    applied_seq INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(slots=True)
class DocumentRow:
    """A document as stored (``acl`` is the :meth:`Acl.to_json` dict)."""

    tenant: str
    doc_id: str
    content_hash: str
    acl: dict[str, Any]
    source: str = ""
    uri: str = ""
    title: str = ""
    updated_at: str | None = None
    labels: list[str] = field(default_factory=list)
    indexed_at: float = 0.0
    embedding_model: str | None = None
    n_chunks: int = 0
    tokens: int = 0
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "id": self.doc_id, "source": self.source, "uri": self.uri, "title": self.title,
            "updated_at": self.updated_at, "content_hash": self.content_hash, "labels": self.labels, "acl": self.acl,
            "indexed_at": self.indexed_at, "embedding_model": self.embedding_model, "chunks": self.n_chunks,
            "tokens": self.tokens, "size": self.size,
        }


@dataclass(slots=True)
class ChunkRow:
    """A chunk as stored.  ``index_text`` (title and heading path + text) is what the engines index."""

    chunk_id: str
    tenant: str
    doc_id: str
    n: int
    heading_path: list[str]
    start: int
    end: int
    kind: str
    text: str
    index_text: str
    tokens: int
    vector: np.ndarray | None = None


@dataclass(slots=True)
class Change:
    seq: int
    tenant: str
    doc_id: str
    op: str


DocKind = Literal["markdown", "python", "source", "text"]
MAX_ID_CHARS = 512


@dataclass
class DocumentInput:
    """A document to ingest.  ``kind`` picks the chunker (default: from ``uri``'s extension, else text)."""

    tenant: str
    doc_id: str
    text: str
    acl: Acl
    title: str = ""
    uri: str = ""
    source: str = ""
    updated_at: str | None = None
    labels: list[str] = field(default_factory=list)
    kind: DocKind | None = None


@dataclass
class UpsertResult:
    tenant: str
    doc_id: str
    status: Literal["added", "replaced", "unchanged", "acl_updated", "metadata_updated"]
    chunks: int
    seq: int = 0


def check_key(tenant: str, doc_id: str) -> None:
    """Validate a (tenant, document id) pair; hostile ids are refused, never stored."""
    for name, value in (("tenant", tenant), ("id", doc_id)):
        if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
            raise BadRequest(f"document {name} must be a non-empty string of at most {MAX_ID_CHARS} characters", rule="retrieval.document", param=name)
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise BadRequest(f"document {name} must not contain control characters", rule="retrieval.document", param=name)


def index_text(title: str, heading_path: list[str] | tuple[str, ...], text: str) -> str:
    """What the engines index and embed for a chunk: title and heading path give the chunk its context."""
    head = " > ".join([p for p in (title, *heading_path) if p])
    return f"{head}\n{text}" if head else text


_DOC_COLS = "tenant, doc_id, source, uri, title, updated_at, content_hash, labels, acl, indexed_at, embedding_model, n_chunks, tokens, size"
_CHUNK_COLS = "chunk_id, tenant, doc_id, n, heading_path, start_offset, end_offset, kind, text, index_text, tokens"


def _doc(row: Any) -> DocumentRow:
    return DocumentRow(
        tenant=row[0], doc_id=row[1], source=row[2], uri=row[3], title=row[4], updated_at=row[5], content_hash=row[6],
        labels=orjson.loads(row[7]), acl=orjson.loads(row[8]), indexed_at=row[9], embedding_model=row[10],
        n_chunks=row[11], tokens=row[12], size=row[13],
    )


def _chunk(row: Any, with_vector: bool) -> ChunkRow:
    vec = None
    if with_vector and row[11] is not None:
        vec = np.frombuffer(row[11], dtype=np.float32)
    return ChunkRow(row[0], row[1], row[2], row[3], orjson.loads(row[4]), row[5], row[6], row[7], row[8], row[9], row[10], vec)


def vector_blob(v: np.ndarray | None) -> bytes | None:
    return None if v is None else np.ascontiguousarray(v, dtype=np.float32).tobytes()


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
    """Async access to the retrieval database (open with :meth:`open`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Open both connections, enable WAL and create the schema."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._w = await aiosqlite.connect(self.path, isolation_level=None)
        await self._w.execute("PRAGMA journal_mode=WAL")
        await self._w.execute("PRAGMA synchronous=NORMAL")
        await self._w.execute("PRAGMA busy_timeout=5000")
        await self._w.executescript(SCHEMA)
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
        """Documents of a tenant ordered by id, ``limit`` after the id ``after`` (keyset paging)."""
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
        """Every chunk of the given documents, ordered by ``n``."""
        out: dict[tuple[str, str], list[ChunkRow]] = {}
        vec = ", vector" if with_vector else ", NULL"
        for tenant, doc_id in keys:
            q = f"SELECT {_CHUNK_COLS}{vec} FROM chunks WHERE tenant = ? AND doc_id = ? ORDER BY n"
            async with self.read(q, (tenant, doc_id)) as cur:
                out[(tenant, doc_id)] = [_chunk(row, with_vector) for row in await cur.fetchall()]
        return out

    async def fetch_chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, tuple[ChunkRow, DocumentRow]]:
        """The chunks with these ids *in this tenant*, each with its document (current ACL)."""
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
        """Every chunk in the store in batches, each with the ACLs of its documents."""
        last = ""
        vec = ", vector" if with_vector else ", NULL"
        while True:
            async with self.read(f"SELECT {_CHUNK_COLS}{vec} FROM chunks WHERE chunk_id > ? ORDER BY chunk_id LIMIT ?", (last, batch)) as cur:
                rows = [_chunk(row, with_vector) for row in await cur.fetchall()]
            if not rows:
                return
            last = rows[-1].chunk_id
            acls: dict[tuple[str, str], dict[str, Any]] = {}
            by_tenant: dict[str, set[str]] = {}
            for c in rows:
                by_tenant.setdefault(c.tenant, set()).add(c.doc_id)
            for tenant, ids in by_tenant.items():
                for doc_id, doc in (await self.get_documents(tenant, ids)).items():
                    acls[(tenant, doc_id)] = doc.acl
            yield rows, acls

    async def changes_after(self, seq: int) -> list[Change]:
        async with self.read("SELECT seq, tenant, doc_id, op FROM changes WHERE seq > ? ORDER BY seq", (seq,)) as cur:
            return [Change(*row) for row in await cur.fetchall()]

    async def max_seq(self) -> int:
        async with self.read("SELECT seq FROM sqlite_sequence WHERE name = 'changes'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def applied(self, engine: str) -> int:
        async with self.read("SELECT applied_seq FROM engines WHERE name = ?", (engine,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def engine_states(self) -> dict[str, dict[str, float]]:
        async with self.read("SELECT name, applied_seq, updated_at FROM engines") as cur:
            return {row[0]: {"applied_seq": row[1], "updated_at": row[2]} for row in await cur.fetchall()}

    async def get_meta(self, key: str) -> str | None:
        async with self.read("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def counts(self, tenant: str | None = None) -> dict[str, Any]:
        """Documents, chunks, vectors, last ingest and oldest source update (one tenant or all)."""
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        async with self.read(
            f"SELECT count(*), coalesce(sum(n_chunks), 0), max(indexed_at), min(updated_at), count(DISTINCT tenant) FROM documents {where}", params
        ) as cur:
            docs, chunks, last, oldest, tenants = await cur.fetchone()
        async with self.read(f"SELECT count(*) FROM chunks {where} {'AND' if where else 'WHERE'} vector IS NOT NULL", params) as cur:
            (vectors,) = await cur.fetchone()
        return {"documents": docs, "chunks": chunks, "vectors": vectors, "last_ingest": last, "oldest_source_update": oldest, "tenants": tenants}

    async def embedding_models(self) -> dict[str | None, int]:
        async with self.read("SELECT embedding_model, count(*) FROM documents GROUP BY embedding_model") as cur:
            return {row[0]: row[1] for row in await cur.fetchall()}

    # -- writes (each one transaction on the writer connection) ---------

    async def _begin(self) -> None:
        await self.w.execute("BEGIN IMMEDIATE")

    async def write_documents(self, items: list[tuple[DocumentRow, list[ChunkRow]]]) -> int:
        """Insert or replace documents and all their chunks; returns the last change seq."""
        now = time.time()
        await self._begin()
        try:
            for doc, _ in items:
                await self.w.execute("DELETE FROM chunks WHERE tenant = ? AND doc_id = ?", (doc.tenant, doc.doc_id))
            await self.w.executemany(
                f"INSERT OR REPLACE INTO documents ({_DOC_COLS}) VALUES ({','.join('?' * 14)})",
                [
                    (d.tenant, d.doc_id, d.source, d.uri, d.title, d.updated_at, d.content_hash, orjson.dumps(d.labels).decode(),
                     orjson.dumps(d.acl).decode(), d.indexed_at or now, d.embedding_model, d.n_chunks, d.tokens, d.size)
                    for d, _ in items
                ],
            )
            await self.w.executemany(
                f"INSERT INTO chunks ({_CHUNK_COLS}, vector) VALUES ({','.join('?' * 12)})",
                [
                    (c.chunk_id, c.tenant, c.doc_id, c.n, orjson.dumps(c.heading_path).decode(), c.start, c.end, c.kind, c.text,
                     c.index_text, c.tokens, vector_blob(c.vector))
                    for _, chunks in items for c in chunks
                ],
            )
            seq = await self._log([(d.tenant, d.doc_id, "upsert") for d, _ in items], now)
            await self.w.execute("COMMIT")
        except BaseException:
            await self.w.execute("ROLLBACK")
            raise
        return seq

    async def update_documents_meta(self, docs: list[DocumentRow], acl_changed: list[bool]) -> int:
        """Update metadata (title excluded: it is part of the content hash) and ACLs without touching chunks."""
        now = time.time()
        await self._begin()
        try:
            await self.w.executemany(
                "UPDATE documents SET source = ?, uri = ?, updated_at = ?, labels = ?, acl = ?, indexed_at = ? WHERE tenant = ? AND doc_id = ?",
                [(d.source, d.uri, d.updated_at, orjson.dumps(d.labels).decode(), orjson.dumps(d.acl).decode(), now, d.tenant, d.doc_id) for d in docs],
            )
            seq = await self._log([(d.tenant, d.doc_id, "acl") for d, changed in zip(docs, acl_changed, strict=True) if changed], now)
            await self.w.execute("COMMIT")
        except BaseException:
            await self.w.execute("ROLLBACK")
            raise
        return seq

    async def delete_documents(self, keys: list[tuple[str, str]]) -> tuple[int, int]:
        """Delete documents and their chunks; returns (documents deleted, last seq)."""
        now = time.time()
        await self._begin()
        try:
            deleted = 0
            for tenant, doc_id in keys:
                cur = await self.w.execute("DELETE FROM documents WHERE tenant = ? AND doc_id = ?", (tenant, doc_id))
                deleted += cur.rowcount
                await self.w.execute("DELETE FROM chunks WHERE tenant = ? AND doc_id = ?", (tenant, doc_id))
            seq = await self._log([(t, d, "delete") for t, d in keys], now)
            await self.w.execute("COMMIT")
        except BaseException:
            await self.w.execute("ROLLBACK")
            raise
        return deleted, seq

    async def set_vectors(self, rows: list[tuple[str, np.ndarray]], model: str, docs: list[tuple[str, str]]) -> None:
        """Store re-embedded vectors (no change-log entry: the vector engine is rebuilt after a re-embed)."""
        await self._begin()
        try:
            await self.w.executemany("UPDATE chunks SET vector = ? WHERE chunk_id = ?", [(vector_blob(v), cid) for cid, v in rows])
            await self.w.executemany("UPDATE documents SET embedding_model = ? WHERE tenant = ? AND doc_id = ?", [(model, t, d) for t, d in docs])
            await self.w.execute("COMMIT")
        except BaseException:
            await self.w.execute("ROLLBACK")
            raise

    async def _log(self, entries: list[tuple[str, str, str]], now: float) -> int:
        if entries:
            await self.w.executemany("INSERT INTO changes (tenant, doc_id, op, at) VALUES (?, ?, ?, ?)", [(t, d, op, now) for t, d, op in entries])
        async with self.w.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def set_applied(self, engine: str, seq: int) -> None:
        await self.w.execute(
            "INSERT INTO engines (name, applied_seq, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET applied_seq = excluded.applied_seq, updated_at = excluded.updated_at",
            (engine, seq, time.time()),
        )

    async def set_meta(self, key: str, value: str) -> None:
        await self.w.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def prune_changes(self, upto: int) -> None:
        """Drop change-log entries every engine has applied (the documents table stays the truth)."""
        await self.w.execute("DELETE FROM changes WHERE seq <= ?", (upto,))
