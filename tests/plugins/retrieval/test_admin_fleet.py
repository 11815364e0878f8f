"""Through the server: the bulk endpoint, acknowledgement without waiting, /readyz from plugins, `warden db migrate`.

The PostgreSQL cases run a real Warden whose retrieval store is reached
through a TCP relay the test can cut (the database itself keeps running
for the other tests).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from llm_warden.proxy.plugin import Plugin
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider
from tests.plugins.retrieval.pg import Relay, fresh_schema, schema_of

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def rw(warden_factory: WardenFactory, tmp_path: Path) -> RunningWarden:
    return await warden_factory({
        "plugins": {"enabled": ["headers", "retrieval"]},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedder": "none", "mode": "bm25",
                      "bulk_max_documents": 3, "max_document_bytes": 1000},
    })


async def _call(rw: RunningWarden, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=ADMIN) as s, s.request(method, f"{rw.admin_url}{path}", json=body) as r:
        return r.status, await r.json()


async def _ids(rw: RunningWarden, tenant: str = "acme") -> list[str]:
    status, out = await _call(rw, "GET", f"/admin/documents?tenant={tenant}")
    assert status == 200
    return [d["id"] for d in out["documents"]]


async def test_bulk_writes_a_batch_in_one_transaction(rw: RunningWarden) -> None:
    docs = [{"id": f"d{i}", "text": f"Bulk document {i} about kayaks.", "acl": {"public": True}} for i in range(3)]
    status, out = await _call(rw, "POST", "/admin/documents/acme:bulk?wait=true", {"documents": docs})
    assert status == 200 and out["counts"] == {"added": 3} and [d["status"] for d in out["documents"]] == ["added"] * 3 and out["seq"] > 0
    assert await _ids(rw) == ["d0", "d1", "d2"]
    status, out = await _call(rw, "POST", "/admin/search", {"tenant": "acme", "user": "x", "query": "kayaks"})
    assert sorted(h["doc_id"] for h in out["injected"]) == ["d0", "d1", "d2"]
    docs[0]["acl"] = {"allow_users": ["bob"]}
    docs[1]["text"] = "Bulk document 1, rewritten."
    status, out = await _call(rw, "POST", "/admin/documents/acme:bulk", {"documents": docs})
    assert status == 200 and [d["status"] for d in out["documents"]] == ["acl_updated", "replaced", "unchanged"]


@pytest.mark.parametrize(("body", "status", "param", "rule"), [
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "b", "text": 5}]}, 400, "documents[1].text", "retrieval.admin"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "a", "text": "again"}]}, 400, "documents[1].id", "retrieval.document"),
    ({"documents": [{"id": "a", "text": "ok"}, {"text": "no id"}]}, 400, "documents[1].id", "retrieval.admin"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "b\nc", "text": "x"}]}, 400, "documents[1].id", "retrieval.document"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "b", "text": "x", "acl": {"allow_groups": "eng"}}]}, 400, "documents[1].acl", "retrieval.acl"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "b", "text": "x", "colour": "red"}]}, 400, "documents[1].colour", "retrieval.admin"),
    ({"documents": [{"id": "a", "text": "ok"}, "not an object"]}, 400, "documents[1]", "retrieval.admin"),
    ({"documents": [{"id": f"d{i}", "text": "x"} for i in range(4)]}, 413, "documents", "retrieval.bulk_max_documents"),
    ({"documents": []}, 400, "documents", "retrieval.admin"),
    ({"documents": {"id": "a"}}, 400, "documents", "retrieval.admin"),
    ({"docs": []}, 400, "docs", "retrieval.admin"),
    ({"documents": [{"id": "a", "text": "ok"}, {"id": "big", "text": "x" * 1001}]}, 413, None, "retrieval.max_document_bytes"),
])
async def test_bulk_is_all_or_nothing(rw: RunningWarden, body: dict[str, Any], status: int, param: str | None, rule: str) -> None:
    got, out = await _call(rw, "POST", "/admin/documents/acme:bulk", body)
    assert got == status and out["error"]["param"] == param and f"(rule: {rule})" in out["error"]["message"]
    assert "Traceback" not in out["error"]["message"]
    assert await _ids(rw) == []  # nothing of the batch was written


async def test_bulk_and_wait_refusals(rw: RunningWarden, token: Any) -> None:
    status, out = await _call(rw, "PUT", "/admin/documents/acme/a?wait=maybe", {"text": "x"})
    assert status == 400 and out["error"]["param"] == "wait"
    headers = {"Authorization": f"Bearer {token(tenant='globex', sub='root', scope='warden:admin')}"}
    async with aiohttp.ClientSession(headers=headers) as s, s.post(f"{rw.admin_url}/admin/documents/acme:bulk", json={"documents": []}) as r:
        assert r.status == 403 and "retrieval.admin_tenant" in (await r.json())["error"]["message"]
    async with aiohttp.ClientSession(headers=ADMIN) as s, s.post(f"{rw.admin_url}/admin/documents/acme:bulk", data=b"{not json") as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"


async def test_an_acknowledged_put_is_served_within_the_bound_without_waiting(rw: RunningWarden) -> None:
    t0 = time.monotonic()
    status, out = await _call(rw, "PUT", "/admin/documents/acme/late", {"text": "Served soon: pelicans.", "acl": {"public": True}})
    assert status == 201 and out["seq"] > 0
    while True:
        _, found = await _call(rw, "POST", "/admin/search", {"tenant": "acme", "user": "x", "query": "pelicans"})
        if [h["doc_id"] for h in found["injected"]] == ["late"]:
            break
        assert time.monotonic() - t0 < 2.0, "not served within the 2 s bound"
        await asyncio.sleep(0.01)


class _Probe(Plugin):
    name = "probe"
    reason: str | None = "warming up"

    def ready(self) -> str | None:
        return _Probe.reason


async def test_readyz_asks_every_plugin(warden_factory: WardenFactory) -> None:
    rw = await warden_factory({"plugins": {"enabled": ["headers", "probe"]}}, plugin_classes={"probe": _Probe})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{rw.admin_url}/readyz") as r:
            assert r.status == 503 and await r.json() == {"status": "not ready", "plugin": "probe", "reason": "warming up"}
        _Probe.reason = None
        async with s.get(f"{rw.admin_url}/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"


@pytest.mark.parametrize("on_error", ["fail", "skip"])
async def test_replica_cut_from_postgres_is_not_ready_and_refuses_retrieval(
    warden_factory: WardenFactory, tmp_path: Path, fake: FakeProvider, token: Any, monkeypatch: pytest.MonkeyPatch, on_error: str
) -> None:
    relay = Relay()
    await relay.start()
    async with fresh_schema() as dsn:
        monkeypatch.setenv("WARDEN_TEST_RETRIEVAL_DSN", relay.dsn(schema_of(dsn)))
        try:
            rw = await warden_factory({
                "database": {"dsn_env": "WARDEN_TEST_RETRIEVAL_DSN", "pool_max": 3},
                "plugins": {"enabled": ["headers", "retrieval"]},
                "retrieval": {"store": "postgres", "index_dir": str(tmp_path / "idx"), "embedder": "none", "mode": "bm25",
                              "sync_interval_s": 0.2, "max_lag_s": 1.0, "store_timeout_s": 1.0, "on_error": on_error},
            })
            status, _ = await _call(rw, "PUT", "/admin/documents/acme/hours?wait=true", {"text": "The office opens at nine.", "acl": {"public": True}})
            assert status == 201
            client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "When does the office open?"}])
            assert any("opens at nine" in m["content"] for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system")
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{rw.admin_url}/readyz") as r:
                    assert r.status == 200
                await relay.cut()
                deadline = time.monotonic() + 5
                while True:
                    async with s.get(f"{rw.admin_url}/readyz") as r:
                        body = await r.json()
                        if r.status == 503:
                            break
                    assert time.monotonic() < deadline, "still ready 5 s after losing the store"
                    await asyncio.sleep(0.05)
                assert body["plugin"] == "retrieval" and "max_lag_s" in body["reason"] and "127.0.0.1" not in body["reason"]
            if on_error == "fail":
                with pytest.raises(openai.APIStatusError) as e:
                    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "When does the office open?"}])
                assert e.value.status_code == 503 and "retrieval.on_error" in str(e.value.body)
                assert "127.0.0.1" not in str(e.value.body) and "Error" not in str(e.value.body)  # no host or driver text to the caller
            else:
                out = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "When does the office open?"}])
                assert out.choices[0].message.content
                assert not [m for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system"]
            await relay.restore()
            deadline = time.monotonic() + 5
            async with aiohttp.ClientSession() as s:
                while True:
                    async with s.get(f"{rw.admin_url}/readyz") as r:
                        if r.status == 200:
                            break
                    assert time.monotonic() < deadline, "not ready again 5 s after the store came back"
                    await asyncio.sleep(0.05)
        finally:
            await relay.cut()


async def test_warden_db_migrate_applies_the_retrieval_component(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from llm_warden.proxy.cli import main
    from llm_warden.proxy.db.migrate import registered_components

    assert "retrieval" in registered_components() and "audit" in registered_components()
    async with fresh_schema(migrated=False) as dsn:
        monkeypatch.setenv("WARDEN_TEST_MIGRATE_DSN", dsn)
        code = await asyncio.to_thread(main, ["db", "migrate", "--dsn-env", "WARDEN_TEST_MIGRATE_DSN", "--component", "retrieval"])
        assert code == 0 and "retrieval: schema version 0 -> 1" in capsys.readouterr().out
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT version FROM warden_schema WHERE component = 'retrieval'") == 1
            assert await conn.fetchval("SELECT to_regclass('retrieval_changes') IS NOT NULL")
        finally:
            await conn.close()
    assert os.environ["WARDEN_TEST_MIGRATE_DSN"]
