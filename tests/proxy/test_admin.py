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


async def test_reload_is_all_or_nothing(warden_factory: Any, tmp_path: Any, rsa_keys: Any, fake: Any) -> None:
    """A plugin refusing its new section puts back the sections others already took."""
    over = {"plugins": {"enabled": ["headers", "limits"]}, "headers": {"add": {"x-policy": "old"}}, "limits": {"idempotency_db": str(tmp_path / "i.db")}}
    w = await warden_factory(over)
    headers_plugin = w.warden.chain.get("headers")

    def config_text(policy: str, backend: str) -> str:
        return f"""
[upstream]
base_url = "{fake.base_url}"
api_key_env = "WARDEN_TEST_PROVIDER_KEY"
[auth]
algorithms = ["RS256"]
issuer = "https://issuer.test"
audience = "warden-test"
public_key_file = "{rsa_keys.public_path}"
[audit]
enabled = false
[plugins]
enabled = ["headers", "limits"]
[headers]
add = {{ x-policy = "{policy}" }}
[limits]
backend = "{backend}"
idempotency_db = "{tmp_path / 'i.db'}"
"""

    path = tmp_path / "config.toml"
    path.write_text(config_text("new", "redis"))  # limits refuses a backend change without restart
    result = await w.warden.reload(str(path))
    assert result["result"] == "refused" and "limits" in result["error"]
    assert headers_plugin.section.add == {"x-policy": "old"}, "headers got its running section back"
    path.write_text(config_text("new", "memory"))
    assert (await w.warden.reload(str(path)))["result"] == "applied"
    assert headers_plugin.section.add == {"x-policy": "new"}
