"""What the MCP gateway may show of a tool: the entry of (name, server), the principal's permissions, read-only mode, versions."""

from __future__ import annotations

from llm_warden.plugins.tools.check import ToolPolicy
from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.offer import offer
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.proxy.exchange import Principal
from llm_warden.proxy.tooling import parse_call

SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}}
BEFORE, AFTER = 1_790_000_000.0, 1_900_000_000.0  # around the sunset 2027-01-31
SPECS = [
    ToolSpec(name="lookup", server="crm", effect="read", schema=SCHEMA, description="Policy text."),
    ToolSpec(name="refund", server="crm", effect="write", schema=SCHEMA, allow_groups=["support"]),
    ToolSpec(name="lookup", effect="read", schema=SCHEMA),
    ToolSpec(name="contacts/find.v1", server="crm", effect="read", schema=SCHEMA, deprecated="2027-01-31", replacement="lookup"),
]
STAFF = Principal("acme", "alice", frozenset({"staff"}))
SUPPORT = Principal("acme", "bob", frozenset({"support"}))


def policy(unknown_tools: str = "deny", now: float = BEFORE) -> ToolPolicy:
    return ToolPolicy(ToolRegistry(SPECS), PolicyConfig(read_only=False, unknown_tools=unknown_tools), clock=lambda: now)  # type: ignore[arg-type]


def test_undeclared_tools_are_hidden_even_when_unknown_tools_are_allowed() -> None:
    for p in (policy("deny"), policy("allow")):
        o = offer(p, ModeState(False), STAFF, "delete", "crm")
        assert not o.allowed and o.rule == "policy.unknown_tools"
    assert offer(policy(), ModeState(False), STAFF, "lookup", "crm").allowed
    # A chat tool of the same name is not the MCP server's tool, nor is another server's.
    assert not offer(policy(), ModeState(False), STAFF, "lookup", "erp").allowed
    assert offer(policy(), ModeState(False), STAFF, "crm.lookup", "crm").rule == "policy.unknown_tools"


def test_permissions_and_read_only() -> None:
    assert offer(policy(), ModeState(False), STAFF, "refund", "crm").rule == "tools[1].allow_groups"
    o = offer(policy(), ModeState(False), SUPPORT, "refund", "crm")
    assert o.allowed and o.effect == "write" and o.schema == SCHEMA and o.deprecation is None
    o = offer(policy(), ModeState(True), SUPPORT, "refund", "crm")
    assert not o.allowed and o.rule == "policy.read_only"
    o = offer(policy(), ModeState(True), STAFF, "lookup", "crm")
    assert o.allowed and o.effect == "read" and o.description == "Policy text."


def test_a_deprecated_version_is_offered_with_its_note_until_the_sunset() -> None:
    o = offer(policy(), ModeState(False), STAFF, "contacts/find.v1", "crm")
    assert o.allowed and o.deprecation is not None
    assert o.deprecation["sunset"] == "2027-01-31" and o.deprecation["replacement"] == "lookup" and not o.deprecation["retired"]
    assert str(o.deprecation["note"]).startswith("DEPRECATED: this tool (contacts/find.v1) stops working at 2027-01-31")
    o = offer(policy(now=AFTER), ModeState(False), STAFF, "contacts/find.v1", "crm")
    assert not o.allowed and o.rule == "tools[3].deprecated" and "retired" in o.reason
    assert o.deprecation is not None and o.deprecation["retired"]


def test_a_call_of_an_undeclared_mcp_tool_is_refused_even_when_unknown_tools_are_allowed() -> None:
    p = policy("allow")
    call = parse_call("c", "delete", "{}", 0)
    assert p.verdict(STAFF, call, lambda _t: (False, ""), "crm").rule == "policy.unknown_tools"
    assert p.verdict(STAFF, call, lambda _t: (False, "")).kind == "allow", "a chat function follows unknown_tools"
