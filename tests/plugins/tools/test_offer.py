"""What the MCP gateway may show of a tool: the registry, the principal's permissions and read-only mode."""

from __future__ import annotations

import pytest

from plugins.tools.config import ToolRegistry, ToolSpec
from plugins.tools.offer import offer
from plugins.tools.policy import ModeState
from proxy.errors import ConfigError
from proxy.exchange import Principal

SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}}
REGISTRY = ToolRegistry(
    [
        ToolSpec(name="crm.lookup", effect="read", schema=SCHEMA, description="Policy text."),
        ToolSpec(name="crm.refund", effect="write", schema=SCHEMA, allow_groups=["support"]),
        ToolSpec(name="lookup", effect="read", schema=SCHEMA),
    ]
)
STAFF = Principal("acme", "alice", frozenset({"staff"}))
SUPPORT = Principal("acme", "bob", frozenset({"support"}))


def test_undeclared_tools_are_hidden_even_when_unknown_tools_are_allowed() -> None:
    o = offer(REGISTRY, ModeState(False), STAFF, "crm.delete")
    assert not o.allowed and o.rule == "policy.unknown_tools"
    # A chat tool of the same name does not govern the MCP server's tool.
    assert offer(REGISTRY, ModeState(False), STAFF, "crm.lookup").allowed
    assert REGISTRY.get("crm.lookup") is not REGISTRY.get("lookup")


def test_permissions_and_read_only() -> None:
    assert offer(REGISTRY, ModeState(False), STAFF, "crm.refund").rule == "tools[1].allow_groups"
    o = offer(REGISTRY, ModeState(False), SUPPORT, "crm.refund")
    assert o.allowed and o.effect == "write" and o.schema == SCHEMA
    o = offer(REGISTRY, ModeState(True), SUPPORT, "crm.refund")
    assert not o.allowed and o.rule == "policy.read_only"
    o = offer(REGISTRY, ModeState(True), STAFF, "crm.lookup")
    assert o.allowed and o.effect == "read" and o.description == "Policy text."


def test_mcp_tool_names() -> None:
    for bad in ("CRM.lookup", "crm.", ".lookup", "a.b.c", "crm.look up"):
        with pytest.raises(ConfigError) as e:
            ToolRegistry([ToolSpec(name=bad, effect="read", schema=SCHEMA)])
        assert e.value.key == "tools[0].name", bad
