"""Dense vector search on faiss whose top-k is taken among the chunks the reader may read.

Vectors are float32, L2-normalised, compared by inner product (cosine). Every chunk
gets a sequential internal id; its vector lives in one faiss ``IndexHNSWFlat`` (whose
flat storage is also the matrix the exact scans read, so each vector is held once).

**ACL inside the search.** Chunks with the same tenant and ACL share an *ACL class*.
Per tenant, each ACL token (``public``, ``user:U``, ``group:G``, ``deny_user:U``,
``deny_group:G``) maps to the set of classes carrying it, and each class to the
array of its live ids. A reader's readable classes are the union of the classes of
its grant tokens minus those of its deny tokens (a few set operations over classes,
not chunks); the allowed ids are the disjoint union of those classes' arrays.

**Strategy by the size of the allowed set.**

- *narrow* (at most ``exact_max`` ids, or less than ``graph_min_fraction`` of the live
  corpus, where a filtered graph walk loses recall): exact scan, a BLAS matrix-vector
  product over the gathered allowed vectors. Exact by construction.
- *broad*: HNSW search with a search-time ``IDSelectorBitmap`` of the allowed ids, an
  oversampled candidate count and ``efSearch`` raised as the allowed fraction falls;
  if the walk yields fewer than ``k`` allowed ids the exact scan answers instead.

**Deletions** are tombstones (HNSW cannot remove): a deleted id leaves its class and the
live mask at once, so it can never be returned; when tombstones pass
``compact_fraction`` of all ids, :meth:`commit` rebuilds the index from the live chunks.

**Visibility and durability.** Changes are visible to searches as soon as the call
returns; :meth:`commit` makes them durable. On disk (``path``): ``CURRENT`` names the
live generation directory, which holds ``vectors.f32`` (append-only rows, row = internal
id), ``journal.jsonl`` (append-only adds, deletions, ACL changes, each commit ending in a
``commit`` line with the row count) and ``graph-N.faiss`` (an HNSW snapshot covering the
first N rows, rewritten when many rows are not in it). A commit appends and fsyncs, so
its cost follows the change, not the index size; on load a torn tail after the last
``commit`` line is cut off and rows missing from the graph snapshot are re-added. A
clear or compaction writes a new generation directory and switches ``CURRENT`` by
atomic rename.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader, acl_tokens, reader_allow_tokens, reader_deny_tokens


@dataclass
class Record:
    """The metadata of one internal id."""

    chunk_id: str
    tenant: str
    doc_id: str
    acl: Acl


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Store:
    """The on-disk form of a :class:`VectorIndex` (layout in the module docstring)."""

    def __init__(self, path: Path, dim: int, graph_snapshot_min: int = 20_000) -> None:
        self.path = path
        self.dim = dim
        self.graph_snapshot_min = graph_snapshot_min
        path.mkdir(parents=True, exist_ok=True)
        self.gen: Path | None = None
        self.rows = 0  # committed rows
        self.graph_rows = 0  # rows covered by the newest graph snapshot
        self.ops: list[dict[str, object]] = []
        self.pending_rows = 0  # rows appended to vectors.f32 (not yet fsynced) since the last commit
        self._vectors_file: BinaryIO | None = None
        self.new_generation = True

    # load --------------------------------------------------------------

    def load(self) -> tuple[list[Record], numpy.ndarray, list[int], faiss.IndexHNSWFlat | None]:
        """All committed records in id order, their vectors, the dead ids, and the newest usable graph."""
        current = self.path / "CURRENT"
        empty = numpy.zeros((0, self.dim), numpy.float32)
        if not current.exists():
            return [], empty, [], None
        self.gen = self.path / current.read_text().strip()
        meta = json.loads((self.gen / "meta.json").read_text())
        if meta.get("dim") != self.dim:
            raise RuntimeError(f"vector index at {self.path} has dim {meta.get('dim')}, not {self.dim}; run `warden index rebuild`")
        records: list[Record] = []
        docs: dict[tuple[str, str], list[int]] = {}
        dead: set[int] = set()
        committed_offset = 0
        batch: list[dict[str, Any]] = []
        with open(self.gen / "journal.jsonl", "rb") as fh:
            offset = 0
            for line in fh:
                offset += len(line)
                if not line.endswith(b"\n"):
                    break  # torn tail of an interrupted commit
                op = json.loads(line)
                if op["op"] != "commit":
                    batch.append(op)
                    continue
                for staged in batch:
                    self._replay(staged, records, docs, dead)
                if op["n"] != len(records):
                    raise RuntimeError(f"vector index journal at {self.gen} is inconsistent; run `warden index rebuild`")
                batch, committed_offset = [], offset
        committed_rows = len(records)
        with open(self.gen / "journal.jsonl", "r+b") as fh:
            fh.truncate(committed_offset)
        size = committed_rows * self.dim * 4
        with open(self.gen / "vectors.f32", "r+b") as fh:
            fh.truncate(size)
        vectors = numpy.fromfile(self.gen / "vectors.f32", dtype=numpy.float32).reshape(-1, self.dim)
        self.rows = committed_rows
        graph: faiss.IndexHNSWFlat | None = None
        snapshots = sorted(
            (int(p.stem.split("-")[1]), p) for p in self.gen.glob("graph-*.faiss") if p.stem.split("-")[1].isdigit()
        )
        for rows, p in reversed(snapshots):
            if rows <= committed_rows:
                loaded = faiss.read_index(str(p))
                if not isinstance(loaded, faiss.IndexHNSWFlat):
                    raise RuntimeError(f"vector graph {p} is not an HNSW graph; run `warden index rebuild`")
                graph = loaded
                self.graph_rows = rows
                break
        self.new_generation = False
        return records, vectors, sorted(dead), graph

    @staticmethod
    def _replay(op: dict[str, Any], records: list[Record], docs: dict[tuple[str, str], list[int]], dead: set[int]) -> None:
        key = (op["t"], op["d"])
        if op["op"] == "add":
            if op["id"] != len(records):
                raise RuntimeError("vector index journal has a gap in its ids; run `warden index rebuild`")
            acl = Acl.from_json(op["a"])
            for cid in op["c"]:
                docs.setdefault(key, []).append(len(records))
                records.append(Record(cid, key[0], key[1], acl))
        elif op["op"] == "del":
            dead.update(docs.pop(key, []))
        elif op["op"] == "acl":
            acl = Acl.from_json(op["a"])
            for i in docs.get(key, []):
                records[i].acl = acl
        else:
            raise RuntimeError(f"vector index journal has an unknown op {op['op']!r}")

    # staging -----------------------------------------------------------

    def log_add(self, first: int, records: list[Record], vectors: numpy.ndarray) -> None:
        run: list[Record] = []
        for rec in records:
            if run and (rec.tenant, rec.doc_id, rec.acl) != (run[0].tenant, run[0].doc_id, run[0].acl):
                self.ops.append(self._add_op(first, run))
                first += len(run)
                run = []
            run.append(rec)
        if run:
            self.ops.append(self._add_op(first, run))
        if not self.new_generation:
            # Straight to the file (fsynced at commit): no second copy in memory. Rows past
            # the last commit's count are cut off at load, so a crash leaves no trace.
            assert self.gen is not None
            if self._vectors_file is None:
                self._vectors_file = open(self.gen / "vectors.f32", "ab")  # noqa: SIM115 - closed at commit/clear
            self._vectors_file.write(numpy.ascontiguousarray(vectors, dtype=numpy.float32).tobytes())
            self.pending_rows += len(vectors)

    @staticmethod
    def _add_op(first: int, run: list[Record]) -> dict[str, object]:
        return {"op": "add", "id": first, "t": run[0].tenant, "d": run[0].doc_id, "a": run[0].acl.to_json(), "c": [r.chunk_id for r in run]}

    def log_delete(self, tenant: str, doc_id: str) -> None:
        self.ops.append({"op": "del", "t": tenant, "d": doc_id})

    def log_acl(self, tenant: str, doc_id: str, acl: Acl) -> None:
        self.ops.append({"op": "acl", "t": tenant, "d": doc_id, "a": acl.to_json()})

    def log_clear(self) -> None:
        self._close_vectors()
        self.ops, self.pending_rows, self.new_generation = [], 0, True

    def _close_vectors(self) -> None:
        if self._vectors_file is not None:
            self._vectors_file.close()
            self._vectors_file = None

    # commit ------------------------------------------------------------

    def commit(self, graph: faiss.Index, everything: Callable[[], tuple[list[Record], list[int], numpy.ndarray]]) -> None:
        """Append staged changes (or write a new generation after a clear) and fsync."""
        if self.new_generation:
            self._write_generation(graph, *everything())
            return
        assert self.gen is not None
        if not self.ops:
            return
        rows = self.rows + self.pending_rows
        if self._vectors_file is not None:
            self._vectors_file.flush()
            os.fsync(self._vectors_file.fileno())
            self._close_vectors()
        with open(self.gen / "journal.jsonl", "ab") as fh:
            for op in [*self.ops, {"op": "commit", "n": rows}]:
                fh.write(json.dumps(op, separators=(",", ":")).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows, self.ops, self.pending_rows = rows, [], 0
        if rows - self.graph_rows >= max(self.graph_snapshot_min, rows // 4):
            self._write_graph(self.gen, graph, rows)

    def _write_graph(self, gen: Path, graph: faiss.Index, rows: int) -> None:
        tmp = gen / "graph.tmp"
        faiss.write_index(graph, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, gen / f"graph-{rows}.faiss")
        _fsync_dir(gen)
        for old in gen.glob("graph-*.faiss"):
            if old.name != f"graph-{rows}.faiss":
                old.unlink()
        self.graph_rows = rows

    def _write_generation(self, graph: faiss.Index, records: list[Record], dead: list[int], matrix: numpy.ndarray) -> None:
        number = int(self.gen.name.split("-")[1]) + 1 if self.gen is not None else 1
        name = f"gen-{number:06d}"
        tmp = self.path / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps({"dim": self.dim}))
        numpy.ascontiguousarray(matrix, dtype=numpy.float32).tofile(tmp / "vectors.f32")
        self._close_vectors()
        self.gen, self.rows, self.graph_rows, self.ops, self.pending_rows = tmp, 0, 0, [], 0
        self.log_add(0, records, numpy.zeros((0, self.dim), numpy.float32))
        dead_set = set(dead)
        ops = self.ops
        self.ops = []
        with open(tmp / "journal.jsonl", "wb") as fh:
            for op in ops:
                fh.write(json.dumps(op, separators=(",", ":")).encode() + b"\n")
            # Dead ids of a generation are always whole documents.
            for key in sorted({(records[i].tenant, records[i].doc_id) for i in dead_set}):
                fh.write(json.dumps({"op": "del", "t": key[0], "d": key[1]}).encode() + b"\n")
            fh.write(json.dumps({"op": "commit", "n": len(records)}).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / "vectors.f32", "rb") as fh:
            os.fsync(fh.fileno())
        if len(records) >= self.graph_snapshot_min:
            self._write_graph(tmp, graph, len(records))
        final = self.path / name
        os.replace(tmp, final)
        current_tmp = self.path / "CURRENT.tmp"
        current_tmp.write_text(name + "\n")
        with open(current_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(current_tmp, self.path / "CURRENT")
        _fsync_dir(self.path)
        for old in self.path.glob("gen-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.gen, self.rows, self.new_generation = final, len(records), False


class _RWLock:
    """Many concurrent readers or one writer (writers are not starved by a stream of readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _AclClass:
    tenant: str
    acl: Acl
    ids: set[int] = field(default_factory=set)
    array: numpy.ndarray | None = None  # cached sorted ids, dropped on change

    def ids_array(self) -> numpy.ndarray:
        if self.array is None:
            self.array = numpy.fromiter(sorted(self.ids), dtype=numpy.int64, count=len(self.ids))
        return self.array


class VectorIndex:
    """Permission-filtered exact/HNSW vector search over chunks; one writer, many readers.

    ``path=None`` keeps the index in RAM; otherwise it is loaded from (and committed to)
    that directory. ``exact_max`` and ``graph_min_fraction`` set the narrow/broad
    threshold; ``hnsw_m``, ``ef_construction``, ``ef_search`` and ``oversample`` tune the
    graph; ``compact_fraction`` is the tombstone share that triggers a rebuild at commit;
    ``add_slice`` is how many vectors one write-lock hold inserts (searches interleave).
    """

    def __init__(
        self,
        path: Path | None,
        dim: int,
        *,
        exact_max: int = 20_000,
        graph_min_fraction: float = 0.1,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 512,
        oversample: int = 4,
        compact_fraction: float = 0.3,
        add_slice: int = 256,
    ) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        self.exact_max = exact_max
        self.graph_min_fraction = graph_min_fraction
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.oversample = oversample
        self.compact_fraction = compact_fraction
        self.add_slice = add_slice
        self._lock = _RWLock()
        self._store = _Store(path, dim) if path is not None else None
        self._reset()
        if self._store is not None:
            records, vectors, dead, graph = self._store.load()
            if graph is not None:
                if graph.d != dim or graph.ntotal > len(records):
                    raise RuntimeError(f"vector graph at {path} does not match its journal; run `warden index rebuild`")
                self._graph = graph
            self._add_records(records, vectors, in_graph=self._graph.ntotal)
            self._kill(dead)

    # -- writes ---------------------------------------------------------------

    def upsert(self, chunks: list[IndexedChunk]) -> None:
        """Add ``chunks`` (each with a ``dim``-sized vector); the pipeline deletes replaced docs first.

        Chunks become searchable slice by slice as they are inserted, all of them when
        this returns; a malformed vector rejects the whole call before anything is added.
        """
        if not chunks:
            return
        vectors = numpy.empty((len(chunks), self.dim), dtype=numpy.float32)
        for i, chunk in enumerate(chunks):
            if chunk.vector is None:
                raise ValueError(f"chunk {chunk.chunk_id!r} has no vector")
            v = numpy.asarray(chunk.vector, dtype=numpy.float32).reshape(-1)
            if v.shape[0] != self.dim or not numpy.isfinite(v).all():
                raise ValueError(f"chunk {chunk.chunk_id!r}: vector must be {self.dim} finite floats")
            vectors[i] = v
        records = [Record(c.chunk_id, c.tenant, c.doc_id, c.acl) for c in chunks]
        # Graph insertion is slow (~0.1-0.3 ms a vector): add in slices so searches are
        # never held up for long behind a large batch.
        for start in range(0, len(records), self.add_slice):
            part, part_vectors = records[start : start + self.add_slice], vectors[start : start + self.add_slice]
            with self._lock.write():
                first = len(self._chunk_ids)
                self._add_records(part, part_vectors)
                if self._store is not None:
                    self._store.log_add(first, part, part_vectors)

    def delete_docs(self, keys: list[tuple[str, str]]) -> None:
        """Remove every chunk of each ``(tenant, doc_id)``; never returned again once this returns."""
        with self._lock.write():
            for key in keys:
                ids = self._docs.pop(key, None)
                if not ids:
                    continue
                self._kill(ids)
                if self._store is not None:
                    self._store.log_delete(*key)

    def set_acl(self, tenant: str, doc_id: str, acl: Acl) -> None:
        """Give every chunk of a document a new ACL (no re-embedding); effective when this returns."""
        with self._lock.write():
            ids = self._docs.get((tenant, doc_id))
            if not ids:
                return
            cls = self._class_for(tenant, acl)
            for i in ids:
                self._unclass(i)
                self._class_of[i] = cls
                self._classes[cls].ids.add(i)
            self._classes[cls].array = None
            self._version += 1
            if self._store is not None:
                self._store.log_acl(tenant, doc_id, acl)

    def clear(self) -> None:
        """Remove every chunk (for a rebuild); the on-disk index is replaced at the next commit."""
        with self._lock.write():
            self._reset()
            if self._store is not None:
                self._store.log_clear()

    def commit(self) -> None:
        """Persist every change since the last commit (crash-safe); compacts when tombstones pile up."""
        with self._lock.write():
            n = len(self._chunk_ids)
            if n and self._dead > self.compact_fraction * n:
                self._compact()
            if self._store is not None:
                self._store.commit(self._graph, self._everything)

    # -- reads ----------------------------------------------------------------

    def search(self, reader: Reader, vector: numpy.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` chunks the reader may read most similar to ``vector``: ``(chunk_id, inner product)``, best first."""
        q = numpy.ascontiguousarray(numpy.asarray(vector, dtype=numpy.float32).reshape(-1))
        if q.shape[0] != self.dim:
            raise ValueError(f"query vector must have {self.dim} dimensions")
        if k <= 0 or not numpy.isfinite(q).all():
            return []
        with self._lock.read():
            classes = self._readable_classes(reader)
            size = sum(len(self._classes[c].ids) for c in classes)
            if size == 0:
                return []
            live = len(self._chunk_ids) - self._dead
            k = min(k, size)
            if size <= self.exact_max or size < self.graph_min_fraction * live:
                ids, scores = self._exact(classes, q, k)
            else:
                ids, scores = self._graph_search(classes, size, live, q, k)
                if len(ids) < k:
                    ids, scores = self._exact(classes, q, k)
            return [(self._chunk_ids[i], float(s)) for i, s in zip(ids, scores, strict=True)]

    def count(self) -> int:
        """The number of live (searchable) chunks."""
        with self._lock.read():
            return len(self._chunk_ids) - self._dead

    # -- internals ------------------------------------------------------------

    def _reset(self) -> None:
        self._graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self._graph.hnsw.efConstruction = self.ef_construction
        self._chunk_ids: list[str] = []
        self._keys: list[tuple[str, str]] = []
        self._class_of: list[int] = []
        self._alive_buf = numpy.zeros(0, dtype=bool)
        self._alive = self._alive_buf[:0]
        self._dead = 0
        self._docs: dict[tuple[str, str], list[int]] = {}
        self._classes: list[_AclClass] = []
        self._class_index: dict[tuple[str, str], int] = {}
        self._token_classes: dict[str, dict[str, set[int]]] = {}
        self._version = 0
        self._bitmaps: dict[frozenset[int], tuple[int, numpy.ndarray]] = {}

    def _add_records(self, records: list[Record], vectors: numpy.ndarray, in_graph: int = 0) -> None:
        """Give ``records`` the next ids; the first ``in_graph`` of them are already in the graph."""
        if not records:
            return
        first = len(self._chunk_ids)
        if in_graph < len(records):
            self._graph.add(numpy.ascontiguousarray(vectors[in_graph:]))
        end = first + len(records)
        if end > len(self._alive_buf):
            buf = numpy.zeros(max(end, 2 * len(self._alive_buf), 1024), dtype=bool)
            buf[:first] = self._alive_buf[:first]
            self._alive_buf = buf
        self._alive_buf[first:end] = True
        self._alive = self._alive_buf[:end]
        touched = set()
        for offset, rec in enumerate(records):
            i = first + offset
            cls = self._class_for(rec.tenant, rec.acl)
            self._chunk_ids.append(rec.chunk_id)
            self._keys.append((rec.tenant, rec.doc_id))
            self._class_of.append(cls)
            self._classes[cls].ids.add(i)
            touched.add(cls)
            self._docs.setdefault((rec.tenant, rec.doc_id), []).append(i)
        for cls in touched:
            self._classes[cls].array = None
        self._version += 1

    def _class_for(self, tenant: str, acl: Acl) -> int:
        key = (tenant, acl.key())
        cls = self._class_index.get(key)
        if cls is None:
            cls = len(self._classes)
            self._classes.append(_AclClass(tenant, acl))
            self._class_index[key] = cls
            tokens = self._token_classes.setdefault(tenant, {})
            for token in acl_tokens(acl):
                tokens.setdefault(token, set()).add(cls)
        return cls

    def _kill(self, ids: list[int]) -> None:
        for i in ids:
            self._unclass(i)
            self._alive[i] = False
        self._dead += len(ids)
        self._version += 1

    def _unclass(self, i: int) -> None:
        cls = self._classes[self._class_of[i]]
        cls.ids.discard(i)
        cls.array = None

    def _readable_classes(self, reader: Reader) -> list[int]:
        tokens = self._token_classes.get(reader.tenant)
        if not tokens:
            return []
        allowed: set[int] = set()
        for token in reader_allow_tokens(reader):
            allowed |= tokens.get(token, set())
        for token in reader_deny_tokens(reader):
            allowed -= tokens.get(token, set())
        return sorted(c for c in allowed if self._classes[c].ids)

    def _storage(self) -> faiss.IndexFlat:
        """The graph's vectors: an HNSW "Flat" graph keeps them in an IndexFlat."""
        storage = faiss.downcast_index(self._graph.storage)
        if not isinstance(storage, faiss.IndexFlat):
            raise RuntimeError(f"the HNSW graph stores its vectors in {type(storage).__name__}, not IndexFlat")
        return storage

    def _matrix(self) -> numpy.ndarray:
        storage = self._storage()
        n = storage.ntotal
        return faiss.rev_swig_ptr(storage.get_xb(), n * self.dim).reshape(n, self.dim)

    def _exact(self, classes: list[int], q: numpy.ndarray, k: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Exact top-k over the allowed ids.

        A small share of the corpus (at most 2%, or 4,096 ids) is gathered and scored with
        one BLAS matrix-vector product; a larger one is a flat scan of the stored vectors
        restricted by the allowed-id bitmap (no copy). Measured at 1M: 0.2 vs 1.6 ms for
        1k ids, 1.9 vs 3.2 ms for 10k, 28 vs 20 ms for 50k.
        """
        arrays = [self._classes[c].ids_array() for c in classes]
        size = sum(len(a) for a in arrays)
        if size <= max(4096, len(self._chunk_ids) // 50):
            ids = arrays[0] if len(arrays) == 1 else numpy.sort(numpy.concatenate(arrays))
            scores = self._matrix()[ids] @ q
            if len(ids) > k:
                part = numpy.argpartition(-scores, k - 1)[:k]
                ids, scores = ids[part], scores[part]
            order = numpy.argsort(-scores, kind="stable")
            return ids[order], scores[order]
        params = faiss.SearchParameters()
        bitmap = self._bitmap(classes)
        params.sel = faiss.IDSelectorBitmap(len(self._chunk_ids), faiss.swig_ptr(bitmap))
        scores, ids = self._storage().search(q.reshape(1, -1), k, params=params)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def _bitmap(self, classes: list[int]) -> numpy.ndarray:
        key = frozenset(classes)
        cached = self._bitmaps.get(key)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        mask = numpy.zeros(len(self._chunk_ids), dtype=bool)
        for c in classes:
            mask[self._classes[c].ids_array()] = True
        bitmap = numpy.packbits(mask, bitorder="little")
        if len(self._bitmaps) >= 64:
            self._bitmaps.pop(next(iter(self._bitmaps)))
        self._bitmaps[key] = (self._version, bitmap)
        return bitmap

    def _graph_search(self, classes: list[int], size: int, live: int, q: numpy.ndarray, k: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        bitmap = self._bitmap(classes)
        selector = faiss.IDSelectorBitmap(len(self._chunk_ids), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # in faiss, missing from its stubs
        params.sel = selector
        fetch = min(size, k * self.oversample)
        fraction = size / max(live, 1)
        params.efSearch = max(fetch, int(self.ef_search / min(1.0, max(fraction, 0.01)) ** 0.5))
        scores, ids = self._graph.search(q.reshape(1, -1), fetch, params=params)
        keep = ids[0] >= 0
        ids, scores = ids[0][keep][:k], scores[0][keep][:k]
        return ids, scores

    def _everything(self) -> tuple[list[Record], list[int], numpy.ndarray]:
        """Every id's record (dead ones too), the dead ids, and the vector matrix: a new generation."""
        records = [Record(cid, t, d, self._classes[c].acl) for cid, (t, d), c in zip(self._chunk_ids, self._keys, self._class_of, strict=True)]
        dead = numpy.flatnonzero(~self._alive).tolist()
        return records, dead, self._matrix()

    def _compact(self) -> None:
        live = numpy.flatnonzero(self._alive)
        records = [Record(self._chunk_ids[i], *self._keys[i], self._classes[self._class_of[i]].acl) for i in live]
        vectors = numpy.ascontiguousarray(self._matrix()[live])
        self._reset()
        self._add_records(records, vectors)
        if self._store is not None:
            self._store.log_clear()
