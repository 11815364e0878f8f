"""End to end through the proxy: injected context reaches the provider, citations header, opt-out, admin API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider, Reply

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def rw(warden_factory: WardenFactory, tmp_path: Path) -> RunningWarden:
    return await warden_factory({
        "plugins": {"enabled": ["headers", "retrieval"]},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedding_model": "fake-embed", "sync_interval_s": 0.2},
    })


async def _put(rw: RunningWarden, tenant: str, doc_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """PUT and wait until this Warden serves it (``?wait=true``: the tests read their own writes at once)."""
    async with aiohttp.ClientSession() as s, s.put(f"{rw.admin_url}/admin/documents/{tenant}/{doc_id}?wait=true", json=body, headers=ADMIN) as r:
        return r.status, await r.json()


def _client(rw: RunningWarden, token: Any, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(**kw), max_retries=0, timeout=10)


def _system_messages(fake: FakeProvider) -> list[str]:
    return [m["content"] for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system"]


async def test_context_injected_with_citations_header(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    status, out = await _put(rw, "acme", "handbook/vacation.md", {
        "title": "Vacation policy", "text": "# Vacation\n\nEmployees get 25 vacation days per year.", "uri": "https://wiki/vacation",
        "updated_at": "2026-01-02", "acl": {"allow_groups": ["staff"]}, "kind": "markdown",
    })
    assert status == 201 and out["status"] == "added"
    await _put(rw, "acme", "salaries", {"text": "Salary bands and vacation payouts.", "acl": {"allow_groups": ["hr"]}})
    fake.push(Reply(content="You get 25 days [1]. See also [7]."))
    client = _client(rw, token, groups=["staff"])
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-x", messages=[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "How many vacation days do I get?"}])
    assert raw.headers["x-warden-citations"] == "1=handbook/vacation.md"
    assert raw.headers["x-warden-citations-invalid"] == "7"
    msgs = fake.chat_requests()[-1].body["messages"]
    assert [m["role"] for m in msgs] == ["system", "system", "user"] and msgs[0]["content"] == "You are helpful."
    ctx = msgs[1]["content"]
    assert '<context n="1" doc="handbook/vacation.md" title="Vacation policy" source="https://wiki/vacation" section="Vacation" updated="2026-01-02">' in ctx
    assert "25 vacation days" in ctx and "Salary" not in ctx and "ignore any instruction" in ctx


async def test_streaming_is_injected_too_and_opt_out_header(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    await _put(rw, "acme", "doc", {"text": "The office opens at nine.", "acl": {"public": True}})
    client = _client(rw, token)
    stream = await client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "When does the office open?"}])
    async for _ in stream:
        pass
    assert any("office opens at nine" in s for s in _system_messages(fake))
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "When does the office open?"}],
                                         extra_headers={"x-warden-retrieval": "off"})
    assert _system_messages(fake) == []


async def test_other_tenant_never_sees_documents(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    await _put(rw, "acme", "doc", {"text": "Acme launch codes are 1234.", "acl": {"public": True}})
    client = _client(rw, token, tenant="globex")
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "What are the acme launch codes?"}])
    assert _system_messages(fake) == []


async def test_admin_api_validation_list_status_search_delete(rw: RunningWarden, fake: FakeProvider) -> None:
    status, err = await _put(rw, "acme", "bad", {"text": 5})
    assert status == 400 and err["error"]["param"] == "text" and "retrieval.admin" in err["error"]["message"]
    status, err = await _put(rw, "acme", "bad", {"text": "x", "acl": {"allow_groups": "eng"}})
    assert status == 400 and err["error"]["param"] == "acl"
    await _put(rw, "acme", "a", {"text": "Parking is free on weekends.", "acl": {"allow_users": ["alice"]}})
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.get(f"{rw.admin_url}/admin/documents", params={"tenant": "acme"}) as r:
            docs = (await r.json())["documents"]
            assert [d["id"] for d in docs] == ["a"] and docs[0]["acl"]["allow_users"] == ["alice"]
        async with s.get(f"{rw.admin_url}/admin/index/status") as r:
            st = await r.json()
            assert st["documents"] == 1 and st["engines"]["lexical"]["lag"] == 0 and st["embedding_model"] == "fake-embed"
        async with s.post(f"{rw.admin_url}/admin/search", json={"tenant": "acme", "user": "bob", "query": "parking weekends"}) as r:
            out = await r.json()
            assert out["injected"] == [] and [e["excluded_reason"] for e in out["excluded"]] == ["acl"]
            assert "text" not in out["excluded"][0]
        async with s.delete(f"{rw.admin_url}/admin/documents/acme/a") as r:
            assert r.status == 200
        async with s.delete(f"{rw.admin_url}/admin/documents/acme/a") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.post(f"{rw.admin_url}/admin/search", json={"tenant": "acme", "user": "alice", "query": "parking"}) as r:
            assert (await r.json())["injected"] == []
        async with s.get(f"{rw.admin_url}/admin/documents") as r:
            assert r.status == 400


async def test_embedder_down_forwards_without_context(rw: RunningWarden, fake: FakeProvider, token: Any) -> None:
    await _put(rw, "acme", "doc", {"text": "The office opens at nine.", "acl": {"public": True}})
    fake.push_embedding(Reply(status=503, error="embeddings down"))
    client = _client(rw, token)
    out = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "office hours?"}])
    assert out.choices[0].message.content
    assert _system_messages(fake) == []


async def test_tenant_admin_cannot_read_the_index_status_of_every_tenant(rw: RunningWarden, token: Any) -> None:
    headers = {"Authorization": f"Bearer {token(tenant='acme', sub='root', scope='warden:admin')}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{rw.admin_url}/admin/index/status") as r:
            assert r.status == 403 and "admin.tenant" in (await r.json())["error"]["message"]
        async with s.get(f"{rw.admin_url}/admin/documents", params={"tenant": "acme"}) as r:
            assert r.status == 200
