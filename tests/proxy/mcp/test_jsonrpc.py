"""JSON-RPC classification and the allow-lists, both ways."""

from __future__ import annotations

from typing import Any

import pytest

from llm_warden.proxy.mcp.jsonrpc import McpRefusal, classify, server_message_refusal


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, "request"),
        ({"jsonrpc": "2.0", "id": "a", "method": "tools/call", "params": {"name": "x"}}, "request"),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, "notification"),
        ({"jsonrpc": "2.0", "id": 3, "result": {}}, "response"),
        ({"jsonrpc": "2.0", "id": 3, "error": {"code": 1, "message": "no"}}, "response"),
    ],
)
def test_valid(body: dict[str, Any], kind: str) -> None:
    assert classify(body).kind == kind


@pytest.mark.parametrize(
    ("body", "rule", "code"),
    [
        ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": None, "method": "ping"}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 2**60, "method": "ping"}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "ping", "extra": 1}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}, "mcp.jsonrpc", -32602),
        ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "result": {}}, "mcp.jsonrpc", -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks/get"}, "mcp.methods", -32601),
        ({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"}, "mcp.methods", -32601),
        ({"jsonrpc": "2.0", "method": "notifications/message"}, "mcp.methods", -32601),
    ],
)
def test_refused(body: dict[str, Any], rule: str, code: int) -> None:
    with pytest.raises(McpRefusal) as e:
        classify(body)
    assert e.value.rule == rule and e.value.rpc_code == code


@pytest.mark.parametrize(
    ("msg", "passes"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "elicitation/create", "params": {}}, True),
        ({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}}, True),
        ({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}, True),
        ({"jsonrpc": "2.0", "id": 1, "result": {}}, True),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}, False),
        ({"jsonrpc": "2.0", "id": True, "method": "ping"}, False),
        ({"jsonrpc": "2.0", "method": "notifications/evil"}, False),
        ([{"jsonrpc": "2.0", "id": 1, "result": {}}], False),
        ({"jsonrpc": "2.0", "id": 1}, False),
        ("text", False),
    ],
)
def test_server_messages(msg: Any, passes: bool) -> None:
    assert (server_message_refusal(msg) is None) is passes
