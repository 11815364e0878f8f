"""[policy] and [[tools]]: validation at load naming the key, and reload."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.tools import PolicyConfig, ToolSpec, ToolsPlugin
from llm_warden.plugins.tools.plugin import decisions_header
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, ToolCall, ToolDecisionRecord
from tests.plugins.tools.helpers import TOOLS, build_config, call, exchange


def with_tool(index: int, **changes: Any) -> list[dict[str, Any]]:
    tools = copy.deepcopy(TOOLS)
    tools[index].update(changes)
    return tools


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"schema": {"type": "object", "properties": {"x": {"type": "strin"}}}}, "tools[1].schema", "tool 'refund': invalid JSON Schema"),
        ({"schema": {"type": "object", "properties": {"x": {"minLength": -1}}}}, "tools[1].schema", "invalid JSON Schema"),
        ({"schema": {"type": "object", "properties": {"x": {"pattern": "("}}}}, "tools[1].schema", "invalid JSON Schema"),
        ({"schema": {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}}, "tools[1].schema", "remote $ref"),
        ({"schema": {"type": "string"}}, "tools[1].schema", 'type = "object"'),
        ({"approval_if": {"type": 5}}, "tools[1].approval_if", "invalid JSON Schema"),
        ({"approval": "none"}, "tools[1].approval_if", "needs approval"),
        ({"rate_limit": "5/fortnight"}, "tools[1].rate_limit", "unknown unit"),
        ({"name": "bad name!"}, "tools[1].name", "not a valid tool name"),
        ({"effect": "delete"}, "tools[1].effect", "must be one of"),
        ({"allow_groups": [""]}, "tools[1].allow_groups", "empty"),
        ({"colour": "red"}, "tools[1].colour", "unknown key"),
    ],
)
def test_invalid_tool_fails_at_load_naming_the_key(tmp_path: Path, changes: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, tools=with_tool(1, **changes))
    assert err.value.key == key
    assert fragment in str(err.value)


def test_missing_schema_and_effect_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, tools=[{"name": "x", "effect": "read"}])
    assert err.value.key == "tools[0].schema"
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, tools=[{"name": "x", "schema": {"type": "object"}}])
    assert err.value.key == "tools[0].effect"


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"max_corrections": -1}, "policy.max_corrections"),
        ({"approval_ttl_s": 0}, "policy.approval_ttl_s"),
        ({"unknown_tools": "maybe"}, "policy.unknown_tools"),
        ({"tool_result_max_bytes": -5}, "policy.tool_result_max_bytes"),
        ({"state_db": ""}, "policy.state_db"),
    ],
)
def test_invalid_policy(tmp_path: Path, policy: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, policy=policy)
    assert err.value.key == key


def test_defaults_and_duplicate_names(tmp_path: Path) -> None:
    assert PolicyConfig().read_only is True and PolicyConfig().unknown_tools == "deny" and PolicyConfig().max_corrections == 2
    cfg = build_config(tmp_path, tools=[*TOOLS, copy.deepcopy(TOOLS[0])])
    with pytest.raises(ConfigError) as err:
        ToolsPlugin(cfg.plugin_sections["policy"], cfg.plugin_sections["tools"])
    assert err.value.key == f"tools[{len(TOOLS)}].name" and "tools[0]" in str(err.value)


async def test_reload_recompiles_and_refuses_bad(make_plugin: Any, tmp_path: Path) -> None:
    plugin, _ = await make_plugin()
    assert (await plugin.on_tool_call(exchange(), call("lookup", '{"invoice_id": "a"}'))).kind == "allow"
    cfg = build_config(tmp_path, tools=with_tool(0, schema={"type": "object", "required": ["customer"], "properties": {"customer": {"type": "string"}}}))
    await plugin.reload(cfg.plugin_sections["policy"], tools=cfg.plugin_sections["tools"])
    d = await plugin.on_tool_call(exchange(), call("lookup", '{"invoice_id": "a"}'))
    assert d.kind == "repair" and "customer" in d.reason
    unvalidated = ToolSpec(name="lookup", effect="read", schema={"type": "object", "properties": {"x": {"type": 12}}})
    with pytest.raises(ConfigError) as err:
        await plugin.reload(cfg.plugin_sections["policy"], tools=[unvalidated])
    assert err.value.key == "tools[0].schema"
    assert (await plugin.on_tool_call(exchange(), call("lookup", '{"customer": "c"}'))).kind == "allow"
    moved = build_config(tmp_path, policy={"state_db": str(tmp_path / "other.db")})
    with pytest.raises(ConfigError):
        await plugin.reload(moved.plugin_sections["policy"], tools=moved.plugin_sections["tools"])
    stricter = build_config(tmp_path, policy={"read_only": True, "max_corrections": 0})
    await plugin.reload(stricter.plugin_sections["policy"])
    ex = exchange()
    await plugin.on_request(ex)
    assert ex.max_corrections == 0
    assert (await plugin.on_tool_call(ex, call("note", '{"text": "t"}'))).kind == "deny"


def test_decisions_header_summary_and_bound() -> None:
    ex = exchange()
    c = ToolCall(id="c1", name="refund", arguments="{}")
    ex.tool_decisions = [
        ToolDecisionRecord(0, c, Decision.hold("tools[1].approval", "r", "apr_123")),
        ToolDecisionRecord(0, ToolCall(id="c2", name="lookup", arguments="{}"), Decision.allow("tools[0]")),
        ToolDecisionRecord(0, ToolCall(id="c3", name="evil\r\nx: y", arguments="{}"), Decision.deny("policy.unknown_tools", "r")),
    ]
    assert decisions_header(ex) == "refund=held:apr_123, lookup=allowed, evil__x__y=denied:policy.unknown_tools"
    ex.tool_decisions = [ToolDecisionRecord(0, c, Decision.repair("tools[1].schema", "r"))] * 200
    header = decisions_header(ex)
    assert len(header) <= 1024 and header.endswith("more") and header.startswith("refund=repair:tools[1].schema")
    ex.tool_decisions = []
    assert decisions_header(ex) == "none"
