"""Trace attributes of an MCP exchange, after the OpenTelemetry MCP semantic conventions (development status).

Span name ``{mcp.method.name} {target}``: the target is the tool's name only
for a tool the policy declares (a caller-chosen name never makes a span name
of unbounded cardinality).  Attributes: ``mcp.method.name``,
``mcp.session.id`` (a digest of the session id, never the id itself),
``mcp.protocol.version``, ``jsonrpc.request.id``, ``network.transport``
(``tcp`` or ``pipe``), ``gen_ai.operation.name = execute_tool`` and
``gen_ai.tool.name`` on ``tools/call``, ``gen_ai.prompt.name`` on
``prompts/get``, ``mcp.resource.uri`` on resource requests, and Warden's
``warden.mcp.server``, ``warden.decision``, ``warden.rule``.
"""

from __future__ import annotations

from typing import Any


def span_name(info: dict[str, Any]) -> str:
    method = str(info.get("method") or "mcp")
    tool = info.get("tool")
    if method == "tools/call" and info.get("governed") and isinstance(tool, str):
        return f"{method} {tool}"
    return method


def attributes(info: dict[str, Any]) -> dict[str, Any]:
    a: dict[str, Any] = {"warden.mcp.server": info.get("server", ""), "network.transport": "pipe" if info.get("transport") == "stdio" else "tcp"}
    if info.get("method"):
        a["mcp.method.name"] = info["method"]
    if info.get("session"):
        a["mcp.session.id"] = info["session"]
    if info.get("protocol_version"):
        a["mcp.protocol.version"] = info["protocol_version"]
    if "jsonrpc_id" in info:
        a["jsonrpc.request.id"] = str(info["jsonrpc_id"])
    if info.get("method") == "tools/call" and info.get("tool"):
        a["gen_ai.operation.name"] = "execute_tool"
        a["gen_ai.tool.name"] = info["tool"]
    for key, attr in (("prompt", "gen_ai.prompt.name"), ("resource_uri", "mcp.resource.uri"), ("decision", "warden.decision"), ("rule", "warden.rule")):
        if info.get(key):
            a[attr] = info[key]
    return a
