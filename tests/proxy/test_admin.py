"""The admin plane: open probes, admin auth on /admin/*."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN


async def test_probes_are_open_and_ready(warden: Any) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{warden.admin_url}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{warden.admin_url}/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        warden.warden.draining = True
        async with s.get(f"{warden.admin_url}/readyz") as r:
            assert r.status == 503
        warden.warden.draining = False


async def test_admin_api_needs_an_admin(warden: Any, token: Any) -> None:
    url = f"{warden.admin_url}/admin/reload"
    async with aiohttp.ClientSession() as s:
        async with s.post(url) as r:
            assert r.status == 401 and "admin.auth" in (await r.json())["error"]["message"]
        async with s.post(url, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 403 and "admin.scope" in (await r.json())["error"]["message"]
        async with s.post(url, headers={"Authorization": "Bearer wrong-admin-token-000000000000"}) as r:
            assert r.status == 401
        # The server was not started from a file: reload is refused, but the admin got through.
        async with s.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 400
            assert "not started from a config file" in (await r.json())["error"]
        async with s.get(f"{warden.admin_url}/admin/nope", headers={"Authorization": f"Bearer {token(scope='warden:admin')}"}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_auth_none_mode_uses_dev_principal(warden_factory: Any, fake: Any) -> None:
    w = await warden_factory({"auth": {"mode": "none", "dev_tenant": "local", "dev_subject": "me"}})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            assert r.headers["x-warden-principal"] == "local/me"
