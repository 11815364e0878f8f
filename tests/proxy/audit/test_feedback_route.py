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
