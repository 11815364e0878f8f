"""LexicalIndex: ACL and tenant filters inside the query, hostile text, deletion, ACL changes, persistence."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader
from llm_warden.plugins.retrieval.lexical import LexicalIndex

G = frozenset
PUBLIC = Acl(public=True)


def chunk(doc: str, text: str, acl: Acl = PUBLIC, tenant: str = "acme", n: int = 0) -> IndexedChunk:
    return IndexedChunk(f"{tenant}/{doc}#{n}", tenant, doc, text, acl)


def ids(results: list[tuple[str, float]]) -> list[str]:
    return [cid for cid, _score in results]


@pytest.fixture
def index() -> LexicalIndex:
    ix = LexicalIndex(None)
    ix.upsert(
        [
            chunk("pub", "Quarterly revenue report for the kangaroo project"),
            chunk("eng", "Kangaroo deployment runbook for engineers", Acl(allow_groups=G({"eng"}))),
            chunk("ann", "Kangaroo salary notes for ann", Acl(allow_users=G({"ann"}))),
            chunk("denied", "Kangaroo merger plans", Acl(public=True, deny_users=G({"bob"}), deny_groups=G({"contractors"}))),
            chunk("other", "Kangaroo secrets of another tenant", PUBLIC, tenant="globex"),
        ]
    )
    ix.commit()
    return ix


def test_acl_semantics_inside_the_query(index: LexicalIndex) -> None:
    assert set(ids(index.search(Reader("acme", "zed"), "kangaroo", 10))) == {"acme/pub#0", "acme/denied#0"}
    assert set(ids(index.search(Reader("acme", "zed", G({"eng"})), "kangaroo", 10))) == {"acme/pub#0", "acme/denied#0", "acme/eng#0"}
    assert set(ids(index.search(Reader("acme", "ann"), "kangaroo", 10))) == {"acme/pub#0", "acme/denied#0", "acme/ann#0"}
    assert set(ids(index.search(Reader("acme", "bob", G({"eng"})), "kangaroo", 10))) == {"acme/pub#0", "acme/eng#0"}
    assert "acme/denied#0" not in ids(index.search(Reader("acme", "ann", G({"contractors"})), "kangaroo", 10))


def test_tenant_isolation(index: LexicalIndex) -> None:
    assert ids(index.search(Reader("globex", "ann", G({"eng"})), "kangaroo", 10)) == ["globex/other#0"]
    assert index.search(Reader("initech", "ann"), "kangaroo", 10) == []
    assert "globex/other#0" not in ids(index.search(Reader("acme", "ann"), "secrets tenant", 10))


def test_filter_returns_best_k_among_readable_not_post_filtered() -> None:
    ix = LexicalIndex(None)
    hidden = [chunk(f"h{i}", "zebra zebra zebra", Acl(allow_users=G({"ann"}))) for i in range(50)]
    visible = [chunk(f"v{i}", f"zebra filler text number {i}") for i in range(5)]
    ix.upsert(hidden + visible)
    ix.commit()
    got = ix.search(Reader("acme", "bob"), "zebra", 5)
    assert sorted(ids(got)) == sorted(c.chunk_id for c in visible)
    assert all(score > 0 for _cid, score in got)


def test_scores_are_bm25_best_first(index: LexicalIndex) -> None:
    got = index.search(Reader("acme", "ann", G({"eng"})), "kangaroo runbook", 10)
    assert ids(got)[0] == "acme/eng#0"
    scores = [s for _c, s in got]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "query",
    [
        '"kangaroo',
        "kangaroo NEAR(revenue, 3)",
        "kang*",
        "*",
        "body:kangaroo",
        "tenant:globex kangaroo",
        "acl:public OR kangaroo",
        "((kangaroo",
        "kangaroo))) AND NOT",
        "-kangaroo +revenue ^2 ~ {} [] \\",
        "kängärôô 東京 🦘 \x00 \u202e",
        "kangaroo " * 20_000,
        " ".join(f"term{i}" for i in range(5000)) + " kangaroo",
    ],
)
def test_hostile_query_text_never_errors_or_injects(index: LexicalIndex, query: str) -> None:
    got = index.search(Reader("acme", "zed"), query, 10)
    assert set(ids(got)) <= {"acme/pub#0", "acme/denied#0"}


def test_hostile_text_matches_terms_not_syntax(index: LexicalIndex) -> None:
    assert ids(index.search(Reader("acme", "zed"), "tenant:globex", 10)) == []
    assert ids(index.search(Reader("acme", "zed"), '"REVENUE"?!', 10)) == ["acme/pub#0"]


@pytest.mark.parametrize("query", ["", "   ", "the and of", "?!... ---", "it is what it is"])
def test_empty_or_stopword_queries_return_nothing(index: LexicalIndex, query: str) -> None:
    assert index.search(Reader("acme", "ann"), query, 10) == []


def test_stemming_matches_inflections(index: LexicalIndex) -> None:
    assert "acme/pub#0" in ids(index.search(Reader("acme", "zed"), "reports", 10))
    assert "acme/eng#0" in ids(index.search(Reader("acme", "zed", G({"eng"})), "deploying", 10))


def test_deletion_and_replacement_are_never_served(index: LexicalIndex) -> None:
    index.delete_docs([("acme", "pub")])
    index.upsert([chunk("pub", "Rewritten wombat report", n=0), chunk("pub", "second wombat chunk", n=1)])
    index.commit()
    assert "acme/pub#0" not in ids(index.search(Reader("acme", "zed"), "kangaroo quarterly revenue", 10))
    assert set(ids(index.search(Reader("acme", "zed"), "wombat", 10))) == {"acme/pub#0", "acme/pub#1"}
    index.delete_docs([("acme", "pub"), ("acme", "missing")])
    index.commit()
    assert index.search(Reader("acme", "zed"), "wombat", 10) == []
    assert index.count() == 4


def test_changes_become_visible_on_commit(index: LexicalIndex) -> None:
    index.upsert([chunk("new", "platypus")])
    assert index.search(Reader("acme", "zed"), "platypus", 10) == []
    index.commit()
    assert ids(index.search(Reader("acme", "zed"), "platypus", 10)) == ["acme/new#0"]


def test_set_acl_is_effective_after_commit(index: LexicalIndex) -> None:
    index.set_acl("acme", "pub", Acl(allow_users=G({"ann"})))
    index.commit()
    assert "acme/pub#0" not in ids(index.search(Reader("acme", "zed"), "quarterly", 10))
    assert ids(index.search(Reader("acme", "ann"), "quarterly", 10)) == ["acme/pub#0"]
    index.set_acl("acme", "pub", Acl(public=True, deny_groups=G({"eng"})))
    index.commit()
    assert ids(index.search(Reader("acme", "zed"), "quarterly", 10)) == ["acme/pub#0"]
    assert index.search(Reader("acme", "ann", G({"eng"})), "quarterly", 10) == []
    assert index.count() == 5


def test_set_acl_covers_uncommitted_chunks_and_ignores_deleted_ones(index: LexicalIndex) -> None:
    index.upsert([chunk("eng", "Kangaroo appendix", Acl(allow_groups=G({"eng"})), n=1)])
    index.set_acl("acme", "eng", Acl(allow_users=G({"cat"})))
    index.delete_docs([("acme", "ann")])
    index.set_acl("acme", "ann", PUBLIC)
    index.commit()
    assert set(ids(index.search(Reader("acme", "cat"), "kangaroo", 10))) == {"acme/pub#0", "acme/denied#0", "acme/eng#0", "acme/eng#1"}
    assert "acme/ann#0" not in ids(index.search(Reader("acme", "zed"), "salary", 10))
    assert index.search(Reader("acme", "zed", G({"eng"})), "runbook appendix", 10) == []


def test_clear_is_atomic_at_commit(index: LexicalIndex) -> None:
    index.upsert([chunk("staged", "kangaroo staged")])
    index.clear()
    assert index.count() == 5
    index.upsert([chunk("fresh", "kangaroo fresh")])
    index.commit()
    assert index.count() == 1
    assert ids(index.search(Reader("acme", "zed"), "kangaroo", 10)) == ["acme/fresh#0"]


def test_persists_across_reopen(tmp_path: Path) -> None:
    ix = LexicalIndex(tmp_path / "lex")
    ix.upsert([chunk("a", "persistent echidna")])
    ix.commit()
    ix.upsert([chunk("b", "uncommitted echidna")])
    ix.close()
    again = LexicalIndex(tmp_path / "lex")
    assert again.count() == 1
    assert ids(again.search(Reader("acme", "zed"), "echidna", 10)) == ["acme/a#0"]
    again.set_acl("acme", "a", Acl(allow_users=G({"ann"})))
    again.commit()
    assert ids(again.search(Reader("acme", "ann"), "echidna", 10)) == ["acme/a#0"]
    again.close()


def test_k_zero_returns_nothing(index: LexicalIndex) -> None:
    assert index.search(Reader("acme", "zed"), "kangaroo", 0) == []


def test_concurrent_searches_never_see_deleted_or_replaced_text() -> None:
    """Searches running while documents are replaced only ever see a committed version."""
    ix = LexicalIndex(None)
    ix.upsert([chunk(f"d{i}", f"koala version0 doc{i}") for i in range(20)])
    ix.commit()
    stop = threading.Event()
    errors: list[str] = []

    def searcher() -> None:
        while not stop.is_set():
            got = ix.search(Reader("acme", "zed"), "koala", 50)
            if len(got) != 20:
                errors.append(f"saw {len(got)} chunks")

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 15):
            ix.delete_docs([("acme", f"d{i}") for i in range(20)])
            ix.upsert([chunk(f"d{i}", f"koala version{version} doc{i}") for i in range(20)])
            ix.commit()
            assert ix.search(Reader("acme", "zed"), f"version{version - 1}", 50) == []
            assert len(ix.search(Reader("acme", "zed"), f"version{version}", 50)) == 20
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


def test_huge_k_is_bounded_by_the_corpus(index: LexicalIndex) -> None:
    assert len(index.search(Reader("acme", "zed"), "kangaroo", 10**12)) == 2
