"""The embedded store: counters kept by triggers (and filled once for a store made before them), the local state file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.applier import STATE_FILE
from llm_warden.plugins.retrieval.service import DocumentInput
from llm_warden.plugins.retrieval.store import Store
from tests.plugins.retrieval.conftest import ServiceFactory

PUBLIC = Acl(public=True)
TWO_CHUNKS = "# A\n\nalpha.\n\n# B\n\nbeta gamma."


def _recount(path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(path) as c:
        docs = c.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks, vectors = c.execute("SELECT count(*), count(vector) FROM chunks").fetchone()
    return int(docs), int(chunks), int(vectors)


async def test_counters_follow_every_write(service_factory: ServiceFactory, tmp_path: Path) -> None:
    svc = await service_factory("c")
    await svc.upsert_many([DocumentInput(t, f"d{i}", TWO_CHUNKS, PUBLIC, uri="x.md") for i, t in enumerate(["acme", "acme", "beta"])])
    await svc.upsert(DocumentInput("acme", "d0", "one chunk only", PUBLIC))
    await svc.upsert(DocumentInput("acme", "d1", TWO_CHUNKS, Acl(allow_users=frozenset({"u"})), uri="x.md"))
    await svc.delete("beta", "d2")
    counts = await svc.store.counts()
    assert (counts["documents"], counts["chunks"], counts["vectors"]) == _recount(tmp_path / "c.db") == (2, 3, 3)
    assert counts["tenants"] == 1 and await svc.store.tenant_counts() == {"acme": (2, 3), "beta": (0, 0)}
    await svc.sync()
    await svc.refresh_gauges()
    assert svc.has_documents("acme") and not svc.has_documents("beta") and svc.documents == 2


async def test_a_store_from_before_the_counters_gets_them_filled_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:
        # The schema of the previous release: no stats table, no store id, engine positions in the database.
        c.executescript("""
            CREATE TABLE documents (tenant TEXT NOT NULL, doc_id TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', uri TEXT NOT NULL DEFAULT '',
                title TEXT NOT NULL DEFAULT '', updated_at TEXT, content_hash TEXT NOT NULL, labels TEXT NOT NULL DEFAULT '[]', acl TEXT NOT NULL,
                indexed_at REAL NOT NULL, embedding_model TEXT, n_chunks INTEGER NOT NULL, tokens INTEGER NOT NULL, size INTEGER NOT NULL,
                PRIMARY KEY (tenant, doc_id)) WITHOUT ROWID;
            CREATE TABLE chunks (chunk_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, doc_id TEXT NOT NULL, n INTEGER NOT NULL, heading_path TEXT NOT NULL,
                start_offset INTEGER NOT NULL, end_offset INTEGER NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, index_text TEXT NOT NULL,
                tokens INTEGER NOT NULL, vector BLOB);
            CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, doc_id TEXT NOT NULL,
                op TEXT NOT NULL CHECK (op IN ('upsert', 'delete', 'acl')), at REAL NOT NULL);
            CREATE TABLE engines (name TEXT PRIMARY KEY, applied_seq INTEGER NOT NULL, updated_at REAL NOT NULL);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO documents VALUES ('acme', 'a', '', '', '', '2025-01-01', 'h1', '[]', '{"public": true}', 1.0, NULL, 2, 4, 10);
            INSERT INTO documents VALUES ('beta', 'b', '', '', '', '2024-06-01', 'h2', '[]', '{"public": true}', 2.0, NULL, 1, 2, 5);
            INSERT INTO chunks VALUES ('acme/a#h1.0', 'acme', 'a', 0, '[]', 0, 1, 'text', 'x', 'x', 1, x'0000803f');
            INSERT INTO chunks VALUES ('acme/a#h1.1', 'acme', 'a', 1, '[]', 1, 2, 'text', 'y', 'y', 1, NULL);
            INSERT INTO chunks VALUES ('beta/b#h2.0', 'beta', 'b', 0, '[]', 0, 1, 'text', 'z', 'z', 1, NULL);
            INSERT INTO changes (tenant, doc_id, op, at) VALUES ('acme', 'a', 'upsert', 1.0), ('beta', 'b', 'upsert', 2.0);
            DELETE FROM changes WHERE seq = 1;
        """)
    store = Store(path)
    await store.open()
    try:
        counts = await store.counts()
        assert (counts["documents"], counts["chunks"], counts["vectors"], counts["tenants"]) == (2, 3, 1, 2)
        assert counts["oldest_source_update"] == "2024-06-01" and counts["last_ingest"] == 2.0
        batch = await store.changes_after(0)
        assert batch.head == 2 and batch.pruned_upto == 2  # whatever was pruned before is below the head
        assert await store.identity()
    finally:
        await store.close()
    again = Store(path)
    await again.open()  # opening again neither refills nor doubles the counters
    try:
        assert (await again.counts())["chunks"] == 3
    finally:
        await again.close()


async def test_an_unreadable_state_file_is_survived(service_factory: ServiceFactory, tmp_path: Path) -> None:
    svc = await service_factory("s", mode="bm25", embedder=False)
    await svc.upsert(DocumentInput("acme", "a", "Notes about puffins.", PUBLIC))
    await svc.close()
    (tmp_path / "s-index" / STATE_FILE).write_bytes(b'{"store_id": "x", "applied": {"lexical": ')
    again = await service_factory("s", mode="bm25", embedder=False)
    assert [h.doc_id for h in (await again.search(Reader("acme", "x", frozenset()), "puffins")).hits] == ["a"]
    st = await again.status()
    assert st["engines"]["lexical"]["count"] == 1 and st["engines"]["lexical"]["lag"] == 0


async def test_pruning_the_log_while_writing(service_factory: ServiceFactory) -> None:
    import asyncio

    svc = await service_factory("p", mode="bm25", embedder=False)

    async def writes() -> None:
        for i in range(30):
            await svc.upsert(DocumentInput("acme", f"d{i}", f"Memo {i} about gannets.", PUBLIC), wait=i % 3 == 0)

    async def prunes() -> None:
        for _ in range(30):
            await svc._prune()
            await asyncio.sleep(0)

    await asyncio.gather(writes(), prunes())
    await svc.sync()
    await svc._prune()
    batch = await svc.store.changes_after(0)
    assert batch.changes == [] and batch.pruned_upto == batch.head == 30
    res = await svc.search(Reader("acme", "x", frozenset()), "gannets", top_k=30)
    assert len(res.hits) == 30
