"""on_request: fencing offered tools, tool_choice, legacy functions, tool results, runtime mode flips."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.proxy.errors import BadRequest, Forbidden
from tests.plugins.tools.conftest import PluginFactory
from tests.plugins.tools.helpers import LOOKUP_SCHEMA, OUTSIDER, REFUND_SCHEMA, exchange


def fn(name: str, parameters: dict[str, Any] | None = None, description: str = "app description") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters or {"type": "object"}}}


def body(*tools: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": list(tools), **extra}


def names(b: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] for t in b.get("tools", [])]


async def test_sets_max_corrections(plugin: ToolsPlugin) -> None:
    ex = exchange()
    await plugin.on_request(ex)
    assert ex.max_corrections == 2
    assert not ex.body_modified


async def test_registry_schema_replaces_the_applications(plugin: ToolsPlugin) -> None:
    sent = body(fn("lookup", {"type": "object", "properties": {"invoice_id": {"type": "integer"}}}), fn("refund"))
    original = copy.deepcopy(sent)
    ex = exchange(body=sent)
    await plugin.on_request(ex)
    assert ex.body_modified and ex.body is not None
    lookup, refund = ex.body["tools"]
    assert lookup["function"]["parameters"] == LOOKUP_SCHEMA
    assert lookup["function"]["description"] == "Look up an invoice."
    assert refund["function"]["parameters"] == REFUND_SCHEMA
    assert refund["function"]["description"] == "app description"
    assert sent == original, "the application's parsed body must not be mutated in place"


async def test_unchanged_body_is_not_rewritten(plugin: ToolsPlugin) -> None:
    ex = exchange(body=body(fn("lookup", LOOKUP_SCHEMA, "Look up an invoice."), tool_choice="auto"))
    await plugin.on_request(ex)
    assert not ex.body_modified


async def test_removes_forbidden_unknown_and_write_tools(plugin: ToolsPlugin) -> None:
    await plugin.set_mode(None, True, {"subject": "ops"})
    ex = exchange(OUTSIDER, body(fn("lookup"), fn("refund"), fn("note"), fn("shell"), fn("audit_export")))
    await plugin.on_request(ex)
    assert ex.body is not None and names(ex.body) == ["lookup"]
    assert {name: rule for name, (rule, _) in ex.tools_withheld.items()} == {
        "refund": "tools[1].allow_groups",
        "note": "policy.read_only",
        "shell": "policy.unknown_tools",
        "audit_export": "tools[3].allow_scopes",
    }


async def test_read_only_flip_takes_effect_on_next_request(plugin: ToolsPlugin) -> None:
    await plugin.set_mode(None, True, {"subject": "ops"})
    ex = exchange(body=body(fn("lookup"), fn("note")))
    await plugin.on_request(ex)
    assert ex.body is not None and names(ex.body) == ["lookup"]
    await plugin.set_mode(None, False, {"subject": "ops"})
    ex = exchange(body=body(fn("lookup"), fn("note")))
    await plugin.on_request(ex)
    assert ex.body is not None and names(ex.body) == ["lookup", "note"]
    await plugin.set_mode("acme", True, {"subject": "ops"})
    ex = exchange(body=body(fn("lookup"), fn("note")))
    await plugin.on_request(ex)
    assert ex.body is not None and names(ex.body) == ["lookup"]
    await plugin.set_mode("acme", None, {"subject": "ops"})
    ex = exchange(body=body(fn("lookup"), fn("note")))
    await plugin.on_request(ex)
    assert ex.body is not None and names(ex.body) == ["lookup", "note"]


async def test_unknown_tools_allowed_keep_their_schema(make_plugin: PluginFactory) -> None:
    plugin, _ = await make_plugin(policy={"unknown_tools": "allow"})
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    ex = exchange(body=body(fn("search", schema)))
    await plugin.on_request(ex)
    assert not ex.body_modified


async def test_tool_choice_forcing_a_removed_tool_is_forbidden(plugin: ToolsPlugin) -> None:
    ex = exchange(OUTSIDER, body(fn("lookup"), fn("refund"), tool_choice={"type": "function", "function": {"name": "refund"}}))
    with pytest.raises(Forbidden) as err:
        await plugin.on_request(ex)
    assert err.value.status == 403 and err.value.rule == "tools[1].allow_groups"
    assert "refund" in err.value.to_dict()["error"]["message"]
    assert err.value.param == "tool_choice"


async def test_tool_choice_naming_an_absent_tool_is_bad_request(plugin: ToolsPlugin) -> None:
    ex = exchange(body=body(fn("lookup"), tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(BadRequest):
        await plugin.on_request(ex)


async def test_every_tool_removed(plugin: ToolsPlugin) -> None:
    ex = exchange(OUTSIDER, body(fn("refund"), tool_choice="auto", parallel_tool_calls=True))
    await plugin.on_request(ex)
    assert ex.body is not None
    assert "tools" not in ex.body and "tool_choice" not in ex.body and "parallel_tool_calls" not in ex.body
    ex = exchange(OUTSIDER, body(fn("refund"), tool_choice="required"))
    with pytest.raises(Forbidden) as err:
        await plugin.on_request(ex)
    assert err.value.rule == "tools[1].allow_groups"


async def test_legacy_functions_fenced_the_same_way(plugin: ToolsPlugin) -> None:
    legacy = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "functions": [{"name": "lookup", "parameters": {"type": "object"}}, {"name": "shell", "parameters": {}}],
    }
    ex = exchange(body=legacy)
    await plugin.on_request(ex)
    assert ex.body is not None and ex.body["functions"] == [{"name": "lookup", "parameters": LOOKUP_SCHEMA, "description": "Look up an invoice."}]
    forced = dict(legacy, function_call={"name": "shell"})
    with pytest.raises(Forbidden) as err:
        await plugin.on_request(exchange(body=forced))
    assert err.value.rule == "policy.unknown_tools" and err.value.param == "function_call"


async def test_malformed_tools_refused_clearly(plugin: ToolsPlugin) -> None:
    with pytest.raises(BadRequest):
        await plugin.on_request(exchange(body={"model": "m", "tools": "lookup"}))
    with pytest.raises(BadRequest):
        await plugin.on_request(exchange(body={"model": "m", "tools": [42]}))
    await plugin.on_request(exchange(body={"model": "m", "messages": [None, 3, {"role": "tool"}]}))


def _conversation(result: str) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [
            {"role": "user", "content": "look up inv_1, then refund"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"invoice_id":"inv_1"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "old result"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "refund", "arguments": '{"invoice_id":"inv_1","amount":5,"reason":"fraud"}'}},
                    {"id": "c3", "type": "function", "function": {"name": "lookup", "arguments": '{"invoice_id":"inv_2"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "c2", "content": result},
            {"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": "inv_2 "}, {"type": "text", "text": "found"}]},
            {"role": "tool", "tool_call_id": "ghost", "content": "orphan"},
        ],
    }


async def test_tool_results_linked_and_truncated(make_plugin: PluginFactory) -> None:
    plugin, _ = await make_plugin(policy={"tool_result_max_bytes": 10})
    ex = exchange(body=_conversation("é" * 20))
    await plugin.on_request(ex)
    refund, lookup, orphan = ex.tool_results
    assert refund["tool_call_id"] == "c2" and refund["name"] == "refund" and refund["linked"]
    assert refund["arguments"] == '{"amount":5,"invoice_id":"inv_1","reason":"fraud"}'
    assert refund["bytes"] == 40 and refund["truncated"] and refund["content"] == "é" * 5
    assert lookup["content"] == "inv_2 foun" and lookup["bytes"] == 11
    assert orphan["tool_call_id"] == "ghost" and not orphan["linked"] and orphan["name"] is None


async def test_legacy_function_results_linked(plugin: ToolsPlugin) -> None:
    ex = exchange(
        body={
            "model": "m",
            "messages": [
                {"role": "assistant", "function_call": {"name": "lookup", "arguments": '{"invoice_id": "i"}'}},
                {"role": "function", "name": "lookup", "content": "found"},
            ],
        }
    )
    await plugin.on_request(ex)
    (res,) = ex.tool_results
    assert res["name"] == "lookup" and res["linked"] and res["content"] == "found"
