"""BM25 lexical search on tantivy, with tenant and ACL enforced inside the query.

Every chunk is one tantivy document:

- ``body``: the chunk text with acronym plurals folded (:func:`~plugins.retrieval.tokenize.fold_acronym_plurals`),
  ``en_stem`` analyzer, term frequencies (no positions); stored,
  so :meth:`LexicalIndex.set_acl` can re-add a document's chunks without the pipeline.
- ``tenant``, ``doc_id``, ``doc_key`` (``tenant`` + U+001F + ``doc_id``), ``chunk_id``: raw
  (untokenized) terms. ``doc_key`` is what deletions address.
- ``acl``: raw terms from :func:`~plugins.retrieval.acl.acl_tokens` (``public``, ``user:U``,
  ``group:G``, ``deny_user:U``, ``deny_group:G``).

A search is one boolean query built with tantivy's Query API (user text is only
tokenized, never parsed as query syntax)::

    Must( Should(body:t1, body:t2, ...) )            -- BM25 scored, k1=1.2 b=0.75
    Must( tenant:T )                                 -- score 0
    Must( acl in {public, user:S, group:G...} )      -- score 0
    MustNot( acl in {deny_user:S, deny_group:G...} )

so the result is the best ``k`` among the chunks the reader may read. Mutations are
staged in the writer and become visible, all together, when :meth:`commit` returns.
"""

from __future__ import annotations

import threading
from pathlib import Path

import tantivy

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader, acl_tokens, reader_allow_tokens, reader_deny_tokens
from llm_warden.plugins.retrieval.tokenize import INDEX_TOKENIZER, MAX_QUERY_TERMS, fold_acronym_plurals, query_terms

_KEY_SEP = "\x1f"


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("chunk_id", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("tenant", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("doc_id", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("doc_key", stored=False, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("acl", stored=False, tokenizer_name="raw", index_option="basic")
    sb.add_text_field("body", stored=True, tokenizer_name=INDEX_TOKENIZER, index_option="freq")
    return sb.build()


def doc_key(tenant: str, doc_id: str) -> str:
    """The raw term that addresses every chunk of document ``(tenant, doc_id)``."""
    return f"{tenant}{_KEY_SEP}{doc_id}"


def _stored(doc: tantivy.Document, field: str) -> str:
    """A stored text field every indexed chunk has (``chunk_id``, ``body``)."""
    value = doc.get_first(field)
    if not isinstance(value, str):
        raise RuntimeError(f"a lexical index document has no {field}; run `warden index rebuild`")
    return value


class LexicalIndex:
    """A tantivy BM25 index of chunks; one writer and any number of concurrent searches.

    ``path=None`` keeps the index in RAM (tests); otherwise it lives in that directory
    (created if missing) and survives restarts. ``writer_threads`` and
    ``writer_heap_bytes`` size tantivy's indexing writer (one thread leaves the other
    cores to searches).
    """

    def __init__(self, path: Path | None, *, writer_threads: int = 1, writer_heap_bytes: int = 64_000_000) -> None:
        self._schema = _schema()
        if path is None:
            self._index = tantivy.Index(self._schema)
        else:
            path.mkdir(parents=True, exist_ok=True)
            try:
                self._index = tantivy.Index(self._schema, path=str(path), reuse=True)
            except ValueError as exc:
                raise RuntimeError(f"lexical index at {path} cannot be opened ({exc}); run `warden index rebuild`") from exc
        self._index.config_reader(reload_policy="Manual")
        self._writer = self._index.writer(heap_size=writer_heap_bytes, num_threads=writer_threads)
        self._lock = threading.Lock()
        # Chunks added since the last commit, by document key, and documents deleted
        # since it: what set_acl needs beyond the committed (searchable) state.
        self._pending: dict[tuple[str, str], list[IndexedChunk]] = {}
        self._deleted: set[tuple[str, str]] = set()
        self._cleared = False

    # -- writes ---------------------------------------------------------------

    def upsert(self, chunks: list[IndexedChunk]) -> None:
        """Stage ``chunks`` for indexing (visible after :meth:`commit`).

        Adding does not replace: the pipeline calls :meth:`delete_docs` first when a
        document's chunks change.
        """
        with self._lock:
            for chunk in chunks:
                self._writer.add_document(self._document(chunk))
                self._pending.setdefault((chunk.tenant, chunk.doc_id), []).append(chunk)

    def delete_docs(self, keys: list[tuple[str, str]]) -> None:
        """Stage the deletion of every chunk of each ``(tenant, doc_id)`` (visible after commit)."""
        with self._lock:
            for tenant, doc_id in keys:
                self._writer.delete_documents_by_term("doc_key", doc_key(tenant, doc_id))
                self._pending.pop((tenant, doc_id), None)
                self._deleted.add((tenant, doc_id))

    def set_acl(self, tenant: str, doc_id: str, acl: Acl) -> None:
        """Give every chunk of a document a new ACL (visible after commit); no re-embedding.

        The chunks are re-added from the index's stored fields (plus chunks staged
        since the last commit), so the pipeline does not have to supply them.
        """
        with self._lock:
            key = (tenant, doc_id)
            chunks = [] if key in self._deleted or self._cleared else self._committed_chunks(tenant, doc_id)
            chunks += self._pending.pop(key, [])
            self._writer.delete_documents_by_term("doc_key", doc_key(tenant, doc_id))
            self._deleted.add(key)
            for chunk in chunks:
                chunk = IndexedChunk(chunk.chunk_id, tenant, doc_id, chunk.text, acl, chunk.vector)
                self._writer.add_document(self._document(chunk))
                self._pending.setdefault(key, []).append(chunk)

    def clear(self) -> None:
        """Stage the removal of every chunk (for a rebuild); searches see the old index until commit."""
        with self._lock:
            # delete_all_documents only drops committed segments: discard staged adds first.
            self._writer.rollback()
            self._writer.delete_all_documents()
            self._pending.clear()
            self._deleted.clear()
            self._cleared = True

    def commit(self) -> None:
        """Make every staged change durable and visible to searches when this returns."""
        with self._lock:
            self._writer.commit()
            self._index.reload()
            self._pending.clear()
            self._deleted.clear()
            self._cleared = False

    def close(self) -> None:
        """Discard uncommitted changes and wait for background merges to finish."""
        with self._lock:
            self._writer.rollback()
            self._writer.wait_merging_threads()

    # -- reads ----------------------------------------------------------------

    def search(self, reader: Reader, query: str, k: int) -> list[tuple[str, float]]:
        """The best ``k`` chunks the reader may read for ``query``: ``(chunk_id, bm25)``, best first.

        Any string is accepted; text with no searchable term (empty, stopwords only,
        punctuation) returns ``[]``.
        """
        if k <= 0:
            return []
        terms = query_terms(query)
        if not terms:
            return []
        searcher = self._index.searcher()
        if len(terms) > MAX_QUERY_TERMS:
            terms = sorted(terms, key=lambda t: searcher.doc_freq("body", t))[:MAX_QUERY_TERMS]
        q = self._query(reader, terms)
        limit = min(k, int(searcher.num_docs))  # tantivy sizes its top-k heap by the limit
        if limit <= 0:
            return []
        hits = searcher.search(q, limit=limit, count=False).hits
        return [(_stored(searcher.doc(addr), "chunk_id"), float(score)) for score, addr in hits]

    def count(self) -> int:
        """The number of committed (searchable) chunks."""
        return int(self._index.searcher().num_docs)

    # -- internals ------------------------------------------------------------

    def _query(self, reader: Reader, terms: list[str]) -> tantivy.Query:
        schema = self._schema
        text = tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "body", t, index_option="freq")) for t in terms]
        )
        tenant = tantivy.Query.const_score_query(tantivy.Query.term_query(schema, "tenant", reader.tenant, index_option="basic"), 0.0)
        allowed = tantivy.Query.const_score_query(tantivy.Query.term_set_query(schema, "acl", reader_allow_tokens(reader)), 0.0)
        denied = tantivy.Query.term_set_query(schema, "acl", reader_deny_tokens(reader))
        return tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Must, text),
                (tantivy.Occur.Must, tenant),
                (tantivy.Occur.Must, allowed),
                (tantivy.Occur.MustNot, denied),
            ]
        )

    def _document(self, chunk: IndexedChunk) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_text("chunk_id", chunk.chunk_id)
        doc.add_text("tenant", chunk.tenant)
        doc.add_text("doc_id", chunk.doc_id)
        doc.add_text("doc_key", doc_key(chunk.tenant, chunk.doc_id))
        for token in acl_tokens(chunk.acl):
            doc.add_text("acl", token)
        doc.add_text("body", fold_acronym_plurals(chunk.text))
        return doc

    def _committed_chunks(self, tenant: str, doc_id: str) -> list[IndexedChunk]:
        searcher = self._index.searcher()
        q = tantivy.Query.term_query(self._schema, "doc_key", doc_key(tenant, doc_id), index_option="basic")
        n = searcher.search(q, limit=1, count=True).count or 0  # type: ignore[attr-defined]  # in tantivy, missing from its stubs
        if n == 0:
            return []
        out = []
        for _score, addr in searcher.search(q, limit=n, count=False).hits:
            d = searcher.doc(addr)
            out.append(IndexedChunk(_stored(d, "chunk_id"), tenant, doc_id, _stored(d, "body"), Acl()))
        return out
