"""Retrieval's objectives as live metrics: freshness on ingest and on a follower, the independent ACL re-check, citations."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.config import RetrievalConfig, SloConfig
from llm_warden.plugins.retrieval.inject import Hit
from llm_warden.plugins.retrieval.plugin import RetrievalPlugin
from llm_warden.plugins.retrieval.records import DocumentInput, DocumentRow
from llm_warden.plugins.retrieval.slo import RECHECK_RULE, SloMetrics, verdict
from llm_warden.proxy.config import MetricsConfig
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Principal
from llm_warden.proxy.metrics import Metrics
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.retrieval.conftest import ServiceFactory

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def rw(warden_factory: WardenFactory, tmp_path: Path) -> RunningWarden:
    return await warden_factory({
        "plugins": {"enabled": ["retrieval"]},
        "audit": {"enabled": True, "durability": "sync"},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedder": "none", "mode": "bm25",
                      "sync_interval_s": 0.2, "slo": {"citation_coverage": 0.75, "source_to_servable_p95_s": 7200.0}},
    })


def _parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def scrape(rw: RunningWarden) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(f"{rw.admin_url}/metrics") as r:
        return _parse(await r.text())


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def put(rw: RunningWarden, doc_id: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.put(f"{rw.admin_url}/admin/documents/acme/{doc_id}?wait=true", json=body, headers=ADMIN) as r:
        assert r.status in (200, 201), await r.text()


def plugin(rw: RunningWarden) -> RetrievalPlugin:
    p = rw.warden.chain.get("retrieval")
    assert isinstance(p, RetrievalPlugin)
    return p


def ask(rw: RunningWarden, token: Any, groups: list[str]) -> Any:
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(groups=groups), max_retries=0, timeout=10)
    return client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "What is the zebra budget?"}])


def context_sent(fake: FakeProvider) -> str:
    return "\n".join(m["content"] for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system")


# -- freshness ---------------------------------------------------------------------------------


async def test_freshness_is_observed_when_an_ingested_document_becomes_servable(rw: RunningWarden) -> None:
    before = await scrape(rw)
    assert val(before, "warden_retrieval_freshness_seconds_count", stage="ingest_to_servable") == 0
    hour_ago = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat(timespec="seconds")
    await put(rw, "memo", {"text": "The zebra budget is 12 dollars.", "acl": {"public": True}, "updated_at": hour_ago})
    await put(rw, "undated", {"text": "An undated note about zebras.", "acl": {"public": True}})
    s = await scrape(rw)
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="ingest_to_servable") == 2
    assert 0 <= val(s, "warden_retrieval_freshness_seconds_sum", stage="ingest_to_servable") < 5, "ingest to servable on one replica is quick"
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="source_to_servable") == 1, "only a document with a source time counts"
    assert 3599 <= val(s, "warden_retrieval_freshness_seconds_sum", stage="source_to_servable") < 3610
    # An ACL change alone makes no new version to serve; an unchanged re-put neither.
    await put(rw, "memo", {"text": "The zebra budget is 12 dollars.", "acl": {"allow_groups": ["staff"]}, "updated_at": hour_ago})
    await put(rw, "undated", {"text": "An undated note about zebras.", "acl": {"public": True}})
    assert val(await scrape(rw), "warden_retrieval_freshness_seconds_count", stage="ingest_to_servable") == 2
    assert val(s, "warden_retrieval_slo_target", objective="citation_coverage") == 0.75
    assert val(s, "warden_retrieval_slo_target", objective="permission_correctness") == 1.0
    assert val(s, "warden_retrieval_slo_target", objective="source_to_servable_p95_seconds") == 7200


async def test_freshness_on_a_follower_replica_of_the_postgres_store(pg_factory: ServiceFactory) -> None:
    writer = await pg_factory("a", embedder=False, sync_interval_s=5.0, max_lag_s=30.0)
    await writer.upsert(DocumentInput("acme", "old", "Written before the follower started.", Acl(public=True)))
    follower = await pg_factory("b", embedder=False, sync_interval_s=5.0, max_lag_s=30.0)
    metrics = Metrics(MetricsConfig())
    slo = SloMetrics(metrics, SloConfig)
    assert follower.indexes is not None
    follower.indexes.on_servable = slo.servable
    source_time = datetime.fromtimestamp(time.time() - 600, UTC).isoformat()
    r = await writer.upsert(DocumentInput("acme", "new", "The walrus memo.", Acl(public=True), updated_at=source_time), wait=False)
    for _ in range(300):
        if follower.indexes.floor() >= r.seq:
            break
        await asyncio.sleep(0.01)
    assert follower.indexes.floor() >= r.seq, "the follower applied the write (woken by NOTIFY)"
    s = _parse(metrics.exposition().decode())
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="ingest_to_servable") == 1, "what the follower caught up with at start is not observed"
    assert val(s, "warden_retrieval_freshness_seconds_sum", stage="ingest_to_servable") < 3
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="source_to_servable") == 1
    assert 599 <= val(s, "warden_retrieval_freshness_seconds_sum", stage="source_to_servable") < 605


def test_a_source_clock_ahead_is_no_measurement() -> None:
    metrics = Metrics(MetricsConfig())
    slo = SloMetrics(metrics, SloConfig)
    now = 1_800_000_000.0
    slo.servable([DocumentRow("t", "d", "h", {}, updated_at="2099-01-01T00:00:00Z", indexed_at=now - 2),
                  DocumentRow("t", "e", "h", {}, updated_at="not a date", indexed_at=now - 1)], now=now)
    s = _parse(metrics.exposition().decode())
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="ingest_to_servable") == 2
    assert val(s, "warden_retrieval_freshness_seconds_sum", stage="ingest_to_servable") == 3
    assert val(s, "warden_retrieval_freshness_seconds_count", stage="source_to_servable") == 0


# -- the permission re-check -------------------------------------------------------------------


async def _two_staff_docs(rw: RunningWarden) -> None:
    await put(rw, "budget", {"text": "The zebra budget is 12 dollars.", "acl": {"allow_groups": ["staff"]}})
    await put(rw, "plan", {"text": "The zebra plan: the budget grows next year.", "acl": {"allow_groups": ["staff"]}})


async def test_an_acl_changed_in_the_store_after_the_search_is_removed_before_upstream(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    """The race the re-check closes: the store's ACL changes between the search's read and the upstream call."""
    await _two_staff_docs(rw)
    p = plugin(rw)
    assert p.service is not None
    svc = p.service
    search = svc.search

    async def search_then_revoke(reader: Reader, query: str, **kw: Any) -> Any:
        result = await search(reader, query, **kw)
        row = (await svc.store.get_documents("acme", ["budget"]))["budget"]
        row.acl = Acl(allow_groups=frozenset({"hr"})).to_json()
        await svc.store.update_documents_meta([row], [True])  # the store of record only: no index has seen it
        return result

    svc.search = search_then_revoke  # type: ignore[method-assign]
    fake.push(Reply(content="It is 12 dollars [1]."))
    raw = await ask(rw, token, ["staff"])
    ctx = context_sent(fake)
    assert "12 dollars" not in ctx and "zebra plan" in ctx, "the revoked chunk never reached the provider, the other did"
    assert '<context n="1" doc="plan"' in ctx, "the remaining chunk is numbered again from 1"
    assert raw.headers["x-warden-citations"] == "1=plan"
    s = await scrape(rw)
    assert val(s, "warden_retrieval_permission_checks_total", result="violation") == 1
    assert val(s, "warden_retrieval_permission_checks_total", result="ok") == 1
    records = await rw.warden.audit.search(kind="exchange", limit=5)  # type: ignore[union-attr]
    rec = records[0]
    withheld = [r for r in rec["retrieved"] if r["doc_id"] == "budget"]
    assert withheld and withheld[0]["excluded_reason"] == RECHECK_RULE and not withheld[0]["injected"]
    assert rec["retrieval"]["excluded"] == {RECHECK_RULE: 1}
    assert rec["plugins"]["retrieval"]["acl_recheck"]["violations"][0]["why"] == "stored ACL does not allow the principal"


async def test_a_search_path_that_lets_a_forbidden_chunk_through_is_caught(rw: RunningWarden, fake: FakeProvider, token: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's copy of an ACL tampered with and the search's own ACL check broken: the re-check shares neither."""
    await put(rw, "salaries", {"text": "The zebra budget for salaries is secret.", "acl": {"allow_groups": ["hr"]}})
    p = plugin(rw)
    assert p.service is not None and p.service.lexical is not None
    p.service.lexical.set_acl("acme", "salaries", Acl(public=True))
    p.service.lexical.commit()
    monkeypatch.setattr(Acl, "allows", lambda self, subject, groups: True)
    fake.push(Reply(content="I do not know."))
    await ask(rw, token, ["staff"])
    assert "secret" not in context_sent(fake)
    assert fake.chat_requests()[-1].body["messages"] == [{"role": "user", "content": "What is the zebra budget?"}], "nothing was injected"
    s = await scrape(rw)
    assert val(s, "warden_retrieval_permission_checks_total", result="violation") == 1
    assert val(s, "warden_retrieval_permission_checks_total", result="ok") == 0
    assert val(s, "warden_retrieval_answers_total", cited="no") == 0, "an answer without context is no answer with context"


def _hit(chunk_id: str, doc_id: str) -> Hit:
    return Hit(chunk_id, doc_id, 1.0)


@pytest.mark.parametrize(("chunk_id", "doc", "why"), [
    ("acme/d#abcd.0", None, "document not in the store of record"),
    ("acme/d#abcd.0", DocumentRow("globex", "d", "abcd99", {"public": True}), "document of another tenant"),
    ("acme/d#ffff.0", DocumentRow("acme", "d", "abcd99", {"public": True}), "chunk not of the stored version of the document"),
    ("acme/other#abcd.0", DocumentRow("acme", "d", "abcd99", {"public": True}), "chunk not of the stored version of the document"),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {"public": "yes"}), "stored ACL is malformed"),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {"public": False, "allow_users": "alice"}), "stored ACL is malformed"),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {"public": True, "deny_groups": ["staff"]}), "stored ACL does not allow the principal"),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {}), "stored ACL does not allow the principal"),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {"allow_users": ["alice"]}), None),
    ("acme/d#abcd.0", DocumentRow("acme", "d", "abcd99", {"allow_groups": ["staff"], "deny_users": ["bob"]}), None),
])
def test_the_verdict_fails_closed(chunk_id: str, doc: DocumentRow | None, why: str | None) -> None:
    alice = Principal("acme", "alice", frozenset({"staff"}))
    assert verdict(_hit(chunk_id, "d"), doc, alice) == why


# -- citations ---------------------------------------------------------------------------------


async def test_answers_with_context_count_cited_and_uncited_and_invalid_citations(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    await _two_staff_docs(rw)
    fake.push(Reply(content="It is 12 dollars [1], growing [2]."))
    fake.push(Reply(content="It is 12 dollars."))
    fake.push(Reply(content="It is 12 dollars [7]."))
    for _ in range(3):
        await ask(rw, token, ["staff"])
    fake.push(Reply(content="No context here [1]."))
    await ask(rw, token, ["nobody"])
    fake.push(Reply(content="Streamed: 12 dollars [2]."))
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(groups=["staff"]), max_retries=0, timeout=10)
    stream = await client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "What is the zebra budget?"}])
    async for _ in stream:
        pass
    s = await scrape(rw)
    assert val(s, "warden_retrieval_answers_total", cited="yes") == 2, "a streamed answer counts too"
    assert val(s, "warden_retrieval_answers_total", cited="no") == 2, "an answer citing only a number never given covers nothing"
    assert val(s, "warden_citations_total", valid="true") == 3
    assert val(s, "warden_citations_total", valid="false") == 1
    assert val(s, "warden_retrieval_permission_checks_total", result="ok") == 8


# -- config ------------------------------------------------------------------------------------


async def test_new_targets_apply_on_reload(rw: RunningWarden) -> None:
    p = plugin(rw)
    await p.reload(dataclasses.replace(p.section, slo=SloConfig(citation_coverage=0.5, invalid_citation_rate=0.1)))
    s = await scrape(rw)
    assert val(s, "warden_retrieval_slo_target", objective="citation_coverage") == 0.5
    assert val(s, "warden_retrieval_slo_target", objective="invalid_citation_rate") == 0.1


@pytest.mark.parametrize(("slo", "key"), [
    ({"permission_correctness": 0.99}, "retrieval.slo.permission_correctness"),
    ({"citation_coverage": 1.5}, "retrieval.slo.citation_coverage"),
    ({"ingest_to_servable_p95_s": 0}, "retrieval.slo.ingest_to_servable_p95_s"),
])
def test_slo_targets_are_validated(slo: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        RetrievalConfig(slo=SloConfig(**slo)).validate("retrieval")
    assert ei.value.key == key
