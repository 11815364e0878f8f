"""The retrieval service of one replica: a store of record + local indexes that follow it.

- **Store of record** (:mod:`~plugins.retrieval.store` SQLite, embedded; or
  :mod:`~plugins.retrieval.pgstore` PostgreSQL, shared by every replica):
  documents, chunks with their vectors (embedded once, by the replica that
  ingests), ACLs, counters and a change log with growing positions.
- **Local indexes** (:mod:`~plugins.retrieval.applier`): this replica's
  lexical and vector engines and the position they have applied
  (``index_dir/state.json``, never in the shared store).  Built from the
  store at start, then kept up to date by the :mod:`follower
  <plugins.retrieval.follower>` (notifications plus catch-up by position).

A write commits to the store of record (one transaction with its change-log
entries) and is then *acknowledged*: it is durable, and every replica serves
it once it has caught up (see ``docs/retrieval.md`` for the measured bound).
``wait=True`` (the default of :meth:`upsert_many` and :meth:`delete_many`)
also waits until this replica's indexes have applied it.  Deletions and
ACL changes are enforced at once on every replica: each search re-checks
its candidates against the store of record (:mod:`~plugins.retrieval.search`).

Only one process owns the engines of an ``index_dir`` (an exclusive file
lock); another process (the CLI next to a running server) writes the store
of record only.  A replica that has not caught up for ``max_lag_s`` is not
ready and refuses to search (rule ``retrieval.stale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_warden.plugins.retrieval.acl import Reader
from llm_warden.plugins.retrieval.applier import STATE_FILE, Indexes, LocalState
from llm_warden.plugins.retrieval.chunking import approx_tokens, chunk_text, kind_for, parse_front_matter
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.embed import Embedder, TokenCounting, UpstreamEmbedder
from llm_warden.plugins.retrieval.follower import Follower
from llm_warden.plugins.retrieval.inject import SearchResult
from llm_warden.plugins.retrieval.lexical import LexicalIndex
from llm_warden.plugins.retrieval.records import (
    ChangeBatch,
    ChunkRow,
    DocKind,
    DocumentInput,
    DocumentRow,
    RecordStore,
    UpsertResult,
    check_key,
    index_head,
    index_text,
)
from llm_warden.plugins.retrieval.search import search as run_search
from llm_warden.plugins.retrieval.store import Store
from llm_warden.plugins.retrieval.vector import VectorIndex
from llm_warden.proxy.errors import BadRequest, ConfigError, PayloadTooLarge, ServiceUnavailable

__all__ = ["DocumentInput", "IndexBusy", "RetrievalService", "UpsertResult", "build_service", "check_key", "index_text"]

if TYPE_CHECKING:
    from llm_warden.proxy.config import Config

log = logging.getLogger("warden.retrieval")


class IndexBusy(ServiceUnavailable):
    """Another process owns the engines of this index directory."""


class RetrievalService:
    """Ingest, delete, search and maintain one replica's retrieval (see the module docstring)."""

    ENGINES = ("lexical", "vector")

    def __init__(self, cfg: RetrievalConfig, db_path: Path | None, index_dir: Path | None, embedder: Embedder | None,
                 *, store: RecordStore | None = None) -> None:
        self.cfg = cfg
        if store is None:
            if db_path is None:
                raise ValueError("a RetrievalService needs a store or a SQLite path")
            store = Store(db_path)
        self.store: RecordStore = store
        self.index_dir = index_dir
        self.embedder = embedder
        self.indexes: Indexes | None = None
        self.follower: Follower | None = None
        self.owner = False
        self.documents = 0
        self.chunks = 0
        self.tenant_documents: dict[str, int] = {}
        self.oldest_unapplied_at: float | None = None
        self.model_mismatch: str | None = None
        self._recorded: tuple[str, int] | None = None
        self._lock_fd: int | None = None
        # One SQLite writer connection: this process's writes take turns.  PostgreSQL orders commits itself.
        self._write_lock: AbstractAsyncContextManager[Any] = asyncio.Lock() if self.store.kind == "sqlite" else contextlib.nullcontext()
        self._warned_window = False
        self._count, self._specials, self._window, self._tokenizer = approx_tokens, 0, cfg.embedding_max_tokens, ""
        if isinstance(embedder, TokenCounting):
            self._count, self._specials = embedder.count_tokens, embedder.special_tokens
            self._window = min(cfg.embedding_max_tokens, embedder.max_tokens)
            self._tokenizer = f"tokens:{embedder.model}"

    @property
    def lexical(self) -> LexicalIndex | None:
        return self.indexes.lexical if self.indexes is not None else None

    @property
    def vector(self) -> VectorIndex | None:
        return self.indexes.vector if self.indexes is not None else None

    @property
    def last_sync_error(self) -> str | None:
        return self.follower.last_error if self.follower is not None else None

    # -- lifecycle -------------------------------------------------------

    async def start(self, *, own_engines: bool = True, background_sync: bool = False) -> None:
        """Open the store; when ``own_engines``, take the index lock, build or catch up the local indexes.

        Without the lock (another process owns the index) the service writes
        the store of record only; :attr:`owner` says which.  ``background_sync``
        starts the follower (a server replica); without it, :meth:`sync` and
        writes with ``wait`` catch up.
        """
        await self.store.open()
        await self._check_embedding_meta()
        if own_engines and self._acquire_lock():
            self.owner = True
            idx = self.indexes = Indexes(self.store, self.index_dir)
            await idx.adopt_store()
            await idx.open_lexical()
            dim = self._dim()
            if dim:
                await idx.open_vector(dim)
            await self._reembed_if_model_changed()
            async with idx.lock:
                await idx.catch_up(self._on_batch)
                await idx.sanity_check()
            await self.refresh_gauges()
            if background_sync:
                connect, channel = None, ""
                if self.store.kind == "postgres":
                    from llm_warden.plugins.retrieval.pgstore import PostgresStore

                    assert isinstance(self.store, PostgresStore)
                    connect, channel = self.store.connect, self.store.channel
                self.follower = Follower(self.sync, self.cfg.sync_interval_s, connect=connect, channel=channel, prune=self._prune,
                                         prune_every_s=60.0 if self.store.kind == "sqlite" else 300.0)
                self.follower.start()

    async def close(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
            self.follower = None
        if self.indexes is not None:
            await self.indexes.close()
            self.indexes = None
        if self.embedder is not None:
            await self.embedder.close()
        await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.owner = False

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

    async def _on_batch(self, batch: ChangeBatch) -> None:
        """Learn the vectors' dimension from the store (another replica embedded first) and notice a foreign model."""
        if self.embedder is None or self.indexes is None:
            return
        if batch.embedding_model not in (None, self.embedder.model):
            if self.model_mismatch is None:
                log.error("retrieval: the store holds vectors of %r, this replica embeds with %r", batch.embedding_model, self.embedder.model)
            self.model_mismatch = f"the store holds vectors of {batch.embedding_model!r}, this replica embeds queries with {self.embedder.model!r}"
            return
        self.model_mismatch = None
        if batch.embedding_model == self.embedder.model and batch.embedding_dim and not self.embedder.dim:
            self.embedder.dim = batch.embedding_dim
        dim = self._dim()
        if self.indexes.vector is None and dim:
            await self.indexes.open_vector(dim)

    async def _reembed_if_model_changed(self) -> None:
        """A new embedding model re-embeds every chunk once for the fleet; every replica then rebuilds its vector index."""
        if self.embedder is None or self.indexes is None:
            return
        if not {m for m in await self.store.embedding_models() if m != self.embedder.model}:
            return
        async with self.store.exclusive("reembed"):
            stale = {m: n for m, n in (await self.store.embedding_models()).items() if m != self.embedder.model}
            if not stale:
                return  # another replica re-embedded while this one waited
            log.warning("retrieval: embedding model changed to %r; re-embedding %d documents", self.embedder.model, sum(stale.values()))
            await asyncio.to_thread(self.indexes.remove_vector_files)
            async for rows, _acls in self.store.iter_chunks(batch=self.cfg.embedding_batch * 4, with_vector=False):
                vectors = await self.embedder.embed([r.index_text for r in rows])
                await self.store.set_vectors([(r.chunk_id, vectors[i]) for i, r in enumerate(rows)], self.embedder.model,
                                             sorted({(r.tenant, r.doc_id) for r in rows}))
            await self.store.set_vectors([], self.embedder.model, await self.store.all_doc_keys())
            await self._record_dim()
            await self.store.new_vectors_generation()
        dim = self._dim()
        if dim:
            await self.indexes.open_vector(dim)

    async def _record_dim(self) -> None:
        """Record the vectors' model and dimension in the store (once per process: a write per ingest would cost two commits)."""
        if self.embedder is not None and self.embedder.dim and self._recorded != (self.embedder.model, self.embedder.dim):
            await self.store.set_meta("embedding_model", self.embedder.model)
            await self.store.set_meta("embedding_dim", str(self.embedder.dim))
            self._recorded = (self.embedder.model, self.embedder.dim)

    # -- writes ----------------------------------------------------------

    async def upsert(self, doc: DocumentInput, *, wait: bool = True) -> UpsertResult:
        """Add or replace one document (idempotent by content hash)."""
        return (await self.upsert_many([doc], wait=wait))[0]

    def validate(self, docs: list[DocumentInput]) -> None:
        """Refuse bad ids, oversized texts and duplicates before anything is chunked, embedded or written."""
        for d in docs:
            check_key(d.tenant, d.doc_id)
            if len(d.text.encode("utf-8", "surrogatepass")) > self.cfg.max_document_bytes:
                raise PayloadTooLarge(f"document {d.doc_id!r} exceeds max_document_bytes ({self.cfg.max_document_bytes})", rule="retrieval.max_document_bytes")
        if len({(d.tenant, d.doc_id) for d in docs}) != len(docs):
            raise BadRequest("the same document appears twice in one batch", rule="retrieval.document")

    async def upsert_many(self, docs: list[DocumentInput], *, wait: bool = True) -> list[UpsertResult]:
        """Add or replace documents in one store transaction (all or nothing).

        Unchanged content is skipped by hash; a changed ACL alone updates the
        engines' ACL without re-chunking or re-embedding.  Returns once the
        store committed; with ``wait``, once this replica's indexes serve it.
        """
        self.validate(docs)
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
        # Chunking a few kilobytes takes less than the hop to a worker thread; large batches leave the event loop.
        if sum(len(d.text) for d, _ in full) <= 32_768:
            items = self._prepare(full)
        else:
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
                # The dimension first: a replica that sees these vectors can open its vector index.
                await self._record_dim()
                seq = await self.store.write_documents(items)
            if meta:
                seq = max(seq, await self.store.update_documents_meta([m for m, _ in meta], [c for _, c in meta]))
        for r in results:
            if r.status != "unchanged":
                r.seq = seq
        await self._written(seq, wait)
        return results

    def content_hash(self, d: DocumentInput) -> str:
        """Hash of everything that determines the chunks (text, title, chunker and its budget)."""
        h = hashlib.sha256()
        parts = [d.title, self._kind(d), str(self.cfg.chunk_tokens)]
        if self.embedder is not None:
            parts += [f"window:{self._window}", self._tokenizer]
        for part in (*parts, d.text):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()

    @staticmethod
    def _kind(d: DocumentInput) -> DocKind:
        return d.kind or (kind_for(d.uri) if d.uri else "text")

    def _reserve(self, title: str) -> Callable[[tuple[str, ...]], int]:
        """Tokens the embedder reads besides a chunk's text under ``title`` and a heading path (special tokens included)."""

        def reserve(path: tuple[str, ...]) -> int:
            return self._specials + self._count(index_head(title, path))

        return reserve

    def _prepare(self, full: list[tuple[DocumentInput, str]]) -> list[tuple[DocumentRow, list[ChunkRow]]]:
        items = []
        model = self.embedder.model if self.embedder is not None else None
        for d, h in full:
            kind = self._kind(d)
            body_start = parse_front_matter(d.text).body_start if kind == "markdown" else 0
            chunks = chunk_text(d.text, kind, self.cfg.chunk_tokens, body_start, count=self._count,
                                window=self._window if self.embedder is not None else None, reserve=self._reserve(d.title))
            rows = []
            for c in chunks:
                itext = index_text(d.title, c.heading_path, c.text)
                rows.append(ChunkRow(f"{d.tenant}/{d.doc_id}#{h[:16]}.{c.n}", d.tenant, d.doc_id, c.n, list(c.heading_path),
                                     c.start, c.end, c.kind, c.text, itext, c.tokens))
                if self.embedder is not None and not self._warned_window and (n := self._specials + self._count(itext)) > self._window:
                    self._warned_window = True
                    log.warning("retrieval: chunk %s has %d tokens with its title, over the embedder's window of %d: the embedder "
                                "will cut it (a word longer than the window cannot be split; warned once)", rows[-1].chunk_id, n, self._window)
            doc = DocumentRow(d.tenant, d.doc_id, h, d.acl.to_json(), d.source, d.uri, d.title, d.updated_at, list(d.labels),
                              embedding_model=model, n_chunks=len(rows), tokens=sum(r.tokens for r in rows), size=len(d.text))
            items.append((doc, rows))
        return items

    async def delete(self, tenant: str, doc_id: str, *, wait: bool = True) -> bool:
        """Delete a document; no search serves it once this returns (every search re-checks the store)."""
        return (await self.delete_many([(tenant, doc_id)], wait=wait)) == 1

    async def delete_many(self, keys: list[tuple[str, str]], *, wait: bool = True) -> int:
        for tenant, doc_id in keys:
            check_key(tenant, doc_id)
        if not keys:
            return 0
        async with self._write_lock:
            deleted, seq = await self.store.delete_documents(keys)
        await self._written(seq, wait)
        return deleted

    async def _written(self, seq: int, wait: bool) -> None:
        if seq <= 0 or self.indexes is None:
            return
        self.indexes.head = max(self.indexes.head, seq)
        if self.follower is not None:
            self.follower.wake()
        if wait:
            await self.wait_visible(seq)

    async def wait_visible(self, seq: int) -> None:
        """Return once this replica's indexes have applied position ``seq`` (catching up if needed)."""
        idx = self.indexes
        if idx is None:
            return
        for _ in range(3):
            if idx.floor() >= seq:
                return
            await self.sync()
        if idx.floor() < seq:
            raise ServiceUnavailable(f"change {seq} is committed but not yet searchable on this replica", rule="retrieval.stale")

    # -- following the store ------------------------------------------

    async def sync(self) -> int:
        """Apply pending changes from the store of record to the local indexes; returns how many change-log entries."""
        if not self.owner or self.indexes is None:
            return 0
        idx = self.indexes
        async with idx.lock:
            n = await idx.catch_up(self._on_batch)
        # A tenant's first document makes its searches run at once, whatever happens to the gauges' query.
        for tenant in idx.live_tenants:
            self.tenant_documents.setdefault(tenant, 1)
        idx.live_tenants.clear()
        if n:
            await self.refresh_gauges()  # one row per tenant, once per applied batch (not per document)
        elif idx.floor() >= idx.head:
            self.oldest_unapplied_at = None
        return n

    async def _prune(self) -> None:
        if self.indexes is not None:
            async with self._write_lock:  # the SQLite writer connection holds one transaction at a time
                await self.store.prune(self.indexes.floor(), self.cfg.change_log_retention_s)

    async def rebuild(self) -> dict[str, int]:
        """Clear both engines and re-add every chunk from the store of record."""
        if not self.owner or self.indexes is None:
            raise IndexBusy("the index is owned by another process (a running Warden); stop it or use its admin API", rule="retrieval.index_dir")
        async with self.indexes.lock:
            return {name: await self.indexes.rebuild(name) for name in self.indexes.engines()}

    async def refresh_gauges(self) -> None:
        """Cache what the metrics read at scrape time, from the maintained counters (one row per tenant)."""
        per_tenant = await self.store.tenant_counts()
        self.tenant_documents = {t: d for t, (d, _) in per_tenant.items() if d > 0}
        self.documents = sum(d for d, _ in per_tenant.values())
        self.chunks = sum(c for _, c in per_tenant.values())
        idx = self.indexes
        self.oldest_unapplied_at = None
        if idx is not None and idx.floor() < idx.head:
            self.oldest_unapplied_at = await self.store.oldest_change_after(idx.floor())

    def has_documents(self, tenant: str) -> bool:
        """Whether the tenant has any document (as of the last catch-up): a tenant without any skips the search."""
        return self.tenant_documents.get(tenant, 0) > 0

    def behind_s(self) -> float | None:
        """Seconds since the last catch-up that left nothing to apply (``None``: never caught up)."""
        idx = self.indexes
        if idx is None or idx.caught_up_at is None:
            return None
        return time.monotonic() - idx.caught_up_at

    def staleness_s(self) -> float:
        """Seconds the indexes lag the store of record: the age of the oldest change not applied yet, or,
        when this replica cannot learn what changed (store unreachable), the time since it last could."""
        age = 0.0 if self.oldest_unapplied_at is None else max(0.0, time.time() - self.oldest_unapplied_at)
        behind = self.behind_s()
        if behind is not None and behind > 2 * self.cfg.sync_interval_s:
            age = max(age, behind)
        return age

    def not_ready(self) -> str | None:
        """Why this replica must not serve retrieval now (``None``: it may)."""
        if not self.owner or self.indexes is None:
            return "the local retrieval indexes are not open"
        behind = self.behind_s()
        if behind is None:
            return "the local retrieval indexes are being built"
        if behind > self.cfg.max_lag_s:
            # No error text here: /readyz is unauthenticated (GET /admin/index/status has last_sync_error).
            return f"the retrieval indexes have not caught up with the store for {behind:.1f}s (max_lag_s = {self.cfg.max_lag_s:g})"
        if self.model_mismatch is not None:
            return self.model_mismatch
        return None

    # -- reads -----------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Counts, embedding model, this replica's per-engine position and lag, and its follower."""
        head, counts = await self.store.counts_at_head()
        engines: dict[str, Any] = {}
        idx = self.indexes
        live = idx.engines() if idx is not None else {}
        # Without the engines (another process owns them), what their owner last saved.
        state = idx.state if idx is not None else LocalState.load(None if self.index_dir is None else self.index_dir / STATE_FILE)
        for name in self.ENGINES:
            if name == "vector" and self.embedder is None:
                continue
            applied = state.applied.get(name, 0)
            entry: dict[str, Any] = {"applied_seq": applied, "lag": max(0, head - applied), "updated_at": state.updated_at.get(name)}
            if name in live:
                entry["count"] = await asyncio.to_thread(live[name].count)
            engines[name] = entry
        behind = self.behind_s()
        return {
            **counts,
            "store": self.store.kind,
            "mode": self.cfg.mode,
            "embedding_model": self.embedder.model if self.embedder is not None else None,
            "embedding_dim": self.embedder.dim if self.embedder is not None else None,
            "last_seq": head,
            "owner": self.owner,
            "engines": engines,
            "caught_up_s_ago": None if behind is None else round(behind, 3),
            "listening": self.follower.listening if self.follower is not None else None,
            "ready": self.not_ready() is None,
            "last_sync_error": self.last_sync_error,
        }

    async def list_documents(self, tenant: str, limit: int = 100, after: str = "") -> list[DocumentRow]:
        return await self.store.list_documents(tenant, limit, after)

    async def search(self, reader: Reader, query: str, *, top_k: int | None = None, max_tokens: int | None = None, debug: bool = False) -> SearchResult:
        """What would be injected for ``reader``: the best ``top_k`` readable chunks within the token budget.

        ``debug`` adds candidates below the cut (reason ``rank``) and
        higher-ranked chunks the reader may not read (reason ``acl``; id and
        rank only, never their text).  A replica that is not caught up
        refuses (rule ``retrieval.stale``); without a follower it catches up first.
        """
        if not self.owner or self.lexical is None:
            raise IndexBusy(
                "the retrieval index is owned by another process (a running Warden); use its admin API (POST /admin/search)",
                rule="retrieval.index_dir",
            )
        reason = self.not_ready()
        if reason is not None and self.follower is None:
            await self.sync()
            reason = self.not_ready()
        if reason is not None:
            raise ServiceUnavailable(f"retrieval is not available on this replica: {reason}", rule="retrieval.stale")
        return await run_search(self, reader, query, top_k or self.cfg.top_k, max_tokens or self.cfg.max_context_tokens, debug)


def build_service(cfg: RetrievalConfig, config: Config | None) -> RetrievalService:
    """A service for ``[retrieval]``: paths relative to the config file, embedder from the upstream settings by default,
    the store of ``store`` (PostgreSQL from ``[database]``)."""

    def resolve(value: str) -> Path:
        return config.resolve_path(value) if config is not None else Path(value)

    embedder: Embedder | None = None
    if cfg.embedder == "local":
        from llm_warden.plugins.retrieval.embed_local import LocalEmbedder

        embedder = LocalEmbedder()
    elif cfg.embedder == "upstream":
        base_url = cfg.embedding_base_url or (config.upstream.base_url if config is not None else "")
        env = cfg.embedding_api_key_env or (config.upstream.api_key_env if config is not None else "")
        key = os.environ.get(env) if env else None
        if env and key is None:
            log.warning("retrieval: the embeddings key variable %s is not set; calling %s without a key", env, base_url)
        embedder = UpstreamEmbedder(base_url, key, cfg.embedding_model, cfg.embedding_dim or None, cfg.embedding_batch, cfg.embedding_timeout_s)
    store: RecordStore | None = None
    if cfg.store == "postgres":
        from llm_warden.plugins.retrieval.pgstore import PostgresStore
        from llm_warden.proxy.config import DatabaseConfig

        database = config.database if config is not None else DatabaseConfig()
        dsn = database.dsn
        if not dsn:
            raise ConfigError("database.dsn_env", f"retrieval.store = \"postgres\" needs the environment variable {database.dsn_env} (a postgresql:// URL)")
        store = PostgresStore(dsn, pool_min=database.pool_min, pool_max=database.pool_max, timeout_s=cfg.store_timeout_s)
    return RetrievalService(cfg, resolve(cfg.db), resolve(cfg.index_dir), embedder, store=store)
