"""on_tool_call: every decision kind, with the rule and a reason the model can act on."""

from __future__ import annotations

import orjson

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.proxy.exchange import Principal, ToolCall
from tests.plugins.tools.conftest import PluginFactory
from tests.plugins.tools.helpers import BILLING, OUTSIDER, call, exchange, next_turn

GOOD_REFUND = '{"invoice_id": "inv_1", "amount": 25, "reason": "duplicate"}'


async def test_allows_valid_read_and_write_calls(plugin: ToolsPlugin) -> None:
    ex = exchange()
    d = await plugin.on_tool_call(ex, call("lookup", '{"invoice_id": "inv_1"}'))
    assert (d.kind, d.rule) == ("allow", "tools[0]")
    d = await plugin.on_tool_call(ex, call("refund", GOOD_REFUND, "call_2"))
    assert (d.kind, d.rule) == ("allow", "tools[1]")
    assert plugin.metrics()["decisions"][("refund", "allow")] == 1


async def test_unknown_tool_denied_by_default(plugin: ToolsPlugin) -> None:
    d = await plugin.on_tool_call(exchange(), call("drop_database", "{}"))
    assert d.kind == "deny" and d.rule == "policy.unknown_tools"
    assert "'drop_database'" in d.reason and "Do not call it again" in d.reason
    assert plugin.metrics()["decisions"][("(undeclared)", "deny")] == 1


async def test_unknown_tool_allowed_counts_as_write(make_plugin: PluginFactory) -> None:
    plugin, _ = await make_plugin(policy={"unknown_tools": "allow"})
    d = await plugin.on_tool_call(exchange(), call("anything", '{"x": 1}'))
    assert (d.kind, d.rule) == ("allow", "policy.unknown_tools")
    d = await plugin.on_tool_call(exchange(), call("anything", "{broken"))
    assert d.kind == "repair" and d.rule == "tool_call.json"
    await plugin.set_mode(None, True, {"subject": "ops"})
    d = await plugin.on_tool_call(exchange(), call("anything", '{"x": 1}'))
    assert (d.kind, d.rule) == ("deny", "policy.read_only")


async def test_permission_groups_scopes_tenants(plugin: ToolsPlugin) -> None:
    d = await plugin.on_tool_call(exchange(OUTSIDER), call("refund", GOOD_REFUND))
    assert (d.kind, d.rule) == ("deny", "tools[1].allow_groups")
    assert "billing" in d.reason
    d = await plugin.on_tool_call(exchange(BILLING), call("audit_export", "{}"))
    assert (d.kind, d.rule) == ("deny", "tools[3].allow_scopes")
    other_tenant = Principal(tenant="globex", subject="eve", scopes=frozenset({"support:admin"}))
    d = await plugin.on_tool_call(exchange(other_tenant), call("audit_export", "{}"))
    assert (d.kind, d.rule) == ("deny", "tools[3].allow_tenants")
    admin = Principal(tenant="acme", subject="sam", scopes=frozenset({"support:admin"}))
    d = await plugin.on_tool_call(exchange(admin), call("audit_export", "{}"))
    assert d.kind == "allow"
    d = await plugin.on_tool_call(exchange(None), call("refund", GOOD_REFUND))
    assert d.kind == "deny"


async def test_permission_checked_before_arguments(plugin: ToolsPlugin) -> None:
    d = await plugin.on_tool_call(exchange(OUTSIDER), call("refund", "{not json"))
    assert (d.kind, d.rule) == ("deny", "tools[1].allow_groups")


async def test_read_only_global_and_tenant(plugin: ToolsPlugin) -> None:
    await plugin.set_mode(None, True, {"subject": "ops"})
    d = await plugin.on_tool_call(exchange(), call("refund", GOOD_REFUND))
    assert (d.kind, d.rule) == ("deny", "policy.read_only")
    assert "read-only mode is on globally" in d.reason
    assert (await plugin.on_tool_call(exchange(), call("lookup", '{"invoice_id": "i"}'))).kind == "allow"
    await plugin.set_mode("acme", False, {"subject": "ops"})
    assert (await plugin.on_tool_call(exchange(), call("refund", GOOD_REFUND))).kind == "allow"
    await plugin.set_mode(None, False, {"subject": "ops"})
    await plugin.set_mode("acme", True, {"subject": "ops"})
    d = await plugin.on_tool_call(exchange(), call("note", '{"text": "x"}'))
    assert d.kind == "deny" and "for tenant 'acme'" in d.reason
    other = Principal(tenant="globex", subject="x")
    assert (await plugin.on_tool_call(exchange(other), call("note", '{"text": "x"}'))).kind == "allow"


async def test_read_only_is_the_default(make_plugin: PluginFactory) -> None:
    plugin, _ = await make_plugin(policy={"read_only": True})
    d = await plugin.on_tool_call(exchange(), call("note", '{"text": "x"}'))
    assert d.kind == "deny" and "configured default" in d.reason


async def test_json_errors_are_repairs(plugin: ToolsPlugin) -> None:
    d = await plugin.on_tool_call(exchange(), call("lookup", '{"invoice_id": '))
    assert (d.kind, d.rule) == ("repair", "tool_call.json")
    assert "call 'lookup' again" in d.reason
    d = await plugin.on_tool_call(exchange(), call("lookup", "[1, 2]"))
    assert d.kind == "repair" and "JSON object" in d.reason
    d = await plugin.on_tool_call(exchange(), call("lookup", ""))
    assert d.kind == "repair"
    core_parsed = ToolCall(id="c", name="lookup", arguments="{x", parse_error="unexpected character at 1")
    d = await plugin.on_tool_call(exchange(), core_parsed)
    assert d.kind == "repair" and "unexpected character at 1" in d.reason


async def test_schema_errors_listed_with_paths(plugin: ToolsPlugin) -> None:
    bad = {"invoice_id": "", "amount": -5, "reason": "bored", "extra": True}
    d = await plugin.on_tool_call(exchange(), call("refund", orjson.dumps(bad).decode()))
    assert (d.kind, d.rule) == ("repair", "tools[1].schema")
    errors = d.details["errors"] if d.details else []
    assert "/amount: -5 is less than or equal to the minimum of 0" in errors
    assert any(e.startswith("/invoice_id: ") for e in errors)
    assert any(e.startswith("/reason: ") for e in errors)
    assert any(e.startswith("/: ") and "extra" in e for e in errors)
    assert len(errors) == 4
    assert d.reason.startswith("arguments invalid for 'refund': ") and d.reason.endswith("fix and call 'refund' again.")
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "i", "amount": "5"}'))
    assert d.kind == "repair"
    assert "/amount: " in d.reason and "reason" in d.reason
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "i", "amount": true, "reason": "fraud"}'))
    assert d.kind == "repair" and "/amount" in d.reason


def _history(args: str, result: str, name: str = "refund") -> dict:
    return {
        "model": "m",
        "messages": [
            {"role": "user", "content": "refund inv_1"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_old", "type": "function", "function": {"name": name, "arguments": args}}],
            },
            {"role": "tool", "tool_call_id": "call_old", "content": result},
            {"role": "user", "content": "did it work? do it again"},
        ],
    }


async def test_duplicate_mutation_refused_quoting_result(plugin: ToolsPlugin) -> None:
    ex = exchange(body=_history('{"reason": "duplicate", "amount": 25.0, "invoice_id": "inv_1"}', '{"refund_id": "rf_9", "status": "ok"}'))
    await plugin.on_request(ex)
    d = await plugin.on_tool_call(ex, call("refund", GOOD_REFUND))
    assert (d.kind, d.rule) == ("deny", "tools.duplicate")
    assert "rf_9" in d.reason and "call_old" in d.reason
    d = await plugin.on_tool_call(ex, call("refund", '{"invoice_id": "inv_1", "amount": 26, "reason": "duplicate"}', "call_3"))
    assert d.kind == "allow"


async def test_read_calls_may_repeat(plugin: ToolsPlugin) -> None:
    ex = exchange(body=_history('{"invoice_id": "inv_1"}', "found", name="lookup"))
    await plugin.on_request(ex)
    d = await plugin.on_tool_call(ex, call("lookup", '{"invoice_id": "inv_1"}'))
    assert d.kind == "allow"


async def test_same_write_twice_in_one_response(plugin: ToolsPlugin) -> None:
    ex = exchange()
    assert (await plugin.on_tool_call(ex, call("note", '{"text": "a"}', "c1"))).kind == "allow"
    d = await plugin.on_tool_call(ex, call("note", '{ "text" : "a" }', "c2"))
    assert (d.kind, d.rule) == ("deny", "tools.duplicate")
    next_turn(ex)
    assert (await plugin.on_tool_call(ex, call("note", '{"text": "a"}', "c3"))).kind == "allow"


async def test_rate_limit_per_principal(plugin: ToolsPlugin) -> None:
    for i in range(5):
        d = await plugin.on_tool_call(exchange(), call("refund", f'{{"invoice_id": "inv_{i}", "amount": 1, "reason": "other"}}'))
        assert d.kind == "allow"
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "inv_9", "amount": 1, "reason": "other"}'))
    assert (d.kind, d.rule) == ("deny", "tools[1].rate_limit")
    assert "5/minute" in d.reason and "again in" in d.reason
    carol = Principal(tenant="acme", subject="carol", groups=frozenset({"billing"}))
    assert (await plugin.on_tool_call(exchange(carol), call("refund", GOOD_REFUND))).kind == "allow"


async def test_reissue_after_corrective_turn_not_charged_twice(plugin: ToolsPlugin) -> None:
    ex = exchange()
    for i in range(4):
        assert (await plugin.on_tool_call(exchange(), call("refund", f'{{"invoice_id": "x{i}", "amount": 1, "reason": "other"}}'))).kind == "allow"
    assert (await plugin.on_tool_call(ex, call("refund", GOOD_REFUND))).kind == "allow"
    assert (await plugin.on_tool_call(ex, call("lookup", "{}", "c2"))).kind == "repair"
    next_turn(ex)
    assert (await plugin.on_tool_call(ex, call("refund", GOOD_REFUND))).kind == "allow"
    d = await plugin.on_tool_call(exchange(), call("refund", '{"invoice_id": "new", "amount": 1, "reason": "other"}'))
    assert d.kind == "deny" and d.rule == "tools[1].rate_limit"


async def test_exchange_state_lives_on_the_exchange_not_its_request_id(plugin: ToolsPlugin) -> None:
    """Clients choose x-request-id: two concurrent exchanges with the same id share nothing."""
    first, second = exchange(), exchange()
    second.request_id = first.request_id
    await plugin.on_tool_call(first, call("note", '{"text": "a"}'))
    assert plugin._state(first) is not plugin._state(second)
    assert plugin._state(first) is plugin._state(first)
