"""What the stores of record hold and the interface both implement.

:class:`RecordStore` is what the service uses; :class:`~plugins.retrieval.store.Store`
(SQLite, embedded, one process) and
:class:`~plugins.retrieval.pgstore.PostgresStore` (shared by every replica)
implement it.  Every write appends to the change log, in the same
transaction, one entry per document with a *position*: positions only grow,
and a reader that has seen position ``p`` has seen every committed change
at or below ``p`` (each store says how it guarantees that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from llm_warden.plugins.retrieval.acl import Acl
from llm_warden.proxy.errors import BadRequest

DocKind = Literal["markdown", "python", "source", "text"]
MAX_ID_CHARS = 512
ChangeOp = Literal["upsert", "delete", "acl"]


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
    """One change-log entry: what happened to which document, at which position."""

    seq: int
    tenant: str
    doc_id: str
    op: str


@dataclass(slots=True)
class ChangeBatch:
    """Changes after a position, read in one snapshot with the log's bounds.

    ``head`` is the newest committed position (0: none yet); ``pruned_upto``
    the newest position removed from the log: a reader whose position is
    below it has missed changes and must rebuild from the documents.
    ``vectors_generation`` changes when every vector was replaced (a new
    embedding model): a vector index built from another generation is rebuilt.
    ``embedding_model`` / ``embedding_dim``: what the stored vectors are.
    """

    changes: list[Change]
    head: int
    pruned_upto: int
    vectors_generation: str = ""
    embedding_model: str | None = None
    embedding_dim: int | None = None


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


def index_head(title: str, heading_path: list[str] | tuple[str, ...]) -> str:
    """The line :func:`index_text` puts before a chunk's text (empty without title and heading path)."""
    head = " > ".join([p for p in (title, *heading_path) if p])
    return f"{head}\n" if head else ""


def index_text(title: str, heading_path: list[str] | tuple[str, ...], text: str) -> str:
    """What the engines index and embed for a chunk: title and heading path give the chunk its context."""
    return index_head(title, heading_path) + text


def vector_blob(v: np.ndarray | None) -> bytes | None:
    """A vector as stored: little-endian float32 bytes."""
    return None if v is None else np.ascontiguousarray(v, dtype=np.float32).tobytes()


def blob_vector(b: bytes | None) -> np.ndarray | None:
    return None if b is None else np.frombuffer(b, dtype=np.float32)


class RecordStore(Protocol):
    """The store of record as the service uses it (SQLite or PostgreSQL)."""

    kind: str
    """``sqlite`` or ``postgres``."""

    async def open(self) -> None:
        """Connect (and create or check the schema)."""

    async def close(self) -> None: ...

    async def identity(self) -> str:
        """A random id made when the store was created: a local index built from another store is not reused."""

    # -- reads -----------------------------------------------------------

    async def get_document(self, tenant: str, doc_id: str) -> DocumentRow | None: ...

    async def get_documents(self, tenant: str, doc_ids: Iterable[str]) -> dict[str, DocumentRow]: ...

    async def list_documents(self, tenant: str, limit: int = 100, after: str = "", source_prefix: str | None = None) -> list[DocumentRow]:
        """Documents of a tenant ordered by id, ``limit`` after the id ``after`` (keyset paging)."""

    async def chunks_of(self, keys: Iterable[tuple[str, str]], with_vector: bool = True) -> dict[tuple[str, str], list[ChunkRow]]:
        """Every chunk of the given documents, ordered by ``n``."""

    async def fetch_chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, tuple[ChunkRow, DocumentRow]]:
        """The chunks with these ids *in this tenant*, each with its document (current ACL)."""

    def iter_chunks(self, batch: int = 2000, with_vector: bool = True) -> AsyncIterator[tuple[list[ChunkRow], dict[tuple[str, str], dict[str, Any]]]]:
        """Every chunk in the store in batches, each with the ACLs of its documents."""

    async def changes_after(self, seq: int, limit: int = 10_000) -> ChangeBatch:
        """Up to ``limit`` changes above ``seq`` in position order, with the log's head and pruned bound (one snapshot)."""

    async def head(self) -> int:
        """The newest committed position (0: none)."""

    async def oldest_change_after(self, seq: int) -> float | None:
        """When the oldest change above ``seq`` was written (``None``: there is none)."""

    async def counts(self, tenant: str | None = None) -> dict[str, Any]:
        """Documents, chunks, vectors, last ingest, oldest source update and tenants, from maintained counters."""

    async def counts_at_head(self) -> tuple[int, dict[str, Any]]:
        """(head, counts) read in one snapshot."""

    async def tenant_counts(self) -> dict[str, tuple[int, int]]:
        """(documents, chunks) per tenant, from the maintained counters (one row per tenant)."""

    async def distinct_acls(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` distinct ACLs of the tenant's documents."""

    async def all_doc_keys(self) -> list[tuple[str, str]]: ...

    async def embedding_models(self) -> dict[str | None, int]: ...

    async def get_meta(self, key: str) -> str | None: ...

    # -- writes ----------------------------------------------------------

    async def set_meta(self, key: str, value: str) -> None: ...

    async def write_documents(self, items: list[tuple[DocumentRow, list[ChunkRow]]]) -> int:
        """Insert or replace documents and all their chunks in one transaction; returns the last position."""

    async def update_documents_meta(self, docs: list[DocumentRow], acl_changed: list[bool]) -> int:
        """Update metadata and ACLs without touching chunks; returns the last position (0: no ACL changed)."""

    async def delete_documents(self, keys: list[tuple[str, str]]) -> tuple[int, int]:
        """Delete documents and their chunks; returns (documents deleted, last position)."""

    async def set_vectors(self, rows: list[tuple[str, np.ndarray]], model: str, docs: list[tuple[str, str]]) -> None:
        """Store re-embedded vectors (then :meth:`new_vectors_generation` once every chunk is done)."""

    async def new_vectors_generation(self) -> str:
        """Record that every vector was replaced (every replica rebuilds its vector index); returns the new generation."""

    def exclusive(self, name: str) -> AbstractAsyncContextManager[None]:
        """Held by one process of the fleet at a time (re-embedding): a no-op for the embedded store."""

    async def prune(self, applied: int, retention_s: float) -> int:
        """Drop change-log entries no reader needs; returns the new pruned bound (see each store)."""
