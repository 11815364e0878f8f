"""``POST /v1/feedback`` through the server: recorded for the tenant, refused across tenants."""

from __future__ import annotations

from typing import Any

import aiohttp


async def test_feedback_route(warden_factory: Any, token: Any, tmp_path: Any) -> None:
    w = await warden_factory({"audit": {"enabled": True, "path": str(tmp_path / "audit.db"), "signing_key_file": ""}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        h = {"Authorization": f"Bearer {token(tenant='acme', sub='alice')}"}
        async with s.post(f"{w.base_url}/chat/completions", json=body, headers=h) as r:
            rid = r.headers["x-request-id"]
        async with s.post(f"{w.base_url}/feedback", json={"request_id": rid, "rating": 1, "comment": "good"}, headers=h) as r:
            assert r.status == 200, await r.text()
        other = {"Authorization": f"Bearer {token(tenant='globex', sub='mallory')}"}
        async with s.post(f"{w.base_url}/feedback", json={"request_id": rid, "rating": -1}, headers=other) as r:
            assert r.status == 404
        async with s.post(f"{w.base_url}/feedback", json={"request_id": rid, "rating": "five"}, headers=h) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "rating"
    rows = await w.warden.audit.search(kind="feedback")
    assert len(rows) == 1, "the refused ones are not recorded as feedback"
    assert rows[0]["actor"]["subject"] == "alice" and rows[0]["data"]["request_id"] == rid and rows[0]["data"]["rating"] == 1


async def test_feedback_without_audit_is_503(warden: Any, token: Any) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{warden.base_url}/feedback", json={"request_id": "x", "rating": 1}, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 503
            assert "audit.enabled" in (await r.json())["error"]["message"]


async def test_reused_request_id_across_tenants(warden_factory: Any, token: Any, tmp_path: Any) -> None:
    """Request ids are chosen by clients: B reusing A's id neither hides A's exchange nor lets B's feedback land on it."""
    w = await warden_factory({"audit": {"enabled": True, "path": str(tmp_path / "audit.db")}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    a = {"Authorization": f"Bearer {token(tenant='acme', sub='alice')}", "x-request-id": "shared-id-1"}
    b = {"Authorization": f"Bearer {token(tenant='globex', sub='bob')}", "x-request-id": "shared-id-1"}
    async with aiohttp.ClientSession() as s:
        for h in (a, b):
            async with s.post(f"{w.base_url}/chat/completions", json=body, headers=h) as r:
                assert r.status == 200
        async with s.post(f"{w.base_url}/feedback", json={"request_id": "shared-id-1", "rating": 1}, headers={"Authorization": a["Authorization"]}) as r:
            assert r.status == 200, await r.text()
        async with s.post(f"{w.base_url}/feedback", json={"request_id": "shared-id-1", "rating": -1}, headers={"Authorization": b["Authorization"]}) as r:
            assert r.status == 200, await r.text()
    rows = await w.warden.audit.search(kind="feedback")
    by_tenant = {r["actor"]["tenant"]: r["data"] for r in rows}
    assert by_tenant["acme"]["requester"] == "alice" and by_tenant["globex"]["requester"] == "bob"
