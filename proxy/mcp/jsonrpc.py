"""JSON-RPC 2.0 as MCP uses it: classify a message, allow-list its method, build replies.

Warden relays the handshake era of MCP (protocol revisions 2024-11-05 to
2025-11-25: ``initialize`` and ``Mcp-Session-Id``).  Only the methods below
pass; every other method is refused with JSON-RPC ``-32601`` (rule
``mcp.methods``).  A batch (a JSON array) is refused: revision 2025-06-18
removed batching, and Warden cannot judge the calls of a batch one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llm_warden.proxy.errors import WardenError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

HANDSHAKE_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
"""``MCP-Protocol-Version`` values Warden relays (the header is optional: absent means 2025-03-26)."""

CLIENT_REQUESTS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    }
)
"""Requests a caller may send (the allow-list; ``tasks/*`` and ``server/discover`` are not in it)."""

CLIENT_NOTIFICATIONS = frozenset({"notifications/initialized", "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed"})
"""Notifications a caller may send."""

SERVER_REQUESTS = frozenset({"ping", "sampling/createMessage", "elicitation/create", "roots/list"})
"""Requests an upstream server may send the caller (relayed on the caller's stream)."""

SERVER_NOTIFICATIONS = frozenset(
    {
        "notifications/message",
        "notifications/progress",
        "notifications/cancelled",
        "notifications/resources/updated",
        "notifications/resources/list_changed",
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/elicitation/complete",
    }
)
"""Notifications an upstream server may send the caller."""

MAX_ID_CHARS = 256


class McpRefusal(WardenError):
    """A refusal of the MCP gateway, rendered as a JSON-RPC error with ``rpc_code``."""

    def __init__(self, message: str, *, rule: str, status: int = 400, rpc_code: int = INVALID_REQUEST, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, rule=rule, status=status, code="mcp_refused", headers=headers)
        self.rpc_code = rpc_code


def rpc_code(err: WardenError) -> int:
    """The JSON-RPC error code of one of Warden's refusals."""
    if isinstance(err, McpRefusal):
        return err.rpc_code
    if err.rule in ("request.json", "request.json_depth"):
        return PARSE_ERROR
    return INTERNAL_ERROR if err.status >= 500 else INVALID_REQUEST


Kind = Literal["request", "notification", "response"]


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed JSON-RPC message from a caller."""

    kind: Kind
    method: str | None
    id: str | int | None
    params: dict[str, Any]


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**53) < value < 2**53
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def classify(body: dict[str, Any]) -> Message:
    """A caller's message, checked against JSON-RPC 2.0 and the allow-lists; raises :class:`McpRefusal`."""
    if body.get("jsonrpc") != "2.0":
        raise McpRefusal("the message is not JSON-RPC 2.0 (\"jsonrpc\": \"2.0\" is missing)", rule="mcp.jsonrpc")
    method = body.get("method")
    has_id = "id" in body
    if method is None:
        # A response to a request the server sent (sampling, elicitation, roots).
        if not has_id or not _valid_id(body["id"]):
            raise McpRefusal("a JSON-RPC response needs a string or integer id", rule="mcp.jsonrpc")
        if ("result" in body) == ("error" in body):
            raise McpRefusal("a JSON-RPC response carries exactly one of result or error", rule="mcp.jsonrpc")
        extra = set(body) - {"jsonrpc", "id", "result", "error"}
        if extra:
            raise McpRefusal("a JSON-RPC response has unknown members", rule="mcp.jsonrpc")
        return Message("response", None, body["id"], {})
    if not isinstance(method, str) or not method or len(method) > 128:
        raise McpRefusal("the method must be a non-empty string", rule="mcp.jsonrpc")
    if set(body) - {"jsonrpc", "id", "method", "params"}:
        raise McpRefusal("the JSON-RPC message has unknown members", rule="mcp.jsonrpc")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise McpRefusal("params must be an object", rule="mcp.jsonrpc", rpc_code=INVALID_PARAMS)
    if has_id:
        if not _valid_id(body["id"]):
            raise McpRefusal("a request id must be a string (1 to 256 characters) or an integer", rule="mcp.jsonrpc")
        if method not in CLIENT_REQUESTS:
            raise McpRefusal(f"method {_shown(method)} is not relayed by this gateway", rule="mcp.methods", status=404, rpc_code=METHOD_NOT_FOUND)
        return Message("request", method, body["id"], params)
    if method not in CLIENT_NOTIFICATIONS:
        raise McpRefusal(f"notification {_shown(method)} is not relayed by this gateway", rule="mcp.methods", status=404, rpc_code=METHOD_NOT_FOUND)
    return Message("notification", method, None, params)


def server_message_refusal(parsed: Any) -> str | None:
    """Why a message from an upstream server is not relayed to the caller, or ``None`` (a response is judged by the caller of this)."""
    if not isinstance(parsed, dict):
        return "not a JSON-RPC message"
    method = parsed.get("method")
    if method is None:
        return None if "id" in parsed and ("result" in parsed or "error" in parsed) else "not a JSON-RPC message"
    if "id" in parsed:
        return None if method in SERVER_REQUESTS and _valid_id(parsed["id"]) else "server request not on the allow-list"
    return None if method in SERVER_NOTIFICATIONS else "server notification not on the allow-list"


def _shown(method: str) -> str:
    """A method name safe to quote back (printable, bounded); anything else is not echoed."""
    if method.isascii() and method.isprintable() and len(method) <= 64:
        return repr(method)
    return "(unprintable)"


def error_message(req_id: str | int | None, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


def tool_error_result(req_id: str | int, text: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``tools/call`` answer that tells the agent its call was not executed (``isError``: it can read and act on it)."""
    return {"jsonrpc": "2.0", "id": req_id, "result": {"content": [{"type": "text", "text": text}], "isError": True, "_meta": {"warden/decision": meta}}}
