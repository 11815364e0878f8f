"""The MCP adapter: JSON-RPC messages in, JSON-RPC messages out.

The internal representation of an MCP exchange is the caller's JSON-RPC
message itself (``ex.client_body``); the MCP flow (:mod:`proxy.mcp.flow`)
builds the answer.  Every refusal is a JSON-RPC error object
``{"jsonrpc": "2.0", "id", "error": {"code", "message", "data": {"rule", "status", "request_id"}}}``
with the HTTP status of the refusal — the official SDK surfaces such an
error to the caller as an ``MCPError``.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_warden.proxy.errors import WardenError
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.mcp.jsonrpc import McpRefusal, classify, error_message, rpc_code
from llm_warden.proxy.protocols.base import Bounds, Protocol, StreamRenderer

MCP_PATH = "/mcp"
"""Every path below it answers in JSON-RPC."""


class McpStream(StreamRenderer):
    """SSE of the Streamable HTTP transport: events relayed as built by the flow; an error is a JSON-RPC error event."""

    __slots__ = ("req_id",)

    def __init__(self, req_id: str | int | None) -> None:
        self.req_id = req_id

    def event(self, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        return raw if raw is not None else b"event: message\ndata: " + orjson.dumps(chunk) + b"\n\n"

    def keepalive(self, raw: bytes) -> bytes | None:
        return raw

    def end(self, usage_chunk: dict[str, Any] | None, usage: dict[str, int] | None) -> list[bytes]:
        return []

    def error(self, err: WardenError) -> bytes:
        return b"event: message\ndata: " + orjson.dumps(error_message(self.req_id, rpc_code(err), _text(err), _data(err))) + b"\n\n"


def _text(err: WardenError) -> str:
    return err.message if err.rule is None else f"{err.message} (rule: {err.rule})"


def _data(err: WardenError, ex: Exchange | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": err.status, "rule": err.rule}
    if ex is not None:
        out["request_id"] = ex.request_id
    return out


def request_id_of(ex: Exchange) -> str | int | None:
    """The caller's JSON-RPC id when its message parsed far enough to have a valid one."""
    body = ex.client_body
    if not isinstance(body, dict):
        return None
    rid = body.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    if isinstance(rid, str) and len(rid) > 256:
        return None
    return rid


class McpProtocol(Protocol):
    """``/mcp/{server}``: the Streamable HTTP transport of MCP."""

    name = "mcp"

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        ex.client_body = ex.body = body
        classify(body)

    def not_an_object(self, body: Any) -> WardenError:
        if isinstance(body, list):
            return McpRefusal("JSON-RPC batches are not accepted (MCP 2025-06-18 removed them); send one message per request", rule="mcp.batch")
        return McpRefusal("the body must be one JSON-RPC message (an object)", rule="mcp.jsonrpc")

    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        if ex.response_modified and ex.response_body is not None:
            return orjson.dumps(ex.response_body)
        return body

    def error_body(self, ex: Exchange, err: WardenError) -> bytes:
        return orjson.dumps(error_message(request_id_of(ex), rpc_code(err), _text(err), _data(err, ex)))

    def stream(self, ex: Exchange) -> StreamRenderer:
        return McpStream(request_id_of(ex))
