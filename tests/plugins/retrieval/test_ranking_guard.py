"""Ranking guard: the lexical engine ranks exactly like a plain BM25 computed here.

If an engine, analyzer or query-construction change ever altered relevance, these
tests fail. The reference uses tantivy's published BM25 (k1=1.2, b=0.75,
idf = ln(1 + (N - df + 0.5) / (df + 0.5)), statistics over the whole index, not the
reader's slice) over the terms of :mod:`plugins.retrieval.tokenize`. Chunks stay
under 40 tokens, where tantivy stores document lengths exactly.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader
from llm_warden.plugins.retrieval.lexical import LexicalIndex
from llm_warden.plugins.retrieval.tokenize import index_terms, query_terms
from llm_warden.plugins.retrieval.vector import VectorIndex

K1, B = 1.2, 0.75
G = frozenset
WORDS = (
    "alpha beta gamma delta running runner runs connection connected connect policy policies tenant audit audits "
    "the of and to in is it database databases vector vectors search searching searched index indexes quick brown "
    "fox jumps lazy dog cafe naive zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon"
).split()
GROUPS = ["eng", "ops"]


def corpus(seed: int, n: int = 300) -> list[IndexedChunk]:
    rnd = random.Random(seed)
    weights = [1 / (r + 1) for r in range(len(WORDS))]  # Zipf-like
    chunks = []
    for d in range(n):
        text = " ".join(rnd.choices(WORDS, weights, k=rnd.randint(3, 35)))
        acl = Acl(
            public=rnd.random() < 0.5,
            allow_groups=G(rnd.sample(GROUPS, rnd.randint(0, 1))),
            deny_users=G(["bob"]) if rnd.random() < 0.1 else G(),
        )
        tenant = "acme" if rnd.random() < 0.8 else "globex"
        chunks.append(IndexedChunk(f"{tenant}/d{d}#0", tenant, f"d{d}", text.title() if d % 7 == 0 else text, acl))
    return chunks


def reference_bm25(
    chunks: list[IndexedChunk], reader: Reader, query: str, k: int, stats_over: list[IndexedChunk] | None = None
) -> list[tuple[str, float]]:
    """Plain BM25 over ``chunks``; corpus statistics over ``stats_over`` (default: ``chunks``)."""
    stats_docs = [Counter(index_terms(c.text)) for c in (stats_over if stats_over is not None else chunks)]
    n = len(stats_docs)
    avgdl = sum(sum(d.values()) for d in stats_docs) / n
    terms = query_terms(query)
    df = {t: sum(1 for d in stats_docs if t in d) for t in terms}
    docs = [Counter(index_terms(c.text)) for c in chunks]
    lengths = [sum(d.values()) for d in docs]
    scored = []
    for c, d, dl in zip(chunks, docs, lengths, strict=True):
        if c.tenant != reader.tenant or not c.acl.allows(reader.subject, reader.groups):
            continue
        score = 0.0
        for t in terms:
            tf = d.get(t, 0)
            if tf:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * (1 + K1) * tf / (tf + K1 * (1 - B + B * dl / avgdl))
        if score > 0:
            scored.append((c.chunk_id, score))
    scored.sort(key=lambda p: -p[1])
    return scored[:k]


def levels(pairs: list[tuple[str, float]]) -> list[set[str]]:
    """Ids grouped by equal score, best first (ties may come back in any order)."""
    out: list[set[str]] = []
    last = None
    for cid, s in pairs:
        if last is None or abs(s - last) > 1e-4 * max(abs(s), 1):
            out.append(set())
        out[-1].add(cid)
        last = s
    return out


def assert_same_order(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    """Same ids in the same order, up to the order within a tie; a tie cut by k may differ in members."""
    assert len(got) == len(want)
    got_levels, want_levels = levels(got), levels(want)
    assert got_levels[:-1] == want_levels[:-1]
    if got_levels:
        assert len(got_levels[-1]) == len(want_levels[-1])


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [s for _c, s in got] == pytest.approx([s for _c, s in want], rel=1e-4)
    assert_same_order(got, want)


READERS = [Reader("acme", "ann"), Reader("acme", "bob", G({"eng"})), Reader("acme", "cat", G({"eng", "ops"})), Reader("globex", "ann", G({"ops"}))]
QUERIES = [
    "alpha",
    "running connections of the database",
    "The quick brown fox jumps over the lazy dog",
    "vector search indexes policies audit tenant",
    "zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon",
    "CAFE naïve Searching",
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lexical_top10_equals_reference_bm25(seed: int) -> None:
    chunks = corpus(seed)
    ix = LexicalIndex(None)
    ix.upsert(chunks)
    ix.commit()
    for reader in READERS:
        for query in QUERIES:
            assert_same_ranking(ix.search(reader, query, 10), reference_bm25(chunks, reader, query, 10))


def test_query_terms_are_the_index_terms() -> None:
    """The query analyzer is the index analyzer minus stopwords (else query terms would miss)."""
    text = "The Runners were RUNNING quickly through connected Databases; naïve cafés, 東京 and x" + "y" * 45
    assert [t for t in index_terms(text) if t in set(query_terms(text))] == query_terms(text)
    assert "the" not in query_terms(text) and "the" in index_terms(text)
    assert not any(len(t) >= 40 for t in index_terms(text))


def test_rebuilt_indexes_return_what_the_incremental_ones_return() -> None:
    """An index maintained through adds, replacements, deletions and ACL changes serves what a rebuild serves.

    Both return exactly the same readable chunks. Ranking: tantivy (like Lucene) keeps
    deleted chunks in its BM25 statistics until their segment is merged, so each index
    must rank exactly as BM25 over its own statistics: the rebuild over the live chunks,
    the incremental index over every chunk version ever added (five commits make five
    segments, below the merge policy's eight, so nothing is merged during the test).
    """
    rnd = random.Random(7)
    rng = np.random.default_rng(7)
    chunks = corpus(11, n=200)
    vectors = {c.chunk_id: v for c, v in zip(chunks, rng.standard_normal((len(chunks), 8)).astype(np.float32), strict=True)}
    for c in chunks:
        c.vector = vectors[c.chunk_id] / np.linalg.norm(vectors[c.chunk_id])
    lex, vec = LexicalIndex(None), VectorIndex(None, 8)
    state: dict[tuple[str, str], IndexedChunk] = {}
    ever: list[IndexedChunk] = []
    for start in range(0, 200, 40):  # five ingest batches, each committed
        batch = chunks[start : start + 40]
        lex.upsert(batch)
        vec.upsert(batch)
        ever += batch
        state.update({(c.tenant, c.doc_id): c for c in batch})
        keys = rnd.sample(sorted(state), 6)
        lex.delete_docs(keys[:3])
        vec.delete_docs(keys[:3])
        for key in keys[:3]:
            del state[key]
        for key in keys[3:5]:  # replacement: delete then add new text
            old = state[key]
            new = IndexedChunk(old.chunk_id, old.tenant, old.doc_id, " ".join(rnd.choices(WORDS, k=12)), old.acl, old.vector)
            lex.delete_docs([key])
            vec.delete_docs([key])
            lex.upsert([new])
            vec.upsert([new])
            ever.append(new)
            state[key] = new
        key = keys[5]
        acl = Acl(allow_groups=G({"ops"}))
        lex.set_acl(*key, acl)
        vec.set_acl(*key, acl)
        old = state[key]
        state[key] = IndexedChunk(old.chunk_id, old.tenant, old.doc_id, old.text, acl, old.vector)
        ever.append(state[key])
        lex.commit()
        vec.commit()
    rebuilt_lex, rebuilt_vec = LexicalIndex(None), VectorIndex(None, 8)
    rebuilt_lex.clear()
    rebuilt_vec.clear()
    final = list(state.values())
    rebuilt_lex.upsert(final)
    rebuilt_vec.upsert(final)
    rebuilt_lex.commit()
    rebuilt_vec.commit()
    assert lex.count() == rebuilt_lex.count() == len(final)
    assert vec.count() == rebuilt_vec.count() == len(final)
    for reader in READERS:
        for query in QUERIES:
            incremental, rebuilt = lex.search(reader, query, 1000), rebuilt_lex.search(reader, query, 1000)
            assert {c for c, _ in incremental} == {c for c, _ in rebuilt}
            assert_same_ranking(rebuilt[:10], reference_bm25(final, reader, query, 10))
            assert_same_ranking(incremental[:10], reference_bm25(final, reader, query, 10, stats_over=ever))
        q = rng.standard_normal(8).astype(np.float32)
        assert vec.search(reader, q, 10) == rebuilt_vec.search(reader, q, 10)
