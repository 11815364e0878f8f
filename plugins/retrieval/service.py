"""The retrieval service: store of record + lexical and vector engines.

Writes go to SQLite first (one transaction that also appends to the change
log), then the engines apply every change after their applied sequence and
commit; an ingest call returns only after that, so its result is visible to
the next search.  The same catch-up runs at start (crash repair), on a timer
(changes written by another process, e.g. ``warden ingest`` while Warden runs)
and after a rebuild.

Searches ask each engine for the best ``candidate_k`` chunks the reader may
read (ACL and tenant enforced inside the engine), fuse them by reciprocal
rank, and re-check every candidate against the store of record (it must still
exist in the reader's tenant and its current ACL must allow the reader) before
the context budget is applied.  Chunk ids embed the content hash of their
document, so an engine that lags behind a replacement can only name ids the
store no longer has: stale text is never served.

Only one process owns the engines of an ``index_dir`` (an exclusive file
lock); another process (the CLI next to a running server) writes the store of
record only and the owner applies the change within ``sync_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from plugins.retrieval.acl import Acl, IndexedChunk, Reader
from plugins.retrieval.chunking import approx_tokens, chunk_text, kind_for, parse_front_matter
from plugins.retrieval.config import RetrievalConfig
from plugins.retrieval.embed import Embedder, UpstreamEmbedder
from plugins.retrieval.fusion import rrf
from plugins.retrieval.inject import Hit, SearchResult, build_result
from plugins.retrieval.lexical import LexicalIndex
from plugins.retrieval.store import ChunkRow, DocKind, DocumentInput, DocumentRow, Store, UpsertResult, check_key, index_text
from plugins.retrieval.vector import VectorIndex
from proxy.errors import BadRequest, PayloadTooLarge, ServiceUnavailable

__all__ = ["DocumentInput", "IndexBusy", "RetrievalService", "UpsertResult", "build_service", "check_key", "index_text"]

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger("warden.retrieval")

class IndexBusy(ServiceUnavailable):
    """Another process owns the engines of this index directory."""


class RetrievalService:
    """Ingest, delete, search and maintain one retrieval index (see the module docstring)."""

    ENGINES = ("lexical", "vector")

    def __init__(self, cfg: RetrievalConfig, db_path: Path, index_dir: Path | None, embedder: Embedder | None) -> None:
        self.cfg = cfg
        self.store = Store(db_path)
        self.index_dir = index_dir
        self.embedder = embedder
        self.lexical: LexicalIndex | None = None
        self.vector: VectorIndex | None = None
        self.owner = False
        self.documents = 0
        self.chunks = 0
        self.tenant_documents: dict[str, int] = {}
        self.oldest_unapplied_at: float | None = None
        self._lock_fd: int | None = None
        self._write_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None
        self._warned_window = False
        self.last_sync_error: str | None = None

    # -- lifecycle -------------------------------------------------------

    async def start(self, *, own_engines: bool = True, background_sync: bool = False) -> None:
        """Open the store; when ``own_engines``, take the index lock, open the engines and catch up.

        Without the lock (another process owns the index) the service writes
        the store of record only; :attr:`owner` says which.
        """
        await self.store.open()
        await self._check_embedding_meta()
        if own_engines and self._acquire_lock():
            self.owner = True
            self.lexical = await asyncio.to_thread(LexicalIndex, self._path("lexical"))
            dim = self._dim()
            if dim:
                await self._open_vector(dim)
            await self._reembed_if_model_changed()
            async with self._write_lock:
                await self._sync_locked()
                await self._sanity_check_locked()
            await self.refresh_gauges()
            if background_sync:
                self._sync_task = asyncio.create_task(self._sync_loop(), name="retrieval-sync")

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self.lexical is not None:
            await asyncio.to_thread(self.lexical.close)
            self.lexical = None
        self.vector = None
        if self.embedder is not None:
            await self.embedder.close()
        await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

    def _path(self, name: str) -> Path | None:
        return None if self.index_dir is None else self.index_dir / name

    def _acquire_lock(self) -> bool:
        if self.index_dir is None:
            return True
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / ".owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _dim(self) -> int | None:
        if self.embedder is None:
            return None
        return self.embedder.dim or self.cfg.embedding_dim or None

    async def _open_vector(self, dim: int) -> None:
        self.vector = await asyncio.to_thread(VectorIndex, self._path("vector"), dim)

    async def _check_embedding_meta(self) -> None:
        if self.embedder is None:
            return
        model = await self.store.get_meta("embedding_model")
        stored_dim = await self.store.get_meta("embedding_dim")
        if model == self.embedder.model and stored_dim:
            dim = int(stored_dim)
            if self.cfg.embedding_dim and self.cfg.embedding_dim != dim:
                raise ServiceUnavailable(
                    f"the index holds {dim}-dimensional vectors of {model!r} but embedding_dim is {self.cfg.embedding_dim}",
                    rule="retrieval.embedding_dim",
                )
            self.embedder.dim = dim

    async def _reembed_if_model_changed(self) -> None:
        """A new embedding model re-embeds every chunk and rebuilds the vector engine: never a mixed index."""
        if self.embedder is None:
            return
        models = await self.store.embedding_models()
        stale = {m: n for m, n in models.items() if m != self.embedder.model}
        if not stale:
            return
        log.warning("retrieval: embedding model changed to %r; re-embedding %d documents", self.embedder.model, sum(stale.values()))
        async with self._write_lock:
            path = self._path("vector")
            self.vector = None
            if path is not None and path.exists():
                await asyncio.to_thread(shutil.rmtree, path)
            await self.store.set_applied("vector", 0)
            async for rows, _acls in self.store.iter_chunks(batch=self.cfg.embedding_batch * 4, with_vector=False):
                vectors = await self.embedder.embed([r.index_text for r in rows])
                await self.store.set_vectors([(r.chunk_id, vectors[i]) for i, r in enumerate(rows)], self.embedder.model, sorted({(r.tenant, r.doc_id) for r in rows}))
            await self.store.set_vectors([], self.embedder.model, [k for k in await self._all_doc_keys()])
            await self._record_dim()
            dim = self._dim()
            if dim:
                await self._open_vector(dim)
                await self._rebuild_engine_locked("vector")

    async def _all_doc_keys(self) -> list[tuple[str, str]]:
        async with self.store.read("SELECT tenant, doc_id FROM documents") as cur:
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def _record_dim(self) -> None:
        if self.embedder is not None and self.embedder.dim:
            await self.store.set_meta("embedding_model", self.embedder.model)
            await self.store.set_meta("embedding_dim", str(self.embedder.dim))

    # -- writes ----------------------------------------------------------

    async def upsert(self, doc: DocumentInput) -> UpsertResult:
        """Add or replace one document (idempotent by content hash); visible to search on return."""
        return (await self.upsert_many([doc]))[0]

    async def upsert_many(self, docs: list[DocumentInput]) -> list[UpsertResult]:
        """Add or replace documents in one store transaction and one engine commit.

        Unchanged content is skipped by hash; a changed ACL alone updates the
        engines' ACL without re-chunking or re-embedding.
        """
        for d in docs:
            check_key(d.tenant, d.doc_id)
            if len(d.text.encode("utf-8", "surrogatepass")) > self.cfg.max_document_bytes:
                raise PayloadTooLarge(f"document {d.doc_id!r} exceeds max_document_bytes ({self.cfg.max_document_bytes})", rule="retrieval.max_document_bytes")
        if len({(d.tenant, d.doc_id) for d in docs}) != len(docs):
            raise BadRequest("the same document appears twice in one batch", rule="retrieval.document")
        existing: dict[tuple[str, str], DocumentRow] = {}
        by_tenant: dict[str, list[str]] = {}
        for d in docs:
            by_tenant.setdefault(d.tenant, []).append(d.doc_id)
        for tenant, ids in by_tenant.items():
            for doc_id, row in (await self.store.get_documents(tenant, ids)).items():
                existing[(tenant, doc_id)] = row
        model = self.embedder.model if self.embedder is not None else None
        results: list[UpsertResult] = []
        full: list[tuple[DocumentInput, str]] = []
        meta: list[tuple[DocumentRow, bool]] = []
        for d in docs:
            h = self.content_hash(d)
            old = existing.get((d.tenant, d.doc_id))
            if old is not None and old.content_hash == h and old.embedding_model == model:
                acl_json = d.acl.to_json()
                acl_changed = old.acl != acl_json
                if acl_changed or (old.source, old.uri, old.updated_at, old.labels) != (d.source, d.uri, d.updated_at, d.labels):
                    row = DocumentRow(d.tenant, d.doc_id, h, acl_json, d.source, d.uri, d.title, d.updated_at, list(d.labels))
                    meta.append((row, acl_changed))
                    results.append(UpsertResult(d.tenant, d.doc_id, "acl_updated" if acl_changed else "metadata_updated", old.n_chunks))
                else:
                    results.append(UpsertResult(d.tenant, d.doc_id, "unchanged", old.n_chunks))
                continue
            full.append((d, h))
            results.append(UpsertResult(d.tenant, d.doc_id, "replaced" if old is not None else "added", 0))
        items = await asyncio.to_thread(self._prepare, full)
        if self.embedder is not None and items:
            texts = [c.index_text for _, chunks in items for c in chunks]
            vectors = await self.embedder.embed(texts) if texts else np.zeros((0, 0), dtype=np.float32)
            i = 0
            for _, chunks in items:
                for c in chunks:
                    c.vector = vectors[i]
                    i += 1
        n_chunks = {(doc.tenant, doc.doc_id): doc.n_chunks for doc, _ in items}
        for r in results:
            r.chunks = n_chunks.get((r.tenant, r.doc_id), r.chunks)
        if not items and not meta:
            return results
        async with self._write_lock:
            seq = 0
            if items:
                seq = await self.store.write_documents(items)
                await self._record_dim()
            if meta:
                seq = await self.store.update_documents_meta([m for m, _ in meta], [c for _, c in meta])
            await self._after_write_locked()
        for r in results:
            if r.status != "unchanged":
                r.seq = seq
        return results

    def content_hash(self, d: DocumentInput) -> str:
        """Hash of everything that determines the chunks (text, title, chunker and its budget)."""
        h = hashlib.sha256()
        for part in (d.title, self._kind(d), str(self.cfg.chunk_tokens), d.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()

    @staticmethod
    def _kind(d: DocumentInput) -> DocKind:
        return d.kind or (kind_for(d.uri) if d.uri else "text")

    def _prepare(self, full: list[tuple[DocumentInput, str]]) -> list[tuple[DocumentRow, list[ChunkRow]]]:
        items = []
        model = self.embedder.model if self.embedder is not None else None
        for d, h in full:
            kind = self._kind(d)
            body_start = parse_front_matter(d.text).body_start if kind == "markdown" else 0
            chunks = chunk_text(d.text, kind, self.cfg.chunk_tokens, body_start)
            rows = []
            for c in chunks:
                itext = index_text(d.title, c.heading_path, c.text)
                rows.append(ChunkRow(f"{d.tenant}/{d.doc_id}#{h[:16]}.{c.n}", d.tenant, d.doc_id, c.n, list(c.heading_path),
                                     c.start, c.end, c.kind, c.text, itext, c.tokens))
                if self.embedder is not None and not self._warned_window and approx_tokens(itext) > self.cfg.embedding_max_tokens:
                    self._warned_window = True
                    log.warning("retrieval: chunk %s has about %d tokens, over embedding_max_tokens=%d: the embedder will cut it "
                                "(tables and code blocks are kept whole; warned once)", rows[-1].chunk_id, approx_tokens(itext), self.cfg.embedding_max_tokens)
            doc = DocumentRow(d.tenant, d.doc_id, h, d.acl.to_json(), d.source, d.uri, d.title, d.updated_at, list(d.labels),
                              embedding_model=model, n_chunks=len(rows), tokens=sum(r.tokens for r in rows), size=len(d.text))
            items.append((doc, rows))
        return items

    async def delete(self, tenant: str, doc_id: str) -> bool:
        """Delete a document; it is never served again once this returns."""
        return (await self.delete_many([(tenant, doc_id)])) == 1

    async def delete_many(self, keys: list[tuple[str, str]]) -> int:
        for tenant, doc_id in keys:
            check_key(tenant, doc_id)
        if not keys:
            return 0
        async with self._write_lock:
            deleted, _ = await self.store.delete_documents(keys)
            await self._after_write_locked()
        return deleted

    async def _after_write_locked(self) -> None:
        if self.owner:
            await self._sync_locked()
            await self.refresh_gauges()

    # -- engine maintenance ---------------------------------------------

    def _engines(self) -> dict[str, LexicalIndex | VectorIndex]:
        out: dict[str, LexicalIndex | VectorIndex] = {}
        if self.lexical is not None:
            out["lexical"] = self.lexical
        if self.vector is not None:
            out["vector"] = self.vector
        return out

    async def sync(self) -> int:
        """Apply pending changes from the store of record to the engines; returns how many."""
        if not self.owner:
            return 0
        async with self._write_lock:
            return await self._sync_locked()

    async def _sync_locked(self) -> int:
        if self.vector is None and self.embedder is not None and self._dim():
            await self._open_vector(self._dim())  # type: ignore[arg-type]
        engines = self._engines()
        if not engines:
            return 0
        max_seq = await self.store.max_seq()
        applied = {name: await self.store.applied(name) for name in engines}
        lagging = {name: a for name, a in applied.items() if a < max_seq}
        if not lagging:
            return 0
        async with self.store.read("SELECT min(seq) FROM changes") as cur:
            row = await cur.fetchone()
        min_logged = row[0] if row and row[0] is not None else max_seq + 1
        applied_count = 0
        for name, a in lagging.items():
            if a + 1 < min_logged:
                log.warning("retrieval: %s engine is behind the pruned change log; rebuilding it from the store", name)
                await self._rebuild_engine_locked(name)
                continue
            changes = await self.store.changes_after(a)
            ops: dict[tuple[str, str], set[str]] = {}
            for ch in changes:
                ops.setdefault((ch.tenant, ch.doc_id), set()).add(ch.op)
            await self._apply(name, engines[name], ops)
            await self.store.set_applied(name, changes[-1].seq if changes else max_seq)
            applied_count = max(applied_count, len(changes))
        floor = min([await self.store.applied(n) for n in engines])
        if self.embedder is not None and self.vector is None:
            floor = 0
        if floor:
            await self.store.prune_changes(floor)
        return applied_count

    async def _apply(self, name: str, engine: LexicalIndex | VectorIndex, ops: dict[tuple[str, str], set[str]]) -> None:
        acl_only = [k for k, o in ops.items() if o == {"acl"}]
        full = [k for k, o in ops.items() if o != {"acl"}]
        docs: dict[tuple[str, str], DocumentRow] = {}
        for tenant in {t for t, _ in ops}:
            for doc_id, row in (await self.store.get_documents(tenant, [d for t, d in ops if t == tenant])).items():
                docs[(tenant, doc_id)] = row
        live_full = [k for k in full if k in docs]
        chunks = await self.store.chunks_of(live_full, with_vector=name == "vector")
        indexed: list[IndexedChunk] = []
        for key in live_full:
            acl = Acl.from_json(docs[key].acl)
            for c in chunks.get(key, []):
                if name == "vector" and c.vector is None:
                    continue
                indexed.append(IndexedChunk(c.chunk_id, c.tenant, c.doc_id, c.index_text, acl, c.vector))
        acl_updates = [(k, Acl.from_json(docs[k].acl)) for k in acl_only if k in docs]

        def work() -> None:
            if full:
                engine.delete_docs(full)
            for start in range(0, len(indexed), 1000):
                engine.upsert(indexed[start : start + 1000])
            for (tenant, doc_id), acl in acl_updates:
                engine.set_acl(tenant, doc_id, acl)
            engine.commit()

        await asyncio.to_thread(work)

    async def rebuild(self) -> dict[str, int]:
        """Clear both engines and re-add every chunk from the store of record."""
        if not self.owner:
            raise IndexBusy("the index is owned by another process (a running Warden); stop it or use its admin API", rule="retrieval.index_dir")
        async with self._write_lock:
            out = {}
            for name in self._engines():
                out[name] = await self._rebuild_engine_locked(name)
            return out

    async def _rebuild_engine_locked(self, name: str) -> int:
        engine = self._engines()[name]
        max_seq = await self.store.max_seq()
        await asyncio.to_thread(engine.clear)
        total = 0
        async for rows, acls in self.store.iter_chunks(with_vector=name == "vector"):
            batch = [
                IndexedChunk(r.chunk_id, r.tenant, r.doc_id, r.index_text, Acl.from_json(acls[(r.tenant, r.doc_id)]), r.vector)
                for r in rows
                if (r.tenant, r.doc_id) in acls and (name != "vector" or r.vector is not None)
            ]
            if batch:
                await asyncio.to_thread(engine.upsert, batch)
            total += len(batch)
        await asyncio.to_thread(engine.commit)
        await self.store.set_applied(name, max_seq)
        return total

    async def _sanity_check_locked(self) -> None:
        """After catch-up each engine must hold exactly the store's chunks; otherwise rebuild it."""
        counts = await self.store.counts()
        for name, engine in self._engines().items():
            expected = counts["vectors"] if name == "vector" else counts["chunks"]
            have = await asyncio.to_thread(engine.count)
            if have != expected:
                log.warning("retrieval: %s engine holds %d chunks, the store %d; rebuilding it", name, have, expected)
                await self._rebuild_engine_locked(name)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sync_interval_s)
            try:
                await self.sync()
                await self.refresh_gauges()
                self.last_sync_error = None
            except Exception as e:  # the loop must survive a bad moment (disk full...), and say so
                self.last_sync_error = f"{e.__class__.__name__}: {e}"
                log.exception("retrieval: background sync failed")

    async def refresh_gauges(self) -> None:
        """Cache what the metrics read at scrape time: the document count and the
        time of the oldest change the engines have not applied yet."""
        counts = await self.store.counts()
        self.documents = int(counts["documents"])
        self.chunks = int(counts["chunks"])
        async with self.store.read("SELECT tenant, count(*) FROM documents GROUP BY tenant") as cur:
            self.tenant_documents = {row[0]: int(row[1]) for row in await cur.fetchall()}
        engines = self._engines()
        floor = min([await self.store.applied(n) for n in engines]) if engines else 0
        async with self.store.read("SELECT min(at) FROM changes WHERE seq > ?", (floor,)) as cur:
            row = await cur.fetchone()
        self.oldest_unapplied_at = float(row[0]) if row and row[0] is not None else None

    def has_documents(self, tenant: str) -> bool:
        """Whether the tenant has any document (as of the last write or sync): a tenant without any skips the search."""
        return self.tenant_documents.get(tenant, 0) > 0

    def staleness_s(self) -> float:
        """Seconds the indexes lag the store of record (0 when every change is searchable)."""
        return 0.0 if self.oldest_unapplied_at is None else max(0.0, time.time() - self.oldest_unapplied_at)

    # -- reads -----------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Documents, chunks, embedding model, last ingest, oldest source update, per-engine counts and lag."""
        counts = await self.store.counts()
        max_seq = await self.store.max_seq()
        states = await self.store.engine_states()
        engines: dict[str, Any] = {}
        live = self._engines()
        for name in self.ENGINES:
            if name == "vector" and self.embedder is None:
                continue
            st = states.get(name)
            applied = int(st["applied_seq"]) if st is not None else 0
            entry: dict[str, Any] = {"applied_seq": applied, "lag": max_seq - applied, "updated_at": st["updated_at"] if st is not None else None}
            if name in live:
                entry["count"] = await asyncio.to_thread(live[name].count)
            engines[name] = entry
        return {
            **counts,
            "mode": self.cfg.mode,
            "embedding_model": self.embedder.model if self.embedder is not None else None,
            "embedding_dim": self.embedder.dim if self.embedder is not None else None,
            "last_seq": max_seq,
            "owner": self.owner,
            "engines": engines,
            "last_sync_error": self.last_sync_error,
        }

    async def list_documents(self, tenant: str, limit: int = 100, after: str = "") -> list[DocumentRow]:
        return await self.store.list_documents(tenant, limit, after)

    async def search(self, reader: Reader, query: str, *, top_k: int | None = None, max_tokens: int | None = None, debug: bool = False) -> SearchResult:
        """What would be injected for ``reader``: the best ``top_k`` readable chunks within the token budget.

        ``debug`` adds candidates below the cut (reason ``rank``) and
        higher-ranked chunks the reader may not read (reason ``acl``; id and
        rank only, never their text).
        """
        if not self.owner or self.lexical is None:
            raise IndexBusy(
                "the retrieval index is owned by another process (a running Warden); use its admin API (POST /admin/search)",
                rule="retrieval.index_dir",
            )
        t0 = time.perf_counter()
        top_k = top_k or self.cfg.top_k
        max_tokens = max_tokens or self.cfg.max_context_tokens
        timings: dict[str, float] = {}
        lists, names, qvec = await self._candidates(reader, query, self.cfg.candidate_k, timings)
        t = time.perf_counter()
        fused = rrf(lists, self.cfg.candidate_k, self.cfg.rrf_c) if len(lists) > 1 else [
            (cid, score, [rank]) for rank, (cid, score) in enumerate(lists[0] if lists else [], start=1)
        ]
        timings["fuse_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        rows = await self.store.fetch_chunks(reader.tenant, [cid for cid, _, _ in fused])
        timings["fetch_ms"] = (time.perf_counter() - t) * 1000
        scores = [dict(lst) for lst in lists]
        hits: list[Hit] = []
        for cid, fused_score, ranks in fused:
            per: dict[str, float] = {}
            per_rank: dict[str, int] = {}
            for i, name in enumerate(names):
                if ranks[i] is not None:
                    per[name] = scores[i][cid]
                    per_rank[name] = ranks[i]  # type: ignore[assignment]
            if len(names) > 1:
                per["rrf"] = fused_score
            hits.append(Hit.make(cid, rows.get(cid), fused_score, per, per_rank, reader))
        result = build_result(query, self.cfg.mode, hits, top_k, max_tokens, debug)
        if debug:
            t = time.perf_counter()
            result.excluded.extend(await self._acl_excluded(reader, query, qvec, names, result, top_k))
            timings["debug_acl_ms"] = (time.perf_counter() - t) * 1000
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        result.timings = timings
        return result

    async def _candidates(
        self, reader: Reader, query: str, k: int, timings: dict[str, float]
    ) -> tuple[list[list[tuple[str, float]]], list[str], np.ndarray | None]:
        """Each engine's ACL-filtered candidates.  The lexical search runs while
        the query is being embedded and the vector search runs: the step costs
        the slower of the two branches, not their sum."""
        mode = self.cfg.mode
        lexical, vector = self.lexical, self.vector

        async def lexical_branch() -> list[tuple[str, float]]:
            t = time.perf_counter()
            assert lexical is not None
            if self.chunks <= self.cfg.inline_search_max_chunks:
                out = lexical.search(reader, query, k)
            else:
                out = await asyncio.to_thread(lexical.search, reader, query, k)
            timings["bm25_ms"] = (time.perf_counter() - t) * 1000
            return out

        async def vector_branch() -> tuple[np.ndarray, list[tuple[str, float]] | None]:
            assert self.embedder is not None
            t = time.perf_counter()
            qv = (await self.embedder.embed([query]))[0]
            timings["embed_ms"] = (time.perf_counter() - t) * 1000
            if vector is None:
                return qv, None
            t = time.perf_counter()
            out = await asyncio.to_thread(vector.search, reader, qv, k)
            timings["vector_ms"] = (time.perf_counter() - t) * 1000
            return qv, out

        use_lexical = mode in ("hybrid", "bm25") and lexical is not None
        use_vector = mode in ("hybrid", "vector") and self.embedder is not None
        if use_lexical and use_vector:
            lex, (qvec, vec) = await asyncio.gather(lexical_branch(), vector_branch())
        else:
            lex = await lexical_branch() if use_lexical else None
            qvec, vec = await vector_branch() if use_vector else (None, None)
        lists: list[list[tuple[str, float]]] = []
        names: list[str] = []
        if lex is not None:
            lists.append(lex)
            names.append("bm25")
        if vec is not None:
            lists.append(vec)
            names.append("vector")
        return lists, names, qvec

    async def _acl_excluded(self, reader: Reader, query: str, qvec: np.ndarray | None, names: list[str], result: SearchResult, top_k: int) -> list[Hit]:
        """Debug only: readable-by-someone chunks that would rank above the cut but this reader may not read.

        The engines only search as some reader, so the tenant-wide ranking is
        assembled from one witness reader per distinct ACL of the tenant
        (at most 64): each witness may read every chunk of its ACL, and
        BM25 and inner-product scores do not depend on the reader, so merging
        their lists by score gives the unfiltered ranking.
        """
        async with self.store.read("SELECT DISTINCT acl FROM documents WHERE tenant = ? LIMIT 64", (reader.tenant,)) as cur:
            acl_rows = [r[0] for r in await cur.fetchall()]
        witnesses: set[Reader] = set()
        for raw in acl_rows:
            w = witness(reader.tenant, Acl.from_json(orjson.loads(raw)))
            if w is not None:
                witnesses.add(w)
        k = self.cfg.candidate_k
        merged: list[dict[str, float]] = [{} for _ in names]
        for w in witnesses:
            for i, name in enumerate(names):
                if name == "bm25" and self.lexical is not None:
                    res = await asyncio.to_thread(self.lexical.search, w, query, k)
                elif name == "vector" and self.vector is not None and qvec is not None:
                    res = await asyncio.to_thread(self.vector.search, w, qvec, k)
                else:
                    continue
                merged[i].update(res)
        lists = [sorted(m.items(), key=lambda kv: (-kv[1], kv[0]))[:k] for m in merged]
        fused: list[tuple[str, float, list[int | None]]] = (
            rrf(lists, k, self.cfg.rrf_c) if len(lists) > 1 else [(cid, s, [r]) for r, (cid, s) in enumerate(lists[0] if lists else [], 1)]
        )
        cut = max([top_k, *(h.rank for h in result.hits)])
        rows = await self.store.fetch_chunks(reader.tenant, [cid for cid, _, _ in fused])
        out = []
        for rank, (cid, score, ranks) in enumerate(fused, start=1):
            row = rows.get(cid)
            if rank > cut or row is None:
                continue
            if not Acl.from_json(row[1].acl).allows(reader.subject, reader.groups):
                per = {names[i]: (dict(lists[i])[cid]) for i in range(len(names)) if ranks[i] is not None}
                out.append(Hit(chunk_id=cid, doc_id=row[1].doc_id, score=score, scores=per, ranks={}, rank=rank, excluded_reason="acl"))
        return out


def witness(tenant: str, acl: Acl) -> Reader | None:
    """A reader that ``acl`` allows (None when it allows no one)."""
    probe = "\x00warden-debug"
    if acl.public and probe not in acl.deny_users:
        return Reader(tenant, probe, frozenset())
    for user in sorted(acl.allow_users - acl.deny_users):
        return Reader(tenant, user, frozenset())
    for group in sorted(acl.allow_groups - acl.deny_groups):
        return Reader(tenant, probe, frozenset({group}))
    return None


def build_service(cfg: RetrievalConfig, config: Config | None) -> RetrievalService:
    """A service for ``[retrieval]``: paths relative to the config file, embedder from the upstream settings by default."""

    def resolve(value: str) -> Path:
        return config.resolve_path(value) if config is not None else Path(value)

    embedder: Embedder | None = None
    if cfg.embedder == "upstream":
        base_url = cfg.embedding_base_url or (config.upstream.base_url if config is not None else "")
        env = cfg.embedding_api_key_env or (config.upstream.api_key_env if config is not None else "")
        key = os.environ.get(env) if env else None
        if env and key is None:
            log.warning("retrieval: the embeddings key variable %s is not set; calling %s without a key", env, base_url)
        embedder = UpstreamEmbedder(base_url, key, cfg.embedding_model, cfg.embedding_dim or None, cfg.embedding_batch, cfg.embedding_timeout_s)
    return RetrievalService(cfg, resolve(cfg.db), resolve(cfg.index_dir), embedder)
