"""Approval lifecycle: hold, approve, the same call passing once, expiry, deny, restart."""

from __future__ import annotations

import asyncio

import pytest

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.plugins.tools.canonical import canonical_json, fingerprint
from tests.plugins.tools.conftest import PluginFactory
from tests.plugins.tools.helpers import BILLING, call, exchange, next_turn

BIG_REFUND = '{"invoice_id": "inv_7", "amount": 500, "reason": "fraud"}'
REVIEWER = {"tenant": "ops", "subject": "rita", "groups": [], "scopes": ["warden:admin"]}


async def test_hold_records_a_pending_approval(plugin: ToolsPlugin) -> None:
    ex = exchange()
    d = await plugin.on_tool_call(ex, call("refund", BIG_REFUND))
    assert d.kind == "hold" and d.rule == "tools[1].approval_if"
    assert d.approval_id and d.approval_id.startswith("apr_")
    assert f"Approval {d.approval_id} was requested" in d.reason and "NOT executed" in d.reason
    assert plugin.metrics()["approvals_pending"] == 1
    store = plugin.store_required()
    (apr,) = await store.list("pending")
    assert apr.id == d.approval_id
    assert apr.tool == "refund" and apr.request_id == ex.request_id
    assert apr.arguments == canonical_json({"invoice_id": "inv_7", "amount": 500, "reason": "fraud"})
    assert apr.fingerprint == fingerprint("acme", "alice", "refund", apr.arguments)
    assert apr.principal == BILLING.summary()
    assert apr.expires == pytest.approx(apr.created + 3600)


async def test_approval_if_not_matched_passes_without_approval(plugin: ToolsPlugin) -> None:
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "inv_7", "amount": 100, "reason": "fraud"}'))
    assert (d.kind, d.rule) == ("allow", "tools[1]")


async def test_repeat_while_pending_keeps_the_same_approval(plugin: ToolsPlugin) -> None:
    first = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    again = await plugin.on_tool_call(exchange(), call("refund", '{"amount": 500.0, "reason": "fraud", "invoice_id": "inv_7"}'))
    assert again.kind == "hold" and again.approval_id == first.approval_id
    assert "still pending" in again.reason
    assert len(await plugin.store_required().list("pending")) == 1


async def test_approved_call_passes_once(plugin: ToolsPlugin) -> None:
    held = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    store = plugin.store_required()
    assert held.approval_id
    assert await store.decide(held.approval_id, "approved", REVIEWER, "ok", 3600)
    ex = exchange()
    d = await plugin.on_tool_call(ex, call("refund", BIG_REFUND))
    assert d.kind == "allow" and d.approval_id == held.approval_id
    apr = await store.get(held.approval_id)
    assert apr is not None and apr.status == "consumed" and apr.consumed_request_id == ex.request_id
    again = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert again.kind == "hold" and again.approval_id != held.approval_id


async def test_other_user_cannot_use_an_approval(plugin: ToolsPlugin) -> None:
    from llm_warden.proxy.exchange import Principal

    held = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.approval_id
    await plugin.store_required().decide(held.approval_id, "approved", REVIEWER, "", 3600)
    mallory = Principal(tenant="acme", subject="mallory", groups=frozenset({"billing"}))
    d = await plugin.on_tool_call(exchange(mallory), call("refund", BIG_REFUND))
    assert d.kind == "hold" and d.approval_id != held.approval_id
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "inv_7", "amount": 501, "reason": "fraud"}'))
    assert d.kind == "hold"
    assert (await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))).kind == "allow"


async def test_consumed_approval_reused_within_the_same_exchange_only(plugin: ToolsPlugin) -> None:
    held = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.approval_id
    await plugin.store_required().decide(held.approval_id, "approved", REVIEWER, "", 3600)
    ex = exchange()
    assert (await plugin.on_tool_call(ex, call("refund", BIG_REFUND))).kind == "allow"
    assert (await plugin.on_tool_call(ex, call("lookup", "{}", "c2"))).kind == "repair"
    next_turn(ex)
    d = await plugin.on_tool_call(ex, call("refund", BIG_REFUND))
    assert d.kind == "allow" and d.approval_id == held.approval_id
    assert (await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))).kind == "hold"


async def test_denied_approval_tells_the_model(plugin: ToolsPlugin) -> None:
    held = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.approval_id
    assert await plugin.store_required().decide(held.approval_id, "denied", REVIEWER, "amount too high", 3600)
    d = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert d.kind == "deny" and d.approval_id == held.approval_id
    assert "denied" in d.reason and "amount too high" in d.reason


async def test_expired_approval_is_replaced(make_plugin: PluginFactory) -> None:
    plugin, _ = await make_plugin(policy={"approval_ttl_s": 0.2})
    held = await plugin.on_tool_call(exchange(), call("wire", '{"to": "x"}'))
    assert held.kind == "hold" and held.rule == "tools[4].approval"
    await asyncio.sleep(0.25)
    store = plugin.store_required()
    assert held.approval_id
    assert not await store.decide(held.approval_id, "approved", REVIEWER, "", 0.2)
    assert [a.id for a in await store.list("expired")] == [held.approval_id]
    again = await plugin.on_tool_call(exchange(), call("wire", '{"to": "x"}'))
    assert again.kind == "hold" and again.approval_id != held.approval_id
    assert f"earlier approval {held.approval_id} expired" in again.reason
    assert again.approval_id
    assert await store.decide(again.approval_id, "approved", REVIEWER, "", 0.2)
    await asyncio.sleep(0.25)
    late = await plugin.on_tool_call(exchange(), call("wire", '{"to": "x"}'))
    assert late.kind == "hold"


async def test_approvals_survive_restart(make_plugin: PluginFactory) -> None:
    first, _ = await make_plugin()
    held = await first.on_tool_call(exchange(), call("refund", BIG_REFUND))
    await first.stop()
    second, _ = await make_plugin()
    assert second.metrics()["approvals_pending"] == 1
    assert held.approval_id
    assert await second.store_required().decide(held.approval_id, "approved", REVIEWER, "", 3600)
    await second.stop()
    third, _ = await make_plugin()
    d = await third.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert d.kind == "allow" and d.approval_id == held.approval_id


async def test_consume_happens_once_under_concurrency(make_plugin: PluginFactory) -> None:
    a, _ = await make_plugin()
    b, _ = await make_plugin()
    held = await a.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.approval_id
    await a.store_required().decide(held.approval_id, "approved", REVIEWER, "", 3600)
    results = await asyncio.gather(*(p.on_tool_call(exchange(), call("refund", BIG_REFUND)) for p in (a, b, a, b)))
    assert sorted(d.kind for d in results) == ["allow", "hold", "hold", "hold"]


async def test_store_failure_fails_closed(plugin: ToolsPlugin) -> None:
    await plugin.store_required().db.close()
    d = await plugin.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert (d.kind, d.rule) == ("deny", "tools.approval_store")
    assert "NOT executed" in d.reason


async def test_other_process_mode_change_is_picked_up(make_plugin: PluginFactory) -> None:
    a, _ = await make_plugin(policy={"mode_refresh_s": 0.05})
    b, _ = await make_plugin(policy={"mode_refresh_s": 0.05})
    await a.set_mode("acme", True, {"subject": "ops"})
    held = await a.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.kind == "deny"
    for _ in range(40):
        await asyncio.sleep(0.05)
        if b.mode.read_only_for("acme")[0]:
            break
    assert b.mode.read_only_for("acme") == (True, "for tenant 'acme'")
    assert (await b.on_tool_call(exchange(), call("note", '{"text": "x"}'))).kind == "deny"
