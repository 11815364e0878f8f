"""A hostile review of the MCP gateway: a caller with a valid token probing around the policy, and an upstream that
answers where it was not asked. Each test goes through the real gateway (raw HTTP or the official SDK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import UPSTREAM_TOKEN, TokenFactory, Upstream, admin, mcp_config, mcp_url
from tests.proxy.mcp.test_hostile import HEADERS, post, refused, session_of
from tests.proxy.mcp.test_hostile_upstream import GOVERNED, HIDDEN, Scripted


class Answering(Scripted):
    """An upstream that slips a response (an unfiltered tool list) into answers where none belongs; for the caller's
    response to a server request it answers on a stream, naming the id the caller used (its own requests share that space)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            msg = await request.json()
            forged = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [GOVERNED, HIDDEN]}}
            if self.mode == "answer-notification" and "method" in msg and "id" not in msg:
                # A notification's POST is answered 202 with no body; this one carries the answer to request 2.
                return web.json_response(forged)
            if self.mode == "error-status-result" and msg.get("method") == "tools/list":
                return web.json_response({**forged, "id": msg["id"]}, status=500)
            if self.mode == "list-extra-members" and msg.get("method") == "tools/list":
                result = {"tools": [GOVERNED], "nextCursor": "p2", "_meta": {"note": HIDDEN["description"]}, "more": [HIDDEN]}
                return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        if request.method == "GET" and self.mode == "get-json":
            return web.json_response({"jsonrpc": "2.0", "id": 2, "result": {"tools": [HIDDEN]}})
        return await super().handle(request)


@pytest.fixture
async def answering() -> Any:
    s = Answering()
    await s.start()
    yield s
    assert s.runner is not None
    await s.runner.cleanup()


async def _session(warden_factory: WardenFactory, answering: Answering, token: TokenFactory, tmp_path: Path, mode: str) -> tuple[RunningWarden, str, str]:
    """A gateway before ``answering`` (answering in ``mode``) and a caller's token and session."""
    rw = await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": answering.url}]))
    answering.mode = mode
    tok = token()
    return rw, tok, await session_of(rw, tok)


async def _raw(rw: RunningWarden, method: str, body: Any, tok: str, sid: str) -> tuple[int, bytes]:
    h = {**HEADERS, "Authorization": f"Bearer {tok}", "Mcp-Session-Id": sid}
    async with aiohttp.ClientSession() as s, s.request(method, mcp_url(rw), data=None if body is None else orjson.dumps(body), headers=h) as r:
        return r.status, await r.read()


async def test_an_answer_to_a_notification_never_reaches_the_caller(warden_factory: WardenFactory, answering: Answering, token: TokenFactory, tmp_path: Path) -> None:
    """The official client routes a JSON-RPC response in a POST's answer to its pending request of that id: an
    upstream answering a notification (or the caller's response) with one would hand the caller an unfiltered list."""
    rw, tok, sid = await _session(warden_factory, answering, token, tmp_path, "answer-notification")
    status, raw = await _raw(rw, "POST", {"jsonrpc": "2.0", "method": "notifications/initialized"}, tok, sid)
    assert b"exfiltrate" not in raw and b"Ignore previous" not in raw
    assert status == 202 and raw == b""
    status, raw = await _raw(rw, "POST", {"jsonrpc": "2.0", "id": 9, "result": {}}, tok, sid)
    assert b"exfiltrate" not in raw and b'"id":9' not in raw
    assert rw.warden.audit is not None
    dropped = [r["record"]["mcp"].get("dropped") async for r in rw.warden.audit.iter_records() if r["record"].get("mcp", {}).get("kind") in ("notification", "response")]
    assert dropped[0] == {"an answer to a message that expects none": 1}
    assert dropped[1]["response to another request"] == 3


async def test_an_error_status_cannot_carry_a_result(warden_factory: WardenFactory, answering: Answering, token: TokenFactory, tmp_path: Path) -> None:
    """An upstream error status is relayed with its JSON-RPC error body: never with a result, which would skip the filter."""
    rw, tok, sid = await _session(warden_factory, answering, token, tmp_path, "error-status-result")
    status, body, _ = await post(rw, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, tok, sid)
    assert b"exfiltrate" not in orjson.dumps(body)
    refused(status, body, 502, -32603, "mcp.upstream")


async def test_the_get_stream_relays_no_json_answer(warden_factory: WardenFactory, answering: Answering, token: TokenFactory, tmp_path: Path) -> None:
    rw, tok, sid = await _session(warden_factory, answering, token, tmp_path, "get-json")
    status, raw = await _raw(rw, "GET", None, tok, sid)
    assert status == 200 and raw == b""
    assert rw.warden.audit is not None
    dropped = [r["record"]["mcp"].get("dropped") async for r in rw.warden.audit.iter_records() if r["record"].get("mcp", {}).get("method") == "stream"]
    assert dropped == [{"not a JSON-RPC error": 1}]


async def test_a_tool_list_carries_only_the_filtered_tools(warden_factory: WardenFactory, answering: Answering, token: TokenFactory, tmp_path: Path) -> None:
    """Members of the tools/list result beside ``tools`` (unpinned text, another tool array) are not relayed."""
    rw, tok, sid = await _session(warden_factory, answering, token, tmp_path, "list-extra-members")
    status, body, _ = await post(rw, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, tok, sid)
    assert status == 200 and b"exfiltrate" not in orjson.dumps(body) and b"Ignore previous" not in orjson.dumps(body)
    assert body["result"] == {"tools": [{"name": "lookup", "inputSchema": body["result"]["tools"][0]["inputSchema"], "description": "Look up."}], "nextCursor": "p2"}


@pytest.mark.parametrize("name", ["Refund", "REFUND", "crm/refund", "crm.refund", "refund@1", "refund ", " refund", "ｒｅｆｕｎｄ", "refund\u200b", "r\u0435fund", "delete_everything", "../refund"])
async def test_hidden_tools_stay_unreachable_by_name_variants(gateway: RunningWarden, upstream: Upstream, token: TokenFactory, name: str) -> None:
    """A caller without the group that may refund: no spelling of a tool name resolves to another entry."""
    tok = token(groups=["staff"])
    sid = await session_of(gateway, tok)
    status, body, _ = await post(gateway, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": name, "arguments": {"order_id": "o-1", "amount": 5}}}, tok, sid)
    assert status == 200 and body["result"]["isError"] is True
    assert body["result"]["_meta"]["warden/decision"]["rule"] in ("policy.unknown_tools", "tools[1].allow_groups")
    assert upstream.effects.calls == []


@pytest.mark.parametrize(
    ("message", "status", "rule"),
    [
        ({"jsonrpc": "2.0", "id": None, "method": "tools/call", "params": {"name": "refund"}}, 400, "mcp.jsonrpc"),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "tools/call", "params": {"name": "refund"}}, 400, "mcp.jsonrpc"),
        ({"jsonrpc": "2.0", "id": 2**60, "method": "tools/call", "params": {"name": "refund"}}, 400, "mcp.jsonrpc"),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "tools/call", "params": {"name": "refund"}}, 400, "mcp.jsonrpc"),
        ({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "refund", "arguments": {"order_id": "o-1", "amount": 5}}}, 404, "mcp.methods"),
        ({"jsonrpc": "2.0", "id": 4, "method": "Tools/Call", "params": {"name": "refund"}}, 404, "mcp.methods"),
        ({"jsonrpc": "2.0", "id": 4, "method": "tools/call ", "params": {"name": "refund"}}, 404, "mcp.methods"),
        ({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": ["refund", {"order_id": "o-1", "amount": 5}]}, 400, "mcp.jsonrpc"),
        ([{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "refund"}}], 400, "mcp.batch"),
        ({"jsonrpc": "2.0", "id": 4, "result": {}, "method": "tools/call"}, 400, "mcp.jsonrpc"),
    ],
)
async def test_jsonrpc_tricks_carry_no_call(gateway: RunningWarden, upstream: Upstream, token: TokenFactory, message: Any, status: int, rule: str) -> None:
    tok = token(groups=["support"])
    sid = await session_of(gateway, tok)
    got, body, _ = await post(gateway, message, tok, sid)
    refused(got, body, status, body["error"]["code"], rule)
    assert upstream.effects.calls == []


async def test_an_approval_covers_exactly_what_is_executed(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    """Duplicate keys, key order, whitespace and 1e2-style numbers: what is judged is what the upstream receives."""
    tok = token(groups=["support"])
    sid = await session_of(gateway, tok)
    h = {**HEADERS, "Authorization": f"Bearer {tok}", "Mcp-Session-Id": sid}

    async def call(raw_args: bytes, rid: int) -> Any:
        data = b'{"jsonrpc":"2.0","id":' + str(rid).encode() + b',"method":"tools/call","params":{"name":"refund","arguments":' + raw_args + b"}}"
        async with aiohttp.ClientSession() as s, s.post(mcp_url(gateway), data=data, headers=h) as r:
            raw = await r.read()
        lines = [ln for ln in raw.split(b"\n") if ln.startswith(b"data:")]
        return orjson.loads(lines[-1][5:] if lines else raw)["result"]

    held = await call(b'{"order_id":"o-3","amount":250}', 10)
    approval_id = held["_meta"]["warden/decision"]["approval_id"]
    r = await admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve", {"comment": "ok"})
    assert r.status_code == 200, r.text
    # Duplicate keys: a parser that kept the first would execute 999; the one judged (the last) is the one sent.
    sneaky = await call(b'{"order_id":"o-3","amount":999,"amount":2.5e2}', 11)
    assert "isError" not in sneaky or not sneaky["isError"], sneaky
    assert upstream.effects.calls == [("refund", {"order_id": "o-3", "amount": 250})]
    # The same call again (reordered, spaced) is not a second execution.
    again = await call(b'{ "amount" : 250 , "order_id" : "o-3" }', 12)
    assert again["isError"] and again["_meta"]["warden/decision"]["rule"] == "tools.duplicate"
    assert len(upstream.effects.calls) == 1


async def test_no_secret_in_records_or_answers(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    """Neither the upstream's credentials nor the caller's token appear in an audit record or an answer."""
    tok = token(groups=["support"])
    sid = await session_of(gateway, tok)
    answers = []
    for message in (
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "lookup", "arguments": {"order_id": "o-1"}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "refund", "arguments": {"order_id": "o-1", "amount": 500}}},
        {"jsonrpc": "2.0", "id": 5, "method": "tasks/list"},
    ):
        answers.append(orjson.dumps((await post(gateway, message, tok, sid))[1]))
    assert gateway.warden.audit is not None
    records = [orjson.dumps(r) async for r in gateway.warden.audit.iter_records()]
    assert len(records) >= 5
    secret = UPSTREAM_TOKEN.split()[1].encode()
    for blob in records + answers:
        assert secret not in blob, blob
        assert tok.encode() not in blob, blob
        assert sid.encode() not in blob, blob
    refusals = [orjson.loads(b)["record"] for b in records if b"mcp.methods" in b or b"approval" in b]
    assert refusals, "every refusal is recorded with its rule"



async def test_first_calls_side_by_side_in_a_session_do_not_hang(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    """Before any list, each call lists the tools itself in the caller's session: under one id the server routed one
    answer and the other call waited for timeout_s."""
    import asyncio

    tok = token()
    sid = await session_of(gateway, tok)
    call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "lookup", "arguments": {"order_id": "o-5"}}}
    answers = await asyncio.wait_for(asyncio.gather(*(post(gateway, {**call, "id": 40 + i}, tok, sid) for i in range(3))), 20)
    assert [a[0] for a in answers] == [200] * 3 and not any(a[1]["result"].get("isError") for a in answers)


async def test_concurrent_identical_writes_execute_once(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    """The duplicate-mutation guard holds for calls sent side by side, not only one after the other."""
    import asyncio

    tok = token(groups=["support"])
    sid = await session_of(gateway, tok)
    call = {"jsonrpc": "2.0", "id": 20, "method": "tools/call", "params": {"name": "refund", "arguments": {"order_id": "o-5", "amount": 5}}}
    answers = await asyncio.gather(*(post(gateway, {**call, "id": 20 + i}, tok, sid) for i in range(4)))
    assert upstream.effects.calls == [("refund", {"order_id": "o-5", "amount": 5})]
    refusals = [a[1]["result"] for a in answers if a[1]["result"].get("isError")]
    assert len(refusals) == 3 and all(r["_meta"]["warden/decision"]["rule"] == "tools.duplicate" for r in refusals)
    # Once the first has ended, a failed or finished call frees its key: a later identical call is refused as a repeat.
    status, body, _ = await post(gateway, {**call, "id": 30}, tok, sid)
    assert body["result"]["isError"] and "already succeeded" in body["result"]["content"][0]["text"]
