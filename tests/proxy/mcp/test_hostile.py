"""Hostile callers of the MCP gateway: every refusal is a JSON-RPC error with the right status and a named rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import TokenFactory, Upstream, mcp_config, mcp_url

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


async def post(rw: RunningWarden, body: bytes | Any, token: str | None, session: str | None = None, **headers: str) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    h = dict(HEADERS, **headers)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if session is not None:
        h["Mcp-Session-Id"] = session
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s, s.post(mcp_url(rw), data=data, headers=h) as r:
        raw = await r.read()
        if r.content_type == "text/event-stream":
            # The response to our request is the last data line.
            lines = [ln for ln in raw.split(b"\n") if ln.startswith(b"data:")]
            return r.status, orjson.loads(lines[-1][5:]), r.headers
        return r.status, (orjson.loads(raw) if raw else None), r.headers


async def session_of(rw: RunningWarden, token: str) -> str:
    status, body, headers = await post(rw, INIT, token)
    assert status == 200 and "result" in body
    return str(headers["Mcp-Session-Id"])  # type: ignore[index]


def refused(status: int, body: Any, want_status: int, code: int, rule: str) -> None:
    assert status == want_status, body
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == code
    assert body["error"]["data"]["rule"] == rule
    assert f"rule: {rule}" in body["error"]["message"]


async def test_missing_and_forged_tokens(gateway: RunningWarden, token: TokenFactory) -> None:
    status, body, headers = await post(gateway, INIT, None)
    refused(status, body, 401, -32600, body["error"]["data"]["rule"])
    assert headers["WWW-Authenticate"].startswith("Bearer")  # type: ignore[index]
    forged = token()[:-6] + "AAAAAA"
    status, body, _ = await post(gateway, INIT, forged)
    assert status == 401 and body["error"]["code"] == -32600
    alg_none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ."
    status, body, _ = await post(gateway, INIT, alg_none)
    assert status == 401


async def test_malformed_jsonrpc(gateway: RunningWarden, token: TokenFactory) -> None:
    tok = token()
    sid = await session_of(gateway, tok)
    status, body, _ = await post(gateway, b'{"jsonrpc": "2.0", "id": 1, "method": ', tok, sid)
    refused(status, body, 400, -32700, "request.json")
    status, body, _ = await post(gateway, {"id": 1, "method": "tools/list"}, tok, sid)
    refused(status, body, 400, -32600, "mcp.jsonrpc")
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": True, "method": "tools/list"}, tok, sid)
    refused(status, body, 400, -32600, "mcp.jsonrpc")
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": [1]}, tok, sid)
    refused(status, body, 400, -32602, "mcp.jsonrpc")
    # A batch: revision 2025-06-18 removed them; Warden judges one message at a time.
    status, body, _ = await post(gateway, [{"jsonrpc": "2.0", "id": 3, "method": "tools/list"}], tok, sid)
    refused(status, body, 400, -32600, "mcp.batch")


async def test_unknown_methods_are_refused(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    tok = token()
    sid = await session_of(gateway, tok)
    for method in ("tasks/list", "server/discover", "sampling/createMessage", "tools/delete", "x" * 100):
        status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": 9, "method": method}, tok, sid)
        refused(status, body, 404, -32601, "mcp.methods")
        assert "x" * 100 not in body["error"]["message"]  # never echoed unbounded
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": 9, "method": "y" * 5000}, tok, sid)
    refused(status, body, 400, -32600, "mcp.jsonrpc")
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "method": "notifications/evil"}, tok, sid)
    refused(status, body, 404, -32601, "mcp.methods")


async def test_oversized_messages(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    cfg = mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url}], max_message_bytes=4096)
    rw = await warden_factory({**cfg, "server": {"max_body_bytes": 65536}})
    tok = token()
    sid = await session_of(rw, tok)
    big = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "lookup", "arguments": {"order_id": "o-1", "pad": "a" * 8000}}}
    status, body, _ = await post(rw, big, tok, sid)
    refused(status, body, 413, -32600, "mcp.max_message_bytes")
    bigger = {**big, "params": {"name": "lookup", "arguments": {"pad": "a" * 100000}}}
    status, body, _ = await post(rw, bigger, tok, sid)
    refused(status, body, 413, -32600, "server.max_body_bytes")
    assert upstream.effects.calls == []


async def test_server_instructions_are_dropped(gateway: RunningWarden, token: TokenFactory) -> None:
    status, body, _ = await post(gateway, INIT, token())
    assert status == 200 and body["result"]["serverInfo"]["name"] == "crm-test"
    assert "instructions" not in body["result"]


async def test_sessions_are_bound_to_their_principal(gateway: RunningWarden, token: TokenFactory) -> None:
    alice, mallory = token(sub="alice"), token(sub="mallory")
    sid = await session_of(gateway, alice)
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, body, _ = await post(gateway, listing, alice, sid)
    assert status == 200 and [t["name"] for t in body["result"]["tools"]] == ["lookup"]
    status, body, _ = await post(gateway, listing, mallory, sid)
    refused(status, body, 404, -32600, "mcp.session")
    status, body, _ = await post(gateway, listing, token(sub="alice", tenant="other"), sid)
    refused(status, body, 404, -32600, "mcp.session")
    status, body, _ = await post(gateway, listing, alice, "w1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    refused(status, body, 404, -32600, "mcp.session")
    status, body, _ = await post(gateway, listing, alice)
    refused(status, body, 400, -32600, "mcp.session")
    # The upstream's own session id never reaches the caller.
    assert sid.startswith("w1.")


async def test_protocol_version_allow_list_and_unknown_server(gateway: RunningWarden, token: TokenFactory) -> None:
    tok = token()
    status, body, _ = await post(gateway, INIT, tok, **{"MCP-Protocol-Version": "2026-07-28"})
    refused(status, body, 400, -32600, "mcp.protocol_version")
    async with aiohttp.ClientSession() as s, s.post(mcp_url(gateway, "nope"), data=orjson.dumps(INIT), headers={**HEADERS, "Authorization": f"Bearer {tok}"}) as r:
        body = await r.json()
    refused(r.status, body, 404, -32600, "server.routes")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_get_and_delete_need_a_session(gateway: RunningWarden, token: TokenFactory, method: str) -> None:
    async with aiohttp.ClientSession() as s, s.request(method, mcp_url(gateway), headers={**HEADERS, "Authorization": f"Bearer {token()}"}) as r:
        body = await r.json()
    refused(r.status, body, 400, -32600, "mcp.session")


async def test_get_stream_and_session_end_are_relayed(gateway: RunningWarden, token: TokenFactory) -> None:
    tok = token()
    sid = await session_of(gateway, tok)
    h = {**HEADERS, "Authorization": f"Bearer {tok}", "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as s:
        async with s.get(mcp_url(gateway), headers=h) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
        async with s.delete(mcp_url(gateway), headers=h) as r:
            assert r.status in (200, 204)
    # The upstream session is over: the upstream's 404 is relayed, so the client starts a new session.
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, tok, sid)
    assert status == 404 and body["error"]


async def test_limits_apply_to_mcp_messages(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    """The same pipeline: a request limit refuses MCP messages too, as JSON-RPC errors with 429 and Retry-After."""
    cfg = mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url}])
    cfg["plugins"] = {"enabled": ["limits", "tools"]}
    cfg["limits"] = {"rules": [{"scope": "user", "requests": "3/minute"}], "idempotency": False}
    rw = await warden_factory(cfg)
    tok = token()
    sid = await session_of(rw, tok)
    statuses = []
    for i in range(4):
        status, body, headers = await post(rw, {"jsonrpc": "2.0", "id": 10 + i, "method": "ping"}, tok, sid)
        statuses.append(status)
    assert statuses == [200, 200, 429, 429]  # initialize was the first of the 3
    refused(status, body, 429, -32600, "limits.rules[0] (user requests 3/minute)")
    assert "Retry-After" in headers


@pytest.mark.parametrize("shared_key", [True, False])
async def test_a_session_moves_between_replicas_with_the_shared_key(
    warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_key: bool
) -> None:
    """Replicas share no memory: with [mcp] session_key_env set alike, replica B serves a session replica A opened."""
    monkeypatch.setenv("WARDEN_TEST_MCP_SESSION_KEY", "5a" * 32)
    extra = {"session_key_env": "WARDEN_TEST_MCP_SESSION_KEY"} if shared_key else {}
    a = await warden_factory(mcp_config(tmp_path / "a", [{"name": "crm", "url": upstream.http.url}], audit=False, **extra))
    b = await warden_factory(mcp_config(tmp_path / "b", [{"name": "crm", "url": upstream.http.url}], audit=False, **extra))
    tok = token()
    sid = await session_of(a, tok)
    status, body, _ = await post(b, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, tok, sid)
    if shared_key:
        assert status == 200 and [t["name"] for t in body["result"]["tools"]] == ["lookup"]
    else:
        refused(status, body, 404, -32600, "mcp.session")
