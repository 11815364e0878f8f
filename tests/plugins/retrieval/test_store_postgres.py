"""Replicas on one PostgreSQL store: ingest once, every replica serves it within the freshness bound.

Real PostgreSQL (a schema per test), real replicas (RetrievalService with its
own index folder, follower running).  The bound asserted is the documented
one (2 s); the follower's poll is set far above it (``sync_interval_s`` 5 s)
so passing needs the LISTEN/NOTIFY wake-up, not the timer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.pgstore import PostgresStore
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService
from llm_warden.proxy.db.migrate import SchemaMismatch
from llm_warden.proxy.errors import ServiceUnavailable
from tests.fakeprovider import FakeProvider
from tests.plugins.retrieval.conftest import ServiceFactory
from tests.plugins.retrieval.pg import fresh_schema, schema_of, terminate

BOUND_S = 2.0
PUBLIC = Acl(public=True)
ANYONE = Reader("acme", "x", frozenset())
SLOW_POLL = {"sync_interval_s": 5.0, "max_lag_s": 30.0}


async def within(bound_s: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check()`` holds (polled every 10 ms); fails past ``bound_s``."""
    t0 = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > bound_s:
            pytest.fail(f"not observed within {bound_s}s")
        await asyncio.sleep(0.01)


def finds(svc: RetrievalService, reader: Reader, query: str, doc_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return doc_id in [h.doc_id for h in (await svc.search(reader, query)).hits]

    return check


async def test_ingest_through_one_replica_is_served_by_the_other_within_the_bound(pg_factory: ServiceFactory) -> None:
    a = await pg_factory("a", embedder=False, **SLOW_POLL)
    b = await pg_factory("b", embedder=False, **SLOW_POLL)
    for i in range(5):
        r = await a.upsert(DocumentInput("acme", f"memo{i}", f"Quarterly memo {i} about the roadmap zebra{i}.", PUBLIC), wait=False)
        assert r.status == "added" and r.seq > 0
        lag = await within(BOUND_S, finds(b, ANYONE, f"zebra{i}", f"memo{i}"))
        assert lag < BOUND_S
    assert b.has_documents("acme") and (await b.status())["documents"] == 5
    assert b.follower is not None and b.follower.listening and b.follower.notified >= 5


async def test_delete_and_acl_change_are_never_served_stale_by_the_other_replica(pg_factory: ServiceFactory) -> None:
    a = await pg_factory("a", embedder=False, **SLOW_POLL)
    b = await pg_factory("b", embedder=False, **SLOW_POLL)
    bob, carol = Reader("acme", "bob", frozenset({"eng"})), Reader("acme", "carol", frozenset({"ops"}))
    await a.upsert(DocumentInput("acme", "runbook", "Deploy runbook: run the deploy script.", Acl(allow_groups=frozenset({"eng"}))))
    await within(BOUND_S, finds(b, bob, "deploy runbook", "runbook"))
    # Narrowing the ACL: the very first search on B after the acknowledgement no longer serves bob
    # (every search re-checks the current ACL in the store of record), even before B's indexes apply it.
    assert (await a.upsert(DocumentInput("acme", "runbook", "Deploy runbook: run the deploy script.", Acl(allow_groups=frozenset({"ops"}))),
                           wait=False)).status == "acl_updated"
    assert (await b.search(bob, "deploy runbook")).hits == []
    await within(BOUND_S, finds(b, carol, "deploy runbook", "runbook"))
    assert (await b.search(bob, "deploy runbook")).hits == []
    # A delete: gone on B at the first search after the acknowledgement.
    assert await a.delete("acme", "runbook", wait=False)
    assert (await b.search(carol, "deploy runbook")).hits == []
    await within(BOUND_S, lambda: _engine_count(b, 0))


async def _engine_count(svc: RetrievalService, n: int) -> bool:
    return bool((await svc.status())["engines"]["lexical"]["count"] == n)


async def test_follower_survives_a_terminated_connection_and_catches_up(pg_factory: ServiceFactory, pg_dsn: str) -> None:
    a = await pg_factory("a", embedder=False, **SLOW_POLL)
    b = await pg_factory("b", embedder=False, sync_interval_s=0.5, max_lag_s=30.0)
    assert b.follower is not None
    await within(BOUND_S, lambda: _true(b.follower is not None and b.follower.listening))
    before = b.follower.reconnects
    # Every connection of replica B, its LISTEN connection and its pool, is terminated by the server.
    killed = await terminate(f"{schema_of(pg_dsn)}-b-follower") + await terminate(f"{schema_of(pg_dsn)}-b")
    assert killed >= 1
    # Written while B's listener is down: that notification is lost; B must still catch up by position.
    await a.upsert(DocumentInput("acme", "late", "A memo written while the listener was down: walrus.", PUBLIC))
    await within(BOUND_S + 1.0, finds(b, ANYONE, "walrus", "late"))
    await within(BOUND_S, lambda: _true(b.follower is not None and b.follower.listening))
    assert b.follower.reconnects > before
    # And notifications work again after the reconnection.
    await a.upsert(DocumentInput("acme", "after", "A memo after the reconnection: narwhal.", PUBLIC), wait=False)
    await within(BOUND_S, finds(b, ANYONE, "narwhal", "after"))
    assert b.not_ready() is None


async def _true(value: bool) -> bool:
    return value


async def test_a_replica_started_later_builds_everything(pg_factory: ServiceFactory, embed_provider: FakeProvider) -> None:
    a = await pg_factory("a")
    docs = [DocumentInput("acme", f"d{i}", f"# Travel\n\nDocument {i} about travel and expenses {i}.", PUBLIC, uri=f"d{i}.md") for i in range(20)]
    await a.upsert_many(docs)
    await a.delete("acme", "d3")
    await a.upsert(DocumentInput("acme", "d4", "# Travel\n\nDocument 4 about travel, now restricted.", Acl(allow_users=frozenset({"bob"})), uri="d4.md"))
    embedded = [t for r in embed_provider.requests if r.path.endswith("/embeddings") for t in r.body["input"]]
    late = await pg_factory("late")
    # Every chunk was embedded once, by the replica that ingested it: the late replica embedded nothing at start.
    assert [t for r in embed_provider.requests if r.path.endswith("/embeddings") for t in r.body["input"]] == embedded
    status = await late.status()
    assert status["documents"] == 19 and status["engines"]["lexical"]["count"] == 19 and status["engines"]["vector"]["count"] == 19
    assert status["engines"]["lexical"]["lag"] == 0
    res = await late.search(ANYONE, "travel expenses", top_k=20)
    assert sorted(h.doc_id for h in res.hits) == sorted(f"d{i}" for i in range(20) if i not in (3, 4))
    assert "vector" in res.hits[0].scores  # vectors came from the store, not from re-embedding
    assert "d4" in [h.doc_id for h in (await late.search(Reader("acme", "bob", frozenset()), "restricted travel", top_k=20)).hits]


async def test_restart_catches_up_from_its_local_position(pg_factory: ServiceFactory) -> None:
    a = await pg_factory("a", embedder=False)
    b = await pg_factory("b", embedder=False)
    await a.upsert(DocumentInput("acme", "one", "First memo: invoices.", PUBLIC))
    await within(BOUND_S, finds(b, ANYONE, "invoices", "one"))
    applied = (await b.status())["engines"]["lexical"]["applied_seq"]
    await b.close()
    await a.upsert(DocumentInput("acme", "two", "Second memo: invoices again.", PUBLIC))
    b2 = await pg_factory("b", embedder=False)
    st = await b2.status()
    assert st["engines"]["lexical"]["applied_seq"] > applied and st["engines"]["lexical"]["lag"] == 0
    assert sorted(h.doc_id for h in (await b2.search(ANYONE, "invoices")).hits) == ["one", "two"]


async def test_a_replica_behind_the_pruned_log_rebuilds(pg_factory: ServiceFactory) -> None:
    a = await pg_factory("a", embedder=False)
    b = await pg_factory("b", embedder=False)
    await a.upsert(DocumentInput("acme", "one", "Memo one about otters.", PUBLIC))
    await within(BOUND_S, finds(b, ANYONE, "otters", "one"))
    await b.close()
    await a.upsert(DocumentInput("acme", "two", "Memo two about otters.", PUBLIC))
    await a.delete("acme", "one")
    assert await a.store.prune(0, 0) > 0  # retention 0: every entry goes, B's position is below the pruned bound
    b2 = await pg_factory("b", embedder=False)
    assert [h.doc_id for h in (await b2.search(ANYONE, "otters")).hits] == ["two"]
    assert (await b2.status())["engines"]["lexical"]["count"] == 1


async def test_schema_check_refuses_an_unknown_or_missing_version(pg_dsn: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("UPDATE warden_schema SET version = 99 WHERE component = 'retrieval'")
        with pytest.raises(SchemaMismatch, match="version 99, newer than"):
            await PostgresStore(pg_dsn, pool_max=1).open()
    finally:
        await admin.close()
    async with fresh_schema(migrated=False) as empty:
        with pytest.raises(SchemaMismatch, match="run `warden db migrate`"):
            await PostgresStore(empty, pool_max=1).open()


async def test_unreachable_store_makes_the_replica_not_ready_and_refuse(pg_factory: ServiceFactory, pg_dsn: str) -> None:
    from tests.plugins.retrieval.pg import Relay

    relay = Relay()
    await relay.start()
    try:
        a = await pg_factory("a", embedder=False)
        b = await pg_factory("b", embedder=False, dsn=relay.dsn(schema_of(pg_dsn)), sync_interval_s=0.2, max_lag_s=1.0, store_timeout_s=1.0)
        await a.upsert(DocumentInput("acme", "one", "Memo about beavers.", PUBLIC))
        await within(BOUND_S, finds(b, ANYONE, "beavers", "one"))
        assert b.not_ready() is None
        await relay.cut()
        await within(5.0, lambda: _true(b.not_ready() is not None))
        assert "have not caught up" in (b.not_ready() or "")
        with pytest.raises(ServiceUnavailable) as e:
            await b.search(ANYONE, "beavers")
        assert e.value.rule == "retrieval.stale" and e.value.status == 503
        with pytest.raises(ServiceUnavailable) as w:  # a write through the cut-off replica: 503, nothing half-written
            await b.upsert(DocumentInput("acme", "two", "Memo about voles.", PUBLIC))
        assert w.value.rule == "retrieval.store" and w.value.message == "the retrieval store (PostgreSQL) is unavailable"
        # Changes made meanwhile (an ACL narrowed) are applied once the store is back, then B is ready again.
        await a.upsert(DocumentInput("acme", "one", "Memo about beavers.", Acl(allow_users=frozenset({"bob"}))))
        await relay.restore()
        await within(5.0, lambda: _true(b.not_ready() is None))
        assert (await b.search(ANYONE, "beavers")).hits == []
        assert [h.doc_id for h in (await b.search(Reader("acme", "bob", frozenset()), "beavers")).hits] == ["one"]
    finally:
        await relay.cut()


async def test_counters_follow_every_write_without_recounting(pg_factory: ServiceFactory, pg_dsn: str) -> None:
    a = await pg_factory("a")
    await a.upsert_many([DocumentInput(t, f"d{i}", "# A\n\nalpha.\n\n# B\n\nbeta gamma.", PUBLIC, uri="x.md") for i, t in enumerate(["acme", "acme", "beta"])])
    await a.upsert(DocumentInput("acme", "d0", "one chunk only", PUBLIC))
    await a.upsert(DocumentInput("acme", "d1", "# A\n\nalpha.\n\n# B\n\nbeta gamma.", Acl(allow_users=frozenset({"u"})), uri="x.md"))
    await a.delete("beta", "d2")
    conn = await asyncpg.connect(pg_dsn)
    try:
        real = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM retrieval_documents) AS documents, (SELECT count(*) FROM retrieval_chunks) AS chunks, "
            "(SELECT count(*) FROM retrieval_chunks WHERE vector IS NOT NULL) AS vectors")
    finally:
        await conn.close()
    counts = await a.store.counts()
    assert (counts["documents"], counts["chunks"], counts["vectors"]) == (real["documents"], real["chunks"], real["vectors"]) == (2, 3, 3)
    assert await a.store.tenant_counts() == {"acme": (2, 3), "beta": (0, 0)}
    assert (await a.store.counts("acme"))["documents"] == 2 and counts["tenants"] == 1


async def test_index_folder_of_another_store_is_rebuilt(pg_factory: ServiceFactory, tmp_path: object) -> None:
    a = await pg_factory("a", embedder=False)
    await a.upsert(DocumentInput("acme", "one", "Memo about herons.", PUBLIC))
    await a.close()
    async with fresh_schema() as other_dsn:
        other = await pg_factory("a", embedder=False, dsn=other_dsn)  # the same index folder, another store
        assert (await other.status())["engines"]["lexical"]["count"] == 0
        assert (await other.search(ANYONE, "herons")).hits == []
        await other.close()


async def test_writers_racing_on_one_document_keep_the_counters_exact(pg_factory: ServiceFactory) -> None:
    a = await pg_factory("a", embedder=False)
    b = await pg_factory("b", embedder=False)
    texts = [f"version {v} of the shared memo" for v in range(12)]
    await asyncio.gather(*[(a if v % 2 else b).upsert(DocumentInput("acme", "shared", texts[v], PUBLIC), wait=False) for v in range(12)])
    counts = await a.store.counts()
    assert counts["documents"] == 1 and counts["chunks"] == 1
    await within(BOUND_S, lambda: _engine_count(b, 1))
    await within(BOUND_S, lambda: _engine_count(a, 1))


async def test_a_new_embedding_model_is_embedded_once_for_the_fleet(pg_factory: ServiceFactory, embed_provider: FakeProvider) -> None:
    a = await pg_factory("a", embedding_model="model-a")
    await a.upsert_many([DocumentInput("acme", f"d{i}", f"document number {i} about travel", PUBLIC) for i in range(5)])
    b_old = await pg_factory("b", embedding_model="model-a", sync_interval_s=0.2, max_lag_s=5.0)
    await within(BOUND_S, lambda: _vector_count(b_old, 5))
    await a.close()
    embed_provider.requests.clear()
    c = await pg_factory("c", embedding_model="model-b")  # re-embeds every chunk once, for everyone
    assert sum(len(r.body["input"]) for r in embed_provider.requests) == 5 and {r.body["model"] for r in embed_provider.requests} == {"model-b"}
    assert await c.store.embedding_models() == {"model-b": 5}
    embed_provider.requests.clear()
    d = await pg_factory("d", embedding_model="model-b")
    assert embed_provider.requests == []  # the second replica with the new model embeds nothing
    assert (await d.status())["engines"]["vector"]["count"] == 5 and len((await d.search(ANYONE, "travel")).hits) == 5
    # A replica still embedding queries with the old model must not mix them with the new vectors.
    await within(BOUND_S + 1, lambda: _true(b_old.not_ready() is not None))
    assert "model-b" in (b_old.not_ready() or "")
    with pytest.raises(ServiceUnavailable):
        await b_old.search(ANYONE, "travel")


async def _vector_count(svc: RetrievalService, n: int) -> bool:
    return bool((await svc.status())["engines"].get("vector", {}).get("count") == n)


@pytest.mark.parametrize("payload", ["", "abc", "-5", "99999999999999999999999", "1e9", "x" * 7999, "12; DROP TABLE retrieval_changes"])
async def test_a_forged_notification_is_only_a_wake_up(pg_factory: ServiceFactory, pg_dsn: str, payload: str) -> None:
    a = await pg_factory("a", embedder=False, **SLOW_POLL)
    b = await pg_factory("b", embedder=False, **SLOW_POLL)
    assert b.follower is not None
    await within(BOUND_S, lambda: _true(b.follower is not None and b.follower.listening))
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", b.follower.channel, payload)
    finally:
        await conn.close()
    await a.upsert(DocumentInput("acme", "real", "A real memo about ibises.", PUBLIC), wait=False)
    await within(BOUND_S, finds(b, ANYONE, "ibises", "real"))
    assert b.follower.listening and b.not_ready() is None
    assert (await b.status())["engines"]["lexical"]["lag"] == 0


async def test_warden_ingest_writes_the_shared_store_and_a_running_replica_serves_it(
    pg_factory: ServiceFactory, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_warden.proxy.cli import main

    replica = await pg_factory("a", embedder=False, **SLOW_POLL)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pay.md").write_text("# Payroll\n\nPayroll runs monthly, on the cormorant schedule.\n")
    (docs / "leave.md").write_text("# Leave\n\nAsk your manager for leave.\n")
    cfg = tmp_path / "warden.toml"
    cfg.write_text('[database]\ndsn_env = "WARDEN_TEST_INGEST_DSN"\npool_max = 2\n[plugins]\nenabled = ["retrieval"]\n'
                   f'[retrieval]\nstore = "postgres"\nembedder = "none"\nmode = "bm25"\nindex_dir = "{tmp_path / "cli-index"}"\n')
    monkeypatch.setenv("WARDEN_TEST_INGEST_DSN", pg_dsn)
    code = await asyncio.to_thread(main, ["ingest", str(docs), "--tenant", "acme", "--public", "--config", str(cfg)])
    out, err = capsys.readouterr()
    assert code == 0 and "2 added" in out and "shared PostgreSQL store" in err
    assert not (tmp_path / "cli-index" / "lexical").exists()  # the CLI built no local index
    await within(BOUND_S, finds(replica, ANYONE, "cormorant payroll", "docs/pay.md"))
    monkeypatch.setenv("WARDEN_TEST_INGEST_DSN", "")
    assert await asyncio.to_thread(main, ["ingest", str(docs), "--tenant", "acme", "--config", str(cfg)]) == 2
    assert "WARDEN_TEST_INGEST_DSN" in capsys.readouterr().err
