"""An admin whose token names a tenant manages that tenant only (approvals, mode, reload, index status)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.test_tools_e2e import BIG, BODY, MemoryAudit, audit, fn, tw  # noqa: F401

__all__ = ["audit", "tw"]


async def _admin(tw: Any, bearer: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, tw.admin_url + path, json=body, headers={"Authorization": f"Bearer {bearer}"}) as r:
            return r.status, await r.json()


async def _held_approval(tw: Any, token: Any, fake: FakeProvider) -> str:
    client = openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(tenant="acme", groups=["billing"]), max_retries=0)
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="pending"))
    await client.chat.completions.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    status, listing = await _admin(tw, ADMIN_TOKEN, "GET", "/admin/approvals")
    assert status == 200 and len(listing["data"]) == 1
    return str(listing["data"][0]["id"])


async def test_tenant_admin_cannot_see_or_decide_another_tenants_approval(tw: Any, token: Any, fake: FakeProvider) -> None:
    apr = await _held_approval(tw, token, fake)
    beta = token(tenant="beta", sub="mallory", scope="warden:admin")
    assert (await _admin(tw, beta, "GET", "/admin/approvals"))[1]["data"] == []
    assert (await _admin(tw, beta, "GET", f"/admin/approvals/{apr}"))[0] == 404
    assert (await _admin(tw, beta, "POST", f"/admin/approvals/{apr}/approve", {}))[0] == 404
    status, got = await _admin(tw, ADMIN_TOKEN, "GET", f"/admin/approvals/{apr}")
    assert got["status"] == "pending"
    acme = token(tenant="acme", sub="root", scope="warden:admin")
    assert len((await _admin(tw, acme, "GET", "/admin/approvals"))[1]["data"]) == 1
    assert (await _admin(tw, acme, "POST", f"/admin/approvals/{apr}/approve", {}))[0] == 200


async def test_tenant_admin_sets_only_its_own_mode(tw: Any, token: Any) -> None:
    beta = token(tenant="beta", sub="mallory", scope="warden:admin")
    status, err = await _admin(tw, beta, "PUT", "/admin/mode", {"read_only": False})
    assert status == 403 and "admin.tenant" in err["error"]["message"]
    assert (await _admin(tw, beta, "PUT", "/admin/mode", {"read_only": False, "tenant": "acme"}))[0] == 403
    assert (await _admin(tw, ADMIN_TOKEN, "PUT", "/admin/mode", {"read_only": True, "tenant": "acme"}))[0] == 200
    status, view = await _admin(tw, beta, "PUT", "/admin/mode", {"read_only": True, "tenant": "beta"})
    assert status == 200 and set(view["tenants"]) == {"beta"}
    assert set((await _admin(tw, ADMIN_TOKEN, "GET", "/admin/mode"))[1]["tenants"]) == {"acme", "beta"}


async def test_tenant_admin_cannot_reload_the_config(tw: Any, token: Any) -> None:
    beta = token(tenant="beta", sub="mallory", scope="warden:admin")
    status, err = await _admin(tw, beta, "POST", "/admin/reload")
    assert status == 403 and "admin.tenant" in err["error"]["message"]


async def test_the_person_who_asked_for_a_held_call_cannot_approve_it(tw: Any, token: Any, fake: FakeProvider) -> None:
    # alice of acme is a tenant admin too, and asks for a refund that is held for approval.
    alice = token(tenant="acme", sub="alice", groups=["billing"], scope="warden:admin")
    async with openai.AsyncOpenAI(base_url=tw.base_url, api_key=alice, max_retries=0) as client:
        fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="pending"))
        await client.chat.completions.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    (apr,) = [a["id"] for a in (await _admin(tw, alice, "GET", "/admin/approvals"))[1]["data"]]
    status, err = await _admin(tw, alice, "POST", f"/admin/approvals/{apr}/approve", {"comment": "looks fine to me"})
    assert status == 403 and "tools.approval.self" in err["error"]["message"]
    assert (await _admin(tw, alice, "GET", f"/admin/approvals/{apr}"))[1]["status"] == "pending"
    # Another admin of the tenant may; and the requester may always withdraw (deny) their own.
    bob = token(tenant="acme", sub="bob", scope="warden:admin")
    assert (await _admin(tw, bob, "POST", f"/admin/approvals/{apr}/approve", {}))[0] == 200


async def test_the_requester_may_deny_their_own_held_call(tw: Any, token: Any, fake: FakeProvider) -> None:
    alice = token(tenant="acme", sub="alice", groups=["billing"], scope="warden:admin")
    async with openai.AsyncOpenAI(base_url=tw.base_url, api_key=alice, max_retries=0) as client:
        fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="pending"))
        await client.chat.completions.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    (apr,) = [a["id"] for a in (await _admin(tw, alice, "GET", "/admin/approvals"))[1]["data"]]
    status, got = await _admin(tw, alice, "POST", f"/admin/approvals/{apr}/deny", {"comment": "asked by mistake"})
    assert status == 200 and got["status"] == "denied"
