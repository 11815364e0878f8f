"""RetrievalService: ACL-exact top-k (property test), isolation, freshness, repair, rebuild, re-embed."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.embed import EmbeddingError, normalize
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.retrieval.conftest import ServiceFactory
from tests.plugins.retrieval.test_ranking_guard import reference_bm25

PUBLIC = Acl(public=True)
VOCAB = ["vacation", "salary", "policy", "laptop", "travel", "expense", "budget", "holiday", "security", "badge", "parking", "onboarding"]
USERS = ["u1", "u2", "u3"]
GROUPS = ["g1", "g2", "g3"]


class HashEmbedder:
    """The fake provider's deterministic bag-of-words embedding, in process (for many hypothesis examples)."""

    def __init__(self, dim: int = 16) -> None:
        self.model = "hash-embed"
        self.dim: int | None = dim
        self._fp = FakeProvider(embedding_dim=dim)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return normalize(np.asarray([self._fp.embed(t) if t.split() else [1.0] * (self.dim or 1) for t in texts], dtype=np.float32))

    async def close(self) -> None:
        return None


names = st.frozensets(st.sampled_from(USERS), max_size=2)
gnames = st.frozensets(st.sampled_from(GROUPS), max_size=2)
acls = st.builds(Acl, public=st.booleans(), allow_users=names, allow_groups=gnames, deny_users=st.frozensets(st.sampled_from(USERS), max_size=1),
                 deny_groups=st.frozensets(st.sampled_from(GROUPS), max_size=1))
docs = st.lists(
    st.tuples(st.sampled_from(["t1", "t2"]), st.lists(st.sampled_from(VOCAB), min_size=2, max_size=8), acls),
    min_size=1, max_size=14,
)
readers = st.builds(Reader, tenant=st.sampled_from(["t1", "t2"]), subject=st.sampled_from(USERS), groups=gnames)
queries = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=3).map(" ".join)


def _same_levels(got: list[tuple[str, float]], want: list[tuple[str, float]], ref: dict[str, float]) -> None:
    """Injected == exact top-k, allowing any order among equal scores at the cut."""
    assert len(got) == len(want)
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-3, abs=1e-4)
    if want:
        cut = want[-1][1]
        for cid, _ in got:
            assert ref[cid] >= cut - max(1e-4, 1e-3 * abs(cut))


async def _scenario(mode: str, data: list[tuple[str, list[str], Acl]], reader: Reader, query: str, top_k: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = RetrievalConfig(mode=mode, embedder="upstream" if mode != "bm25" else "none", top_k=top_k, candidate_k=50, max_context_tokens=100_000)
        svc = RetrievalService(cfg, tmp / "p.db", None, HashEmbedder() if mode != "bm25" else None)
        await svc.start()
        try:
            await svc.upsert_many([DocumentInput(t, f"d{i}", " ".join(words), acl) for i, (t, words, acl) in enumerate(data)])
            result = await svc.search(reader, query)
            readable = {f"{t}/d{i}" for i, (t, _, acl) in enumerate(data) if t == reader.tenant and acl.allows(reader.subject, reader.groups)}
            for h in result.hits:
                assert f"{reader.tenant}/{h.doc_id}" in readable, "an unreadable chunk was injected"
            stored = [c async for rows, _ in svc.store.iter_chunks() for c in rows]
            indexed = []
            from llm_warden.plugins.retrieval.acl import IndexedChunk

            acl_of = {(t, f"d{i}"): acl for i, (t, _, acl) in enumerate(data)}
            for c in stored:
                indexed.append(IndexedChunk(c.chunk_id, c.tenant, c.doc_id, c.index_text, acl_of[(c.tenant, c.doc_id)], c.vector))
            if mode == "bm25":
                want = reference_bm25(indexed, reader, query, top_k)
                ref = dict(reference_bm25(indexed, reader, query, 10_000))
                got = [(h.chunk_id, h.scores["bm25"]) for h in result.hits]
                _same_levels(got, want, ref)
            elif mode == "vector":
                q = (await svc.embedder.embed([query]))[0]  # type: ignore[union-attr]
                ref = {c.chunk_id: float(np.dot(c.vector, q)) for c in indexed
                       if c.tenant == reader.tenant and c.acl.allows(reader.subject, reader.groups)}
                want = sorted(ref.items(), key=lambda kv: -kv[1])[:top_k]
                got = [(h.chunk_id, h.scores["vector"]) for h in result.hits]
                _same_levels(got, want, ref)
        finally:
            await svc.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=docs, reader=readers, query=queries, top_k=st.integers(1, 5))
def test_injected_is_exact_topk_over_readable_chunks(mode: str, data: list[tuple[str, list[str], Acl]], reader: Reader, query: str, top_k: int) -> None:
    asyncio.run(_scenario(mode, data, reader, query, top_k))


async def test_tenant_isolation(service_factory: ServiceFactory) -> None:
    svc = await service_factory()
    await svc.upsert(DocumentInput("acme", "plan", "The acme merger plan is secret.", PUBLIC))
    await svc.upsert(DocumentInput("globex", "plan", "The globex merger plan is public.", PUBLIC))
    res = await svc.search(Reader("acme", "alice", frozenset()), "merger plan")
    assert [h.text for h in res.hits] == ["The acme merger plan is secret."]
    other = await svc.search(Reader("globex", "alice", frozenset()), "merger plan acme secret", debug=True)
    assert all("acme" not in h.text for h in other.hits) and all(h.doc_id == "plan" for h in other.hits)
    assert await svc.store.fetch_chunks("globex", [res.hits[0].chunk_id]) == {}
    assert (await svc.store.get_document("globex", "plan")).content_hash != (await svc.store.get_document("acme", "plan")).content_hash  # type: ignore[union-attr]


async def test_replace_and_delete_never_serve_stale_text_under_concurrent_search(service_factory: ServiceFactory) -> None:
    svc = await service_factory(mode="bm25", embedder=False)
    reader = Reader("acme", "alice", frozenset())
    committed = -1
    stop = False
    seen: list[tuple[int, int]] = []

    async def searcher() -> None:
        while not stop:
            floor = committed
            res = await svc.search(reader, "release version notes")
            for h in res.hits:
                seen.append((floor, int(h.text.split()[-1])))
            await asyncio.sleep(0)

    task = asyncio.create_task(searcher())
    for v in range(25):
        await svc.upsert(DocumentInput("acme", "notes", f"release notes version {v}", PUBLIC))
        committed = v
        res = await svc.search(reader, "release version notes")
        assert [h.text for h in res.hits] == [f"release notes version {v}"]
    assert await svc.delete("acme", "notes")
    committed = 10**6
    assert (await svc.search(reader, "release version notes")).hits == []
    stop = True
    await task
    assert seen, "the concurrent searcher never ran"
    assert all(version >= floor for floor, version in seen if floor < 10**6), "a search served text older than the last committed version"
    assert (await svc.status())["engines"]["lexical"]["count"] == 0


async def test_acl_change_applies_without_reembedding(service_factory: ServiceFactory, embed_provider: FakeProvider) -> None:
    svc = await service_factory()
    bob = Reader("acme", "bob", frozenset({"eng"}))
    r1 = await svc.upsert(DocumentInput("acme", "runbook", "# Deploy\n\nRun the deploy script on Fridays.", Acl(allow_groups=frozenset({"ops"})), uri="runbook.md"))
    assert r1.status == "added"
    assert (await svc.search(bob, "deploy script")).hits == []
    calls = len([r for r in embed_provider.requests if r.path.endswith("/embeddings")])
    r2 = await svc.upsert(DocumentInput("acme", "runbook", "# Deploy\n\nRun the deploy script on Fridays.", Acl(allow_groups=frozenset({"ops", "eng"})), uri="runbook.md"))
    assert r2.status == "acl_updated"
    assert [h.doc_id for h in (await svc.search(bob, "deploy script")).hits] == ["runbook"]
    r3 = await svc.upsert(DocumentInput("acme", "runbook", "# Deploy\n\nRun the deploy script on Fridays.", Acl(allow_groups=frozenset({"ops", "eng"}), deny_users=frozenset({"bob"})), uri="runbook.md"))
    assert r3.status == "acl_updated"
    assert (await svc.search(bob, "deploy script")).hits == []
    embeds = [r for r in embed_provider.requests if r.path.endswith("/embeddings")]
    assert len(embeds) == calls + 2, "only the two queries were embedded: no chunk was re-embedded"
    assert (await svc.upsert(DocumentInput("acme", "runbook", "# Deploy\n\nRun the deploy script on Fridays.", Acl(allow_groups=frozenset({"ops", "eng"}), deny_users=frozenset({"bob"})), uri="runbook.md"))).status == "unchanged"


async def _snapshot(svc: RetrievalService) -> list[list[tuple[str, str, float]]]:
    out = []
    for reader in (Reader("acme", "alice", frozenset({"eng"})), Reader("acme", "bob", frozenset()), Reader("beta", "carol", frozenset({"eng"}))):
        for q in ("deploy database", "vacation policy days", "laptop security"):
            res = await svc.search(reader, q)
            out.append([(h.chunk_id, h.text, round(h.score, 6)) for h in res.hits])
    return out


async def test_rebuild_returns_what_incremental_returns(service_factory: ServiceFactory) -> None:
    svc = await service_factory()
    eng = Acl(allow_groups=frozenset({"eng"}))
    await svc.upsert_many([
        DocumentInput("acme", "a", "# Deploy\n\nDeploy the database on Monday.\n\n## Rollback\n\nRoll back the database.", eng, uri="a.md"),
        DocumentInput("acme", "b", "Vacation policy: 25 days per year.", PUBLIC),
        DocumentInput("acme", "c", "Laptop security: encrypt the disk.", Acl(allow_users=frozenset({"bob"}))),
        DocumentInput("beta", "a", "Deploy policy for beta: never on Friday.", eng),
    ])
    await svc.upsert(DocumentInput("acme", "b", "Vacation policy: 30 days per year.", PUBLIC))
    await svc.upsert(DocumentInput("acme", "c", "Laptop security: encrypt the disk.", Acl(allow_users=frozenset({"bob", "alice"}))))
    await svc.delete("beta", "a")
    before = await _snapshot(svc)
    assert any(before)
    counts = await svc.rebuild()
    assert counts == {"lexical": 4, "vector": 4}
    assert await _snapshot(svc) == before


async def test_crash_between_store_and_engines_is_repaired_at_start(service_factory: ServiceFactory, tmp_path: Path) -> None:
    owner = await service_factory("crash")
    await owner.upsert(DocumentInput("acme", "one", "The first document about invoices.", PUBLIC))
    await owner.close()
    # Another process (no engine lock) commits to the store of record only: the engines miss it.
    writer = await service_factory("crash", own_engines=False)
    assert not writer.owner
    await writer.upsert(DocumentInput("acme", "two", "The second document about invoices.", PUBLIC))
    await writer.delete("acme", "one")
    await writer.close()
    restarted = await service_factory("crash")
    res = await restarted.search(Reader("acme", "x", frozenset()), "invoices document")
    assert [h.doc_id for h in res.hits] == ["two"]
    status = await restarted.status()
    assert status["engines"]["lexical"]["lag"] == 0 and status["engines"]["lexical"]["count"] == 1
    await restarted.close()
    # An index folder lost entirely is rebuilt from the store at start.
    shutil.rmtree(tmp_path / "crash-index" / "lexical")
    again = await service_factory("crash")
    assert [h.doc_id for h in (await again.search(Reader("acme", "x", frozenset()), "invoices")).hits] == ["two"]


async def test_running_owner_applies_changes_written_by_another_process(service_factory: ServiceFactory) -> None:
    owner = await service_factory("shared", sync_interval_s=0.05)
    other = await service_factory("shared", own_engines=False)
    await other.upsert(DocumentInput("acme", "memo", "Quarterly memo about the roadmap.", PUBLIC))
    assert await owner.sync() == 1
    assert [h.doc_id for h in (await owner.search(Reader("acme", "x", frozenset()), "roadmap memo")).hits] == ["memo"]


async def test_embedding_model_change_reembeds_everything(service_factory: ServiceFactory, embed_provider: FakeProvider) -> None:
    first = await service_factory("model", embedding_model="model-a")
    await first.upsert_many([DocumentInput("acme", f"d{i}", f"document number {i} about travel", PUBLIC) for i in range(5)])
    await first.close()
    embed_provider.requests.clear()
    second = await service_factory("model", embedding_model="model-b")
    assert {r.body["model"] for r in embed_provider.requests} == {"model-b"}
    assert await second.store.embedding_models() == {"model-b": 5}
    status = await second.status()
    assert status["engines"]["vector"]["count"] == 5 and status["embedding_model"] == "model-b"
    assert len((await second.search(Reader("acme", "x", frozenset()), "travel")).hits) == 5


@pytest.mark.parametrize("query", ['"', 'NEAR(a b)', "*", "title:secret", "((((", "AND OR NOT", "\x00\x01", "a" * 50_000, "🙂 ünïcødé", "-", "'; DROP TABLE chunks; --"])
async def test_hostile_query_text(service_factory: ServiceFactory, query: str) -> None:
    svc = await service_factory(mode="bm25", embedder=False)
    await svc.upsert(DocumentInput("acme", "a", "title secret near the table of chunks", PUBLIC))
    res = await svc.search(Reader("acme", "x", frozenset()), query)
    assert all(h.doc_id == "a" for h in res.hits)


async def test_budget_excludes_chunks_that_do_not_fit(service_factory: ServiceFactory) -> None:
    svc = await service_factory(mode="bm25", embedder=False, max_context_tokens=60, top_k=3)
    await svc.upsert(DocumentInput("acme", "long", "budget " + "word " * 150, PUBLIC))
    await svc.upsert(DocumentInput("acme", "short", "budget short note", PUBLIC))
    res = await svc.search(Reader("acme", "x", frozenset()), "budget", debug=True)
    assert [h.doc_id for h in res.hits] == ["short"]
    assert [(h.doc_id, h.excluded_reason) for h in res.excluded] == [("long", "budget")]
    assert res.context_tokens <= 60


async def test_debug_view_names_acl_exclusions_without_text(service_factory: ServiceFactory) -> None:
    svc = await service_factory(mode="bm25", embedder=False)
    await svc.upsert(DocumentInput("acme", "secret", "merger merger merger details", Acl(allow_groups=frozenset({"exec"}))))
    await svc.upsert(DocumentInput("acme", "open", "merger rumours", PUBLIC))
    res = await svc.search(Reader("acme", "x", frozenset()), "merger", debug=True)
    assert [h.doc_id for h in res.hits] == ["open"]
    acl = [h for h in res.excluded if h.excluded_reason == "acl"]
    assert [h.doc_id for h in acl] == ["secret"] and acl[0].rank == 1
    assert "text" not in acl[0].to_json() and "title" not in acl[0].to_json()
    plain = await svc.search(Reader("acme", "x", frozenset()), "merger")
    assert plain.excluded == []


async def test_embedder_failure_is_a_clear_error(service_factory: ServiceFactory, embed_provider: FakeProvider) -> None:
    svc = await service_factory()
    embed_provider.push_embedding(Reply(status=500, error="overloaded"))
    with pytest.raises(EmbeddingError, match="HTTP 500: overloaded"):
        await svc.upsert(DocumentInput("acme", "a", "text", PUBLIC))
    assert await svc.store.get_document("acme", "a") is None


async def test_bad_ids_and_sizes_are_refused(service_factory: ServiceFactory) -> None:
    from llm_warden.proxy.errors import BadRequest, PayloadTooLarge

    svc = await service_factory(mode="bm25", embedder=False, max_document_bytes=100)
    with pytest.raises(BadRequest):
        await svc.upsert(DocumentInput("acme", "", "x", PUBLIC))
    with pytest.raises(BadRequest):
        await svc.upsert(DocumentInput("acme", "a\nb", "x", PUBLIC))
    with pytest.raises(PayloadTooLarge):
        await svc.upsert(DocumentInput("acme", "big", "x" * 101, PUBLIC))
