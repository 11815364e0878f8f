"""Helpers for the tools plugin tests: the registry used everywhere, principals, exchanges, calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.proxy.config import load_config
from llm_warden.proxy.exchange import Exchange, Principal, ToolCall, UpstreamTurn

REFUND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["invoice_id", "amount", "reason"],
    "additionalProperties": False,
    "properties": {
        "invoice_id": {"type": "string", "minLength": 1},
        "amount": {"type": "number", "exclusiveMinimum": 0},
        "reason": {"enum": ["duplicate", "fraud", "customer_request", "other"]},
    },
}

LOOKUP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["invoice_id"],
    "additionalProperties": False,
    "properties": {"invoice_id": {"type": "string", "minLength": 1}},
}

TOOLS: list[dict[str, Any]] = [
    {"name": "lookup", "effect": "read", "schema": LOOKUP_SCHEMA, "description": "Look up an invoice."},
    {
        "name": "refund",
        "effect": "write",
        "approval": "required",
        "approval_if": {"properties": {"amount": {"exclusiveMinimum": 100}}},
        "allow_groups": ["billing"],
        "rate_limit": "5/minute",
        "schema": REFUND_SCHEMA,
    },
    {
        "name": "note",
        "effect": "write",
        "schema": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}, "additionalProperties": False},
    },
    {"name": "audit_export", "effect": "read", "allow_scopes": ["support:admin"], "allow_tenants": ["acme"], "schema": {"type": "object"}},
    {"name": "wire", "effect": "write", "approval": "required", "schema": {"type": "object"}},
]

BILLING = Principal(tenant="acme", subject="alice", groups=frozenset({"billing"}), scopes=frozenset({"chat"}))
OUTSIDER = Principal(tenant="acme", subject="bob", groups=frozenset({"sales"}), scopes=frozenset({"chat"}))


class AuditRecorder:
    """Collects admin-action records as the core's audit sink would receive them."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    async def __call__(self, action: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        self.records.append((action, actor, data))


def warden_overrides(tmp_path: Path, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """Config overrides that run a Warden with the tools plugin (read-write, SQLite state under ``tmp_path``)."""
    return {
        "plugins": {"enabled": ["tools", "headers"]},
        "policy": {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0},
        "tools": tools,
    }


REFUND_V1: dict[str, Any] = {
    "name": "refund",
    "version": 1,
    "function_name": "refund",
    "deprecated": "2027-01-31",
    "replacement": "refund@2",
    "effect": "write",
    "allow_groups": ["billing"],
    "schema": REFUND_SCHEMA,
}
"""Version 1 of ``refund``, deprecated at 2027-01-31 00:00 UTC for ``refund@2`` (called ``refund_v2``)."""


def build_config(tmp_path: Path, policy: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> Any:
    pol = {"state_db": str(tmp_path / "state.db"), "mode_refresh_s": 0, "read_only": False}
    pol.update(policy or {})
    return load_config({"plugins": {"enabled": ["tools"]}, "policy": pol, "tools": TOOLS if tools is None else tools}, {"tools": ToolsPlugin})


_counter = iter(range(1, 10**9))


def exchange(principal: Principal | None = BILLING, body: dict[str, Any] | None = None, turn: int = 0) -> Exchange:
    ex = Exchange(request_id=f"req_{next(_counter)}", route="chat", method="POST", path="/v1/chat/completions", principal=principal)
    ex.body = body if body is not None else {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ex.turns.append(UpstreamTurn(index=turn, body=b""))
    return ex


def call(name: str, arguments: str, call_id: str = "call_1") -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=arguments)


def next_turn(ex: Exchange) -> None:
    ex.turns.append(UpstreamTurn(index=len(ex.turns), body=b""))
