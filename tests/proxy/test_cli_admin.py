"""`warden admin ...` against a real running Warden (tools and retrieval on, the scripted demo provider upstream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from llm_warden.proxy.cli import main
from llm_warden.proxy.demo import content
from llm_warden.proxy.demo.provider import DemoProvider
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory

ADMIN_TOKEN = "admin-token-for-the-cli-tests-0123456789"
REFUND_TOOL = {
    "name": "refund", "effect": "write", "approval": "required", "allow_groups": ["billing"],
    "schema": {"type": "object", "required": ["invoice_id", "amount", "reason"], "additionalProperties": False,
               "properties": {"invoice_id": {"type": "string"}, "amount": {"type": "number"}, "reason": {"type": "string"}}},
}


@pytest.fixture
async def demo_upstream() -> AsyncIterator[str]:
    runner = web.AppRunner(DemoProvider().app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/v1"
    await runner.cleanup()


@pytest.fixture
async def running(warden_factory: WardenFactory, demo_upstream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunningWarden:
    monkeypatch.setenv("WARDEN_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    rw = await warden_factory({
        "upstream": {"base_url": demo_upstream, "max_retries": 0},
        "audit": {"enabled": True},
        "plugins": {"enabled": ["retrieval", "tools", "headers"]},
        "retrieval": {"db": str(tmp_path / "index.db"), "index_dir": str(tmp_path / "index"), "mode": "bm25", "embedder": "none"},
        "policy": {"read_only": False, "state_db": str(tmp_path / "state.db")},
        "tools": [REFUND_TOOL],
    })
    monkeypatch.setenv("WARDEN_ADMIN_URL", rw.admin_url)
    monkeypatch.setenv("WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
    return rw


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `warden admin ARGV` (off the event loop the server runs on); exit code, stdout, stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["admin", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_documents_and_search(running: RunningWarden, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"text": "# Travel\n\nMeals are reimbursed up to 50 EUR a day.", "title": "Travel policy", "acl": {"allow_groups": ["staff"]}}
    async with aiohttp.ClientSession() as s, s.put(f"{running.admin_url}/admin/documents/acme/travel.md?wait=true", json=doc,
                                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 201
    code, out, _ = await cli(capsys, "documents", "list", "--tenant", "acme")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["ID", "TITLE", "CHUNKS", "ACL", "INDEXED"]
    assert row.startswith("travel.md") and "Travel policy" in row and '"allow_groups":["staff"]' in row
    code, out, _ = await cli(capsys, "search", "meal allowance", "--tenant", "acme", "--user", "alice", "--group", "staff")
    assert code == 0 and "[1]" in out and "travel.md" in out and "injected" in out
    code, out, _ = await cli(capsys, "search", "meal allowance", "--tenant", "acme", "--user", "mallory", "--json")
    assert code == 0 and orjson.loads(out)["injected"] == []
    code, out, _ = await cli(capsys, "documents", "delete", "acme", "travel.md", "--wait")
    assert (code, out.strip()) == (0, "deleted travel.md from tenant acme")
    code, out, err = await cli(capsys, "documents", "delete", "acme", "travel.md")
    assert code == 1 and out == ""
    assert err.strip() == "warden admin: 404: no document 'travel.md' in tenant 'acme' (rule: retrieval.documents)"
    code, out, _ = await cli(capsys, "index-status")
    assert code == 0 and "documents" in orjson.loads(out)


async def test_an_approval_is_listed_approved_once_and_recorded(running: RunningWarden, capsys: pytest.CaptureFixture[str],
                                                                token: Callable[..., str]) -> None:
    code, out, _ = await cli(capsys, "approvals", "list")
    assert (code, out.strip()) == (0, "(none)")
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": content.REFUND}], "tools": content.TOOLS}
    async with aiohttp.ClientSession() as s, s.post(f"{running.base_url}/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {token(sub='bob', groups=['billing'])}"}) as r:
        assert r.status == 200
        assert "needs a human approval" in (await r.json())["choices"][0]["message"]["content"]
    code, out, _ = await cli(capsys, "approvals", "list")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:5] == ["ID", "STATUS", "TENANT", "USER", "TOOL"]
    approval_id, status, tenant, user, tool = row.split()[:5]
    assert (status, tenant, user, tool) == ("pending", "acme", "bob", "refund")
    assert '{"amount":250,"invoice_id":"INV-1042","reason":"duplicate"}' in row
    code, out, _ = await cli(capsys, "approvals", "approve", approval_id, "--comment", "checked")
    assert code == 0 and out.startswith(f"{approval_id}: approved")
    code, out, _ = await cli(capsys, "approvals", "show", approval_id, "--json")
    shown = orjson.loads(out)
    assert (shown["status"], shown["comment"], shown["reviewer"]["subject"]) == ("approved", "checked", "bootstrap-admin")
    code, out, err = await cli(capsys, "approvals", "deny", approval_id)
    assert code == 1
    assert err.startswith(f"warden admin: 409: approval {approval_id} is approved; only a pending approval can be decided")
    code, out, err = await cli(capsys, "approvals", "approve", "apr_missing")
    assert code == 1 and "404: approval 'apr_missing' not found" in err
    records = await running.warden.audit.search(kind="tools.approval.approve")  # type: ignore[union-attr]
    assert [r["data"]["approval_id"] for r in records] == [approval_id]


async def test_mode_get_and_set_per_tenant(running: RunningWarden, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli(capsys, "mode", "get")
    assert code == 0 and out.startswith("read-only: off globally (set by config; config default off)") and "no tenant overrides" in out
    code, out, _ = await cli(capsys, "mode", "set", "--read-only", "on", "--tenant", "acme")
    assert code == 0
    assert out.splitlines()[1].split() == ["TENANT", "READ-ONLY", "UPDATED", "BY"]
    assert out.splitlines()[2].split()[:2] == ["acme", "on"] and out.splitlines()[2].endswith("bootstrap-admin")
    code, out, _ = await cli(capsys, "mode", "set", "--read-only", "clear", "--tenant", "acme", "--json")
    assert code == 0 and orjson.loads(out)["tenants"] == {}
    with pytest.raises(SystemExit) as refused:  # argparse refuses before anything is sent
        await cli(capsys, "mode", "set", "--read-only", "maybe")
    assert refused.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err


async def test_reload_and_the_errors_of_a_bad_token_or_url(running: RunningWarden, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = await cli(capsys, "reload")  # this in-process server has no config file to re-read: refused, with the reason
    assert (code, out) == (1, "")
    assert err.strip() == "warden admin: 400: config error at '<file>': this server was not started from a config file"
    code, out, err = await cli(capsys, "mode", "get", "--token", "not-the-token-at-all-0123456789")
    assert code == 1 and out == "" and err.startswith("warden admin: 401:")
    code, out, err = await cli(capsys, "mode", "get", "--url", "http://127.0.0.1:9")
    assert code == 2 and err.startswith("warden admin: cannot reach the admin API at http://127.0.0.1:9")
    code, out, err = await cli(capsys, "mode", "get", "--url", "file:///etc/passwd")
    assert code == 2 and "must be http(s)://host:port" in err
    monkeypatch.delenv("WARDEN_ADMIN_TOKEN")
    code, out, err = await cli(capsys, "mode", "get")
    assert code == 2 and "set WARDEN_ADMIN_TOKEN" in err


async def test_limits_usage_per_rule(
    warden_factory: WardenFactory, token: Callable[..., str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ADMIN_TOKEN as BOOTSTRAP
    from tests.proxy.console.conftest import exhaust

    rw = await warden_factory({"plugins": {"enabled": ["limits"]}, "limits": {"rules": [{"scope": "user", "requests": "2/minute", "name": "per-user"}]}})
    await exhaust(rw, token(sub="alice"))
    monkeypatch.setenv("WARDEN_ADMIN_URL", rw.admin_url)
    monkeypatch.setenv("WARDEN_ADMIN_TOKEN", BOOTSTRAP)
    code, out, _ = await cli(capsys, "limits", "--tenant", "acme")
    assert code == 0 and out.splitlines()[0].split() == ["RULE", "SCOPE", "BUDGET", "RATE", "KEY", "USED", "REMAINING", "STATE", "FULL", "AGAIN"]
    assert out.splitlines()[1].split()[:8] == ["per-user", "user", "requests", "2/minute", "acme:alice", "2/2", "0", "EXHAUSTED"]
    code, out, _ = await cli(capsys, "limits", "--json", "--tenant", "acme", "--user", "alice")
    assert code == 0 and orjson.loads(out)["rules"][0]["budgets"][0]["keys"][0]["exhausted"] is True
    code, _, err = await cli(capsys, "limits", "--user", "alice")
    assert code == 1 and "needs 'tenant'" in err
