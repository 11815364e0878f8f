"""VectorIndex: the top-k is the exact top-k among readable chunks; deletion, ACL changes, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader
from llm_warden.plugins.retrieval.vector import VectorIndex

G = frozenset
DIM = 16
USERS = ["ann", "bob", "cat"]
GROUPS = ["eng", "ops", "sales"]
TENANTS = ["acme", "globex"]


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(chunks: list[IndexedChunk], reader: Reader, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    readable = [c for c in chunks if c.tenant == reader.tenant and c.acl.allows(reader.subject, reader.groups)]
    scored = sorted(((c.chunk_id, float(np.dot(c.vector, q))) for c in readable), key=lambda p: -p[1])
    return scored[:k]


def assert_same_top_k(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert len(got) == len(want)
    assert [s for _c, s in got] == pytest.approx([s for _c, s in want], abs=1e-5)
    # Ids agree except where scores tie at the boundary.
    boundary = want[-1][1] if want else 0.0
    assert {c for c, s in got if s > boundary + 1e-5} == {c for c, s in want if s > boundary + 1e-5}


acls = st.builds(
    Acl,
    public=st.booleans(),
    allow_users=st.frozensets(st.sampled_from(USERS), max_size=2),
    allow_groups=st.frozensets(st.sampled_from(GROUPS), max_size=2),
    deny_users=st.frozensets(st.sampled_from(USERS), max_size=1),
    deny_groups=st.frozensets(st.sampled_from(GROUPS), max_size=1),
)
readers = st.builds(Reader, tenant=st.sampled_from(TENANTS), subject=st.sampled_from(USERS), groups=st.frozensets(st.sampled_from(GROUPS), max_size=2))


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.tuples(st.sampled_from(TENANTS), acls, st.integers(1, 4)), min_size=1, max_size=25),
    reader_list=st.lists(readers, min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 12),
    broad=st.booleans(),
    deletions=st.sets(st.integers(0, 24), max_size=5),
)
def test_top_k_equals_exact_top_k_over_readable(docs, reader_list, seed, k, broad, deletions) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    # broad=True forces the HNSW path (with its exact fallback) even on tiny corpora.
    ix = VectorIndex(None, DIM, exact_max=0 if broad else 20_000, graph_min_fraction=0.0 if broad else 0.05, ef_search=256)
    chunks: list[IndexedChunk] = []
    for d, (tenant, acl, n) in enumerate(docs):
        vecs = unit(rng, n)
        chunks += [IndexedChunk(f"{tenant}/d{d}#{j}", tenant, f"d{d}", "", acl, vecs[j]) for j in range(n)]
    ix.upsert(chunks)
    gone = {(docs[d][0], f"d{d}") for d in deletions if d < len(docs)}
    ix.delete_docs(sorted(gone))
    live = [c for c in chunks if (c.tenant, c.doc_id) not in gone]
    assert ix.count() == len(live)
    for reader in reader_list:
        q = unit(rng, 1)[0]
        assert_same_top_k(ix.search(reader, q, k), exact(live, reader, q, k))


def make(rng: np.random.Generator, tenant: str, doc: str, acl: Acl, n: int = 1) -> list[IndexedChunk]:
    vecs = unit(rng, n)
    return [IndexedChunk(f"{tenant}/{doc}#{j}", tenant, doc, "", acl, vecs[j]) for j in range(n)]


def test_deny_public_groups_users_and_tenants() -> None:
    rng = np.random.default_rng(0)
    ix = VectorIndex(None, DIM)
    ix.upsert(make(rng, "acme", "pub", Acl(public=True)))
    ix.upsert(make(rng, "acme", "eng", Acl(allow_groups=G({"eng"}))))
    ix.upsert(make(rng, "acme", "ann", Acl(allow_users=G({"ann"}))))
    ix.upsert(make(rng, "acme", "nobob", Acl(public=True, deny_users=G({"bob"}), deny_groups=G({"ext"}))))
    ix.upsert(make(rng, "globex", "pub", Acl(public=True)))
    q = unit(rng, 1)[0]

    def seen(r: Reader) -> set[str]:
        return {c for c, _s in ix.search(r, q, 10)}

    assert seen(Reader("acme", "zed")) == {"acme/pub#0", "acme/nobob#0"}
    assert seen(Reader("acme", "zed", G({"eng"}))) == {"acme/pub#0", "acme/nobob#0", "acme/eng#0"}
    assert seen(Reader("acme", "ann")) == {"acme/pub#0", "acme/nobob#0", "acme/ann#0"}
    assert seen(Reader("acme", "bob", G({"eng"}))) == {"acme/pub#0", "acme/eng#0"}
    assert seen(Reader("acme", "ann", G({"ext"}))) == {"acme/pub#0", "acme/ann#0"}
    assert seen(Reader("globex", "ann", G({"eng"}))) == {"globex/pub#0"}
    assert seen(Reader("initech", "ann")) == set()


def test_deleted_and_replaced_never_served_on_both_paths() -> None:
    rng = np.random.default_rng(1)
    for exact_max in (0, 20_000):
        ix = VectorIndex(None, DIM, exact_max=exact_max, graph_min_fraction=0.0)
        old = make(rng, "acme", "doc", Acl(public=True), 3)
        ix.upsert(old + make(rng, "acme", "other", Acl(public=True), 40))
        ix.delete_docs([("acme", "doc")])
        new = make(rng, "acme", "doc", Acl(public=True), 2)
        ix.upsert(new)
        for c in old:
            got = ix.search(Reader("acme", "zed"), c.vector, 50)
            assert len(got) == 42
            assert ix.search(Reader("acme", "zed"), c.vector, 1)[0][1] < 0.9999
        assert ix.search(Reader("acme", "zed"), new[0].vector, 1)[0] == ("acme/doc#0", pytest.approx(1.0, abs=1e-5))


def test_set_acl_is_effective_immediately() -> None:
    rng = np.random.default_rng(2)
    ix = VectorIndex(None, DIM)
    doc = make(rng, "acme", "doc", Acl(public=True), 2)
    ix.upsert(doc)
    ix.set_acl("acme", "doc", Acl(allow_groups=G({"eng"})))
    assert ix.search(Reader("acme", "zed"), doc[0].vector, 5) == []
    assert len(ix.search(Reader("acme", "zed", G({"eng"})), doc[0].vector, 5)) == 2
    ix.set_acl("acme", "missing", Acl(public=True))
    assert ix.count() == 2


def test_rejects_bad_vectors() -> None:
    ix = VectorIndex(None, DIM)
    with pytest.raises(ValueError):
        ix.upsert([IndexedChunk("a", "t", "d", "", Acl(public=True), None)])
    with pytest.raises(ValueError):
        ix.upsert([IndexedChunk("a", "t", "d", "", Acl(public=True), np.ones(DIM + 1, np.float32))])
    with pytest.raises(ValueError):
        ix.upsert([IndexedChunk("a", "t", "d", "", Acl(public=True), np.full(DIM, np.nan, np.float32))])
    with pytest.raises(ValueError):
        ix.search(Reader("t", "u"), np.ones(3, np.float32), 5)
    assert ix.search(Reader("t", "u"), np.full(DIM, np.inf, np.float32), 5) == []
    ix.upsert([IndexedChunk("a", "t", "d", "", Acl(public=True), np.ones(DIM, np.float32) / 4)])
    assert len(ix.search(Reader("t", "u"), np.ones(DIM, np.float32) / 4, 10**12)) == 1
    ix.delete_docs([("t", "d")])
    assert ix.count() == 0


def test_persistence_round_trip_and_torn_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "vec"
    ix = VectorIndex(path, DIM)
    ix.upsert(make(rng, "acme", "a", Acl(public=True), 3))
    ix.upsert(make(rng, "acme", "b", Acl(allow_users=G({"ann"})), 2))
    ix.commit()
    ix.delete_docs([("acme", "a")])
    ix.set_acl("acme", "b", Acl(public=True))
    ix.upsert(make(rng, "acme", "c", Acl(public=True), 1))
    ix.commit()
    q = unit(rng, 1)[0]
    want = ix.search(Reader("acme", "zed"), q, 10)
    assert {c for c, _ in want} == {"acme/b#0", "acme/b#1", "acme/c#0"}
    ix.upsert(make(rng, "acme", "uncommitted", Acl(public=True), 1))  # lost: never committed

    again = VectorIndex(path, DIM)
    assert again.count() == 3
    assert again.search(Reader("acme", "zed"), q, 10) == want
    # A commit interrupted mid-write leaves a torn tail: it is cut off at load.
    gen = path / (path / "CURRENT").read_text().strip()
    with open(gen / "journal.jsonl", "ab") as fh:
        fh.write(b'{"op":"del","t":"acme","d":"b"}\n{"op":"comm')
    with open(gen / "vectors.f32", "ab") as fh:
        fh.write(b"\x00" * 10)
    third = VectorIndex(path, DIM)
    assert third.search(Reader("acme", "zed"), q, 10) == want
    third.upsert(make(rng, "acme", "d", Acl(public=True), 1))
    third.commit()
    assert VectorIndex(path, DIM).count() == 4
    with pytest.raises(RuntimeError):
        VectorIndex(path, DIM * 2)


def test_clear_compaction_and_graph_snapshot(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / "vec"
    ix = VectorIndex(path, DIM, exact_max=0, graph_min_fraction=0.0)
    ix._store.graph_snapshot_min = 10  # type: ignore[union-attr]
    for d in range(30):
        ix.upsert(make(rng, "acme", f"d{d}", Acl(public=True), 2))
    ix.commit()
    assert list(((path / (path / "CURRENT").read_text().strip())).glob("graph-*.faiss"))
    ix.delete_docs([("acme", f"d{d}") for d in range(20)])  # 2/3 tombstones -> compaction at commit
    ix.commit()
    assert ix.count() == 20
    q = unit(rng, 1)[0]
    want = ix.search(Reader("acme", "zed"), q, 5)
    again = VectorIndex(path, DIM, exact_max=0, graph_min_fraction=0.0)
    assert again.count() == 20 and again.search(Reader("acme", "zed"), q, 5) == want
    again.clear()
    again.upsert(make(rng, "acme", "z", Acl(public=True), 1))
    again.commit()
    assert VectorIndex(path, DIM).count() == 1
    assert len(list(path.glob("gen-*"))) == 1


def test_concurrent_searches_never_see_deleted_versions() -> None:
    """While documents are replaced, no search started after a deletion returned sees the old version."""
    import threading

    rng = np.random.default_rng(5)
    ix = VectorIndex(None, DIM, exact_max=0, graph_min_fraction=0.0, add_slice=7)
    base = unit(rng, 30)

    def version(v: int) -> list[IndexedChunk]:
        return [IndexedChunk(f"acme/d{i}#v{v}", "acme", f"d{i}", "", Acl(public=True), base[i]) for i in range(30)]

    ix.upsert(version(0))
    deleted_upto = -1
    stop = threading.Event()
    errors: list[str] = []

    def searcher() -> None:
        while not stop.is_set():
            floor = deleted_upto
            for cid, _s in ix.search(Reader("acme", "zed"), base[0], 30):
                if int(cid.rsplit("#v", 1)[1]) <= floor:
                    errors.append(cid)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for v in range(1, 20):
            ix.delete_docs([("acme", f"d{i}") for i in range(30)])
            deleted_upto = v - 1
            ix.upsert(version(v))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert {c for c, _ in ix.search(Reader("acme", "zed"), base[0], 50)} == {c.chunk_id for c in version(19)}


def test_both_exact_scans_and_the_graph_agree_with_numpy_on_a_larger_corpus() -> None:
    """Gathered scan (small share), bitmap scan (large share) and graph path are all exact here."""
    rng = np.random.default_rng(6)
    n = 6000
    vecs = unit(rng, n)
    acl_of = [Acl(allow_groups=G({"all"} | ({"few"} if i % 100 == 0 else set()))) for i in range(n)]
    chunks = [IndexedChunk(f"acme/d{i}#0", "acme", f"d{i}", "", acl_of[i], vecs[i]) for i in range(n)]
    exact_ix = VectorIndex(None, DIM, exact_max=10**9, add_slice=4096)
    graph_ix = VectorIndex(None, DIM, exact_max=0, graph_min_fraction=0.0, add_slice=4096)
    exact_ix.upsert(chunks)
    graph_ix.upsert(chunks)
    for group in ("all", "few"):  # 6000 ids -> bitmap scan; 60 ids -> gathered scan
        reader = Reader("acme", "zed", G({group}))
        for q in unit(rng, 5):
            want = exact(chunks, reader, q, 10)
            assert_same_top_k(exact_ix.search(reader, q, 10), want)
            assert_same_top_k(graph_ix.search(reader, q, 10), want)
