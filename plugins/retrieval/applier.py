"""A replica's local indexes and how they follow the store of record.

Each replica (each process owning an ``index_dir``) keeps its own lexical and
vector engines, derived from the store of record, and its own
``state.json`` in that directory: which store the indexes were built from
(the store's id), the position each engine has applied, and the generation
of the vectors.  That state never lives in the shared store: replicas come
and go, and each knows only itself.

:meth:`Indexes.catch_up` applies every change after the lowest applied
position, in batches, each batch one engine commit; the state file is
replaced (atomic rename) after the engines committed, so a crash in between
re-applies a batch, which is idempotent: an entry only says *which*
document changed, and the document's current rows are applied.  An engine
whose position is below the log's pruned bound, whose store id differs, or
whose vector generation is old, or (lexical) whose terms were made by another
analyzer (:data:`~plugins.retrieval.tokenize.ANALYZER`), is rebuilt from the
documents instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk
from llm_warden.plugins.retrieval.lexical import LexicalIndex
from llm_warden.plugins.retrieval.records import ChangeBatch, ChunkRow, DocumentRow, RecordStore
from llm_warden.plugins.retrieval.tokenize import ANALYZER
from llm_warden.plugins.retrieval.vector import VectorIndex

log = logging.getLogger("warden.retrieval")

Engine = LexicalIndex | VectorIndex
STATE_FILE = "state.json"
HEAD_ONLY = 2**62


@dataclass
class LocalState:
    """What this replica's indexes hold (``index_dir/state.json``; in memory without an index directory)."""

    path: Path | None
    store_id: str = ""
    applied: dict[str, int] = field(default_factory=dict)
    vectors_generation: str = ""
    lexical_analyzer: str = ""
    """The analyzer the lexical index's terms were made with (empty: before analyzers were versioned)."""
    updated_at: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> LocalState:
        """The saved state; an unreadable file counts as none (the indexes are then rebuilt)."""
        st = cls(path)
        if path is None or not path.exists():
            return st
        try:
            data = orjson.loads(path.read_bytes())
            st.store_id = str(data["store_id"])
            st.applied = {str(k): int(v) for k, v in data["applied"].items()}
            st.vectors_generation = str(data.get("vectors_generation", ""))
            st.lexical_analyzer = str(data.get("lexical_analyzer", ""))
            st.updated_at = {str(k): float(v) for k, v in data.get("updated_at", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("retrieval: %s is unreadable; the local indexes will be rebuilt", path)
            return cls(path)
        return st

    def save(self) -> None:
        """Replace the file atomically (a torn write is never read back)."""
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"store_id": self.store_id, "applied": self.applied, "vectors_generation": self.vectors_generation,
                                      "lexical_analyzer": self.lexical_analyzer, "updated_at": self.updated_at}))
        os.replace(tmp, self.path)

    def set(self, name: str, pos: int) -> None:
        self.applied[name] = pos
        self.updated_at[name] = time.time()


class Indexes:
    """The engines of one replica, kept up to date from the store's change log (see the module docstring)."""

    def __init__(self, store: RecordStore, index_dir: Path | None, batch: int = 5000) -> None:
        self.store = store
        self.index_dir = index_dir
        self.batch = batch
        self.lexical: LexicalIndex | None = None
        self.vector: VectorIndex | None = None
        self.state = LocalState.load(None if index_dir is None else index_dir / STATE_FILE)
        self.lock = asyncio.Lock()
        self.head = 0
        """The newest position the store reported (the last catch-up, or a notification)."""
        self.caught_up_at: float | None = None
        """``time.monotonic()`` when the last catch-up started that found nothing left to apply."""
        self.live_tenants: set[str] = set()
        """Tenants of documents applied since the service last looked (it keeps "has documents" current)."""
        self.seen_model: str | None = None
        self.seen_dim: int | None = None
        self.on_servable: Callable[[list[DocumentRow]], None] | None = None
        """Told, after each applied batch, the document versions (upserts) that just became searchable on this replica."""

    def _path(self, name: str) -> Path | None:
        return None if self.index_dir is None else self.index_dir / name

    async def open_lexical(self) -> None:
        self.lexical = await asyncio.to_thread(LexicalIndex, self._path("lexical"))

    async def open_vector(self, dim: int) -> None:
        self.vector = await asyncio.to_thread(VectorIndex, self._path("vector"), dim)

    async def close(self) -> None:
        if self.lexical is not None:
            await asyncio.to_thread(self.lexical.close)
            self.lexical = None
        self.vector = None

    def engines(self) -> dict[str, Engine]:
        out: dict[str, Engine] = {}
        if self.lexical is not None:
            out["lexical"] = self.lexical
        if self.vector is not None:
            out["vector"] = self.vector
        return out

    def applied(self, name: str) -> int:
        return self.state.applied.get(name, 0)

    def floor(self) -> int:
        """The lowest position applied by every open engine (what is searchable everywhere)."""
        engines = self.engines()
        return min(self.applied(n) for n in engines) if engines else 0

    async def adopt_store(self) -> None:
        """A state written for another store (or none) means the indexes hold nothing of this one: rebuild them all."""
        store_id = await self.store.identity()
        if self.state.store_id != store_id:
            if self.state.store_id:
                log.warning("retrieval: the local indexes were built from another store; rebuilding them")
            self.state.store_id = store_id
            self.state.applied = {}
            self.state.vectors_generation = ""

    async def catch_up(self, on_batch: Callable[[ChangeBatch], Awaitable[None]] | None = None) -> int:
        """Apply every change after the engines' positions; returns how many entries were applied (call under :attr:`lock`).

        ``on_batch`` sees each batch first (the service learns the vector
        dimension from it and may open the vector engine).
        """
        engines = self.engines()
        total = 0
        rebuilt: set[str] = set()
        while True:
            low = min([self.applied(n) for n in engines] or [0])
            # Everything committed before this read is in its snapshot: once applied, the indexes are fresh as of now.
            started = time.monotonic()
            batch = await self.store.changes_after(low, self.batch)
            self.head = max(self.head, batch.head)
            self.seen_model, self.seen_dim = batch.embedding_model, batch.embedding_dim
            if on_batch is not None:
                await on_batch(batch)
                engines = self.engines()
            for name in engines:
                stale_vectors = name == "vector" and batch.vectors_generation != self.state.vectors_generation
                stale_terms = name == "lexical" and self.state.lexical_analyzer != ANALYZER
                fresh = name not in self.state.applied
                if name not in rebuilt and (fresh or stale_vectors or stale_terms or self.applied(name) < batch.pruned_upto):
                    if not fresh:
                        log.warning("retrieval: rebuilding the %s index (%s)", name,
                                    "new vectors" if stale_vectors else
                                    f"its terms were made by analyzer {self.state.lexical_analyzer or 'en_stem'!r}, now {ANALYZER!r}"
                                    if stale_terms else "behind the pruned change log")
                    await self.rebuild(name, batch)
                    rebuilt.add(name)
            lagging = {n: e for n, e in engines.items() if self.applied(n) < batch.head}
            if not lagging:
                self.caught_up_at = started
                return total
            if not batch.changes:
                # Nothing committed between the positions and the head (rolled-back gaps): nothing to apply.
                for name in lagging:
                    self.state.set(name, batch.head)
                await asyncio.to_thread(self.state.save)
                self.caught_up_at = started
                return total
            ops_by: dict[str, dict[tuple[str, str], set[str]]] = {}
            for name in lagging:
                ops = ops_by[name] = {}
                for ch in batch.changes:
                    if ch.seq > self.applied(name):
                        ops.setdefault((ch.tenant, ch.doc_id), set()).add(ch.op)
            docs, chunks = await self._load(ops_by, with_vector="vector" in lagging)
            for name, engine in lagging.items():
                await self._apply(engine, ops_by[name], docs, chunks, vectors=name == "vector")
                self.state.set(name, batch.changes[-1].seq)
            total += len(batch.changes)
            if self.on_servable is not None:
                upserted = {k for ops in ops_by.values() for k, o in ops.items() if "upsert" in o}
                self.on_servable([docs[k] for k in sorted(upserted) if k in docs])
            done = len(batch.changes) < self.batch
            if done:
                # The batch ended below the limit: everything up to the snapshot's head is applied.
                for name in lagging:
                    self.state.set(name, max(self.applied(name), batch.head))
            await asyncio.to_thread(self.state.save)
            if done:
                self.caught_up_at = started
                return total

    async def _load(self, ops_by: dict[str, dict[tuple[str, str], set[str]]], with_vector: bool) -> tuple[
            dict[tuple[str, str], DocumentRow], dict[tuple[str, str], list[ChunkRow]]]:
        """The current rows of every document named, read once for all engines."""
        keys = {k for ops in ops_by.values() for k in ops}
        docs: dict[tuple[str, str], DocumentRow] = {}
        for tenant in {t for t, _ in keys}:
            for doc_id, row in (await self.store.get_documents(tenant, [d for t, d in keys if t == tenant])).items():
                docs[(tenant, doc_id)] = row
        self.live_tenants.update(t for t, _ in docs)
        full = sorted({k for ops in ops_by.values() for k, o in ops.items() if o != {"acl"} and k in docs})
        return docs, await self.store.chunks_of(full, with_vector=with_vector)

    async def _apply(self, engine: Engine, ops: dict[tuple[str, str], set[str]], docs: dict[tuple[str, str], DocumentRow],
                     chunks: dict[tuple[str, str], list[ChunkRow]], *, vectors: bool) -> None:
        acl_only = [k for k, o in ops.items() if o == {"acl"}]
        full = [k for k, o in ops.items() if o != {"acl"}]
        indexed: list[IndexedChunk] = []
        for key in full:
            if key not in docs:
                continue
            acl = Acl.from_json(docs[key].acl)
            for c in chunks.get(key, []):
                if vectors and c.vector is None:
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

    async def rebuild(self, name: str, batch: ChangeBatch | None = None) -> int:
        """Clear one engine and re-add every chunk from the store (call under :attr:`lock`).

        The position recorded is the head read *before* the chunks: a change
        committed while they are read is applied again afterwards (idempotent).
        """
        engine = self.engines()[name]
        if batch is None:
            batch = await self.store.changes_after(HEAD_ONLY, 1)  # no change above it: the head and metadata, one snapshot
        head = batch.head
        await asyncio.to_thread(engine.clear)
        total = 0
        async for rows, acls in self.store.iter_chunks(with_vector=name == "vector"):
            part = [
                IndexedChunk(r.chunk_id, r.tenant, r.doc_id, r.index_text, Acl.from_json(acls[(r.tenant, r.doc_id)]), r.vector)
                for r in rows
                if (r.tenant, r.doc_id) in acls and (name != "vector" or r.vector is not None)
            ]
            if part:
                await asyncio.to_thread(engine.upsert, part)
            total += len(part)
        await asyncio.to_thread(engine.commit)
        self.state.set(name, head)
        if name == "vector":
            self.state.vectors_generation = batch.vectors_generation
        if name == "lexical":
            self.state.lexical_analyzer = ANALYZER
        await asyncio.to_thread(self.state.save)
        return total

    async def sanity_check(self) -> None:
        """Each engine must hold exactly the store's chunks (compared at one position only); otherwise rebuild it (under :attr:`lock`)."""
        head, counts = await self.store.counts_at_head()
        for name, engine in self.engines().items():
            if self.applied(name) != head:
                continue  # changes arrived meanwhile: the counts are of another moment
            expected = counts["vectors"] if name == "vector" else counts["chunks"]
            have = await asyncio.to_thread(engine.count)
            if have != expected:
                log.warning("retrieval: %s engine holds %d chunks, the store %d; rebuilding it", name, have, expected)
                await self.rebuild(name)

    def remove_vector_files(self) -> None:
        """Forget the vector index on disk (a new embedding model)."""
        self.vector = None
        path = self._path("vector")
        if path is not None and path.exists():
            import shutil

            shutil.rmtree(path)
        self.state.applied.pop("vector", None)
        with contextlib.suppress(OSError):
            self.state.save()
