"""Governed by construction: the paths a hostile caller found around the fence and out of the audit log, closed.

Each test reproduces one finding through the real server (raw sockets where a
client library would normalise the input) and checks both the answer and the
audit record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.audit.verify import verify_db
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
NOTE_TOOL = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]
AUDIT = {"audit": {"enabled": True, "durability": "sync"}}


async def raw_request(base_url: str, method: str, target: str, headers: dict[str, bytes | str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``target`` byte for byte (no client normalises it) and read the whole answer."""
    host_port = base_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: {host_port}".encode(), b"Connection: close", f"Content-Length: {len(body)}".encode()]
    for k, v in headers.items():
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()))
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        out, rest = b"", payload
        while rest:
            size_s, _, rest = rest.partition(b"\r\n")
            size = int(size_s, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        payload = out
    return int(status_line.split()[1]), hdrs, payload


def chat_body(**over: Any) -> bytes:
    return orjson.dumps({**CHAT, **over})


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%2e/chat/completions",
        "/v1/x/%2e%2e/chat/completions",
        "/v1/chat/completions/%2e%2e/completions",
        "/v1/../admin/mode",
        "/v1/%2e%2e/x",
        "/v1/./chat/completions",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/chat%2Fcompletions",
        "/v1/chat\\completions",
        "/v1/chat/completions%00",
        "/v1/ch%C3%A4t/completions",
    ],
)
async def test_non_canonical_paths_are_refused_before_routing_and_never_reach_the_provider(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, target: str
) -> None:
    rw = await warden_factory(AUDIT)
    status, _, body = await raw_request(rw.base_url, "POST", target, {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}, chat_body(tools=NOTE_TOOL))
    err = orjson.loads(body)["error"]
    assert status == 400 and "rule: request.path" in err["message"], body
    assert fake.requests == [], "nothing reaches the provider"
    assert target.encode() not in body, "the path is not echoed"


@pytest.mark.parametrize(
    ("method", "path", "status", "rule"),
    [
        ("GET", "/v1/files", 404, "server.routes"),
        ("DELETE", "/v1/files/file-abc", 404, "server.routes"),
        ("GET", "/v1/responses/resp_1", 404, "server.routes.ungoverned"),
        ("POST", "/v1/threads/t1/runs", 404, "server.routes.ungoverned"),
        ("HEAD", "/v1/models", 405, "server.routes"),
        ("TRACE", "/v1/chat/completions", 405, "server.routes"),
        ("GET", "/admin/mode", 404, "server.routes"),
    ],
)
async def test_routes_are_an_allow_list(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, method: str, path: str, status: int, rule: str
) -> None:
    rw = await warden_factory()
    got, hdrs, body = await raw_request(rw.base_url, method, path, {"Authorization": f"Bearer {token()}"})
    assert got == status
    if method != "HEAD":
        assert f"rule: {rule})" in orjson.loads(body)["error"]["message"] or rule in body.decode()
    if status == 405:
        assert "allow" in hdrs
    assert fake.requests == []


async def test_an_operator_listed_passthrough_route_is_relayed_to_the_route_built_path(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory({"server": {"passthrough_routes": ["GET /v1/files/{file_id}"]}})
    status, _, _ = await raw_request(rw.base_url, "GET", "/v1/files/file-abc123?limit=2", {"Authorization": f"Bearer {token()}"})
    assert status == 200
    (req,) = fake.requests
    assert req.raw_path == "/v1/files/file-abc123?limit=2"
    # The placeholder matches one id-like segment only.
    status, _, _ = await raw_request(rw.base_url, "GET", "/v1/files/file-abc/content", {"Authorization": f"Bearer {token()}"})
    assert status == 404


@pytest.mark.parametrize("spec", ["POST /v1/chat/completions", "POST /v1/responses", "GET /v1/../x", "FOO /v1/x", "GET /v2/x", "GET /v1/{bad name}"])
def test_a_passthrough_route_cannot_shadow_or_reach_an_ungoverned_api(spec: str) -> None:
    from llm_warden.proxy.config import load_config
    from llm_warden.proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="passthrough_routes"):
        load_config({"server": {"passthrough_routes": [spec]}, "auth": {"mode": "none"}, "audit": {"enabled": False}})


async def _record(rw: Any, request_id: str) -> dict[str, Any]:
    rec = await rw.warden.audit.find(request_id)
    assert rec is not None, f"no record for {request_id}"
    return dict(rec)


async def test_undecodable_header_bytes_still_give_a_full_record_and_verify_passes(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, tmp_path: Path
) -> None:
    rw = await warden_factory(AUDIT)
    fake.push(Reply(content="answered"))
    status, hdrs, _ = await raw_request(
        rw.base_url, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {token()}", "Content-Type": "application/json", "X-Odd": b"caf\xe9\xff"}, chat_body()
    )
    assert status == 200
    rec = await _record(rw, hdrs["x-request-id"])
    assert rec["kind"] == "exchange" and rec["response"]["text"] == "answered"
    assert rec["request_headers"]["x-odd"].startswith("caf\\x")
    await rw.stop()
    report = await verify_db(Path(rw.warden.config.resolve_path(rw.warden.config.audit.path)))
    assert not report.faults


async def test_a_body_nested_past_the_bound_is_refused_and_recorded_by_size_and_digest(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory(AUDIT)
    deep = b"[" * 300 + b'"x"' + b"]" * 300
    payload = chat_body()[:-1] + b',"metadata":{"d":' + deep + b"}}"
    status, hdrs, body = await raw_request(rw.base_url, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}, payload)
    assert status == 400 and "request.json_depth" in orjson.loads(body)["error"]["message"]
    assert fake.requests == []
    rec = await _record(rw, hdrs["x-request-id"])
    assert rec["kind"] == "exchange" and rec["status"] == 400
    assert rec["refused_request"]["refused"] == "request.json_depth" and rec["refused_request"]["bytes"] > 600


async def test_a_secret_looking_request_id_cannot_make_verify_report_tampering(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory(AUDIT)
    secret_id = "sk-live-" + "a1B2" * 10
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token()}", "x-request-id": secret_id}) as r:
            assert r.status == 200
    await rw.stop()
    path = Path(rw.warden.config.resolve_path(rw.warden.config.audit.path))
    report = await verify_db(path)
    assert not report.faults, [f.code for f in report.faults]
    stored = await asyncio.to_thread(path.read_bytes)
    assert secret_id.encode() not in stored


async def test_the_record_is_written_after_the_complete_hooks(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rules = [{"name": "t", "scope": "tenant", "tokens": "100000/minute"}]
    rw = await warden_factory({**AUDIT, "plugins": {"enabled": ["limits"]}, "limits": {"rules": rules}})
    fake.push(Reply(content="a short answer"))
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token()}"}) as r:
            rid = r.headers["x-request-id"]
    rec = await _record(rw, rid)
    limits = rec["plugins"]["limits"]
    assert limits["decision"]["decision"] == "allow"
    assert limits["tokens_reconciled"]["actual"] == rec["usage"]["total_tokens"], "reconciled by on_complete, before the record"
    assert "annotations" not in rec


async def test_a_declared_tool_the_application_did_not_offer_is_never_relayed(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, tmp_path: Path
) -> None:
    tools = [{"name": "note", "effect": "write", "schema": {"type": "object"}}, {"name": "lookup", "effect": "read", "schema": {"type": "object"}}]
    policy = {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0, "max_corrections": 1}
    rw = await warden_factory({**AUDIT, "plugins": {"enabled": ["tools"]}, "policy": policy, "tools": tools})
    lookup = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    fake.push(Reply(tool_calls=[{"name": "note", "arguments": "{}"}]), Reply(tool_calls=[{"name": "note", "arguments": "{}"}]))
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json={**CHAT, "tools": lookup}, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 403
            body = await r.json()
            rid = r.headers["x-request-id"]
    assert "tools.offered" in body["error"]["message"]
    second = fake.chat_requests()[1].body["messages"][-1]
    assert second["role"] == "tool" and "not offered" in second["content"], "the model is told why, in a corrective turn"
    rec = await _record(rw, rid)
    assert {c["rule"] for c in rec["tool_calls"]} == {"tools.offered"}
    # And with no tools offered at all.
    fake.push(Reply(tool_calls=[{"name": "lookup", "arguments": "{}"}]), Reply(content="fine"))
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
            answer = await r.json()
    assert answer["choices"][0]["message"].get("tool_calls") is None


@pytest.mark.parametrize("model", ["gpt\r\nX: 1", "gpt\x00", "m" * 100_000, ""])
async def test_a_bad_model_name_is_refused_before_the_provider_is_called(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, model: str
) -> None:
    rw = await warden_factory()
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json={**CHAT, "model": model}, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 400
            text = await r.text()
    assert fake.requests == []
    assert len(text) < 1000, "the model name is not echoed"


async def test_a_provider_model_name_with_a_line_break_never_reaches_a_header(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory()
    fake.push(Reply(content="ok", model="evil\r\nSet-Cookie: a=b"))
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
            assert "x-warden-model" not in r.headers and "set-cookie" not in r.headers
            assert (await r.json())["choices"][0]["message"]["content"] == "ok"


async def test_one_content_type_header(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory()
    status, _, _ = await raw_request(rw.base_url, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}, chat_body())
    host_port = rw.base_url.split("//", 1)[1].split("/", 1)[0]
    reader, writer = await asyncio.open_connection(*host_port.rsplit(":", 1))
    body = chat_body()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token()}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = (await reader.read()).partition(b"\r\n\r\n")[0].lower()
    writer.close()
    assert status == 200 and head.count(b"content-type:") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_the_offer_is_checked_without_any_tool_plugin(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, stream: bool) -> None:
    rw = await warden_factory()  # plugins: headers only
    fake.push(Reply(tool_calls=[{"name": "rm", "arguments": "{}"}]), Reply(tool_calls=[{"name": "rm", "arguments": "{}"}]), Reply(tool_calls=[{"name": "rm", "arguments": "{}"}]))
    async with aiohttp.ClientSession() as s:
        async with s.post(rw.base_url + "/chat/completions", json={**CHAT, "stream": stream}, headers={"Authorization": f"Bearer {token()}"}) as r:
            body = await r.read()
    assert b'"rm"' not in body and b"tools.offered" in body
    assert len(fake.chat_requests()) == 3, "two corrective turns, then the refusal"


async def test_the_record_keeps_the_path_as_the_client_sent_it_and_the_query_is_relayed_byte_for_byte(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory({**AUDIT, "server": {"passthrough_routes": ["GET /v1/files/{file_id}"]}})
    status, hdrs, _ = await raw_request(rw.base_url, "GET", "/v1/%2e/chat/completions", {"Authorization": f"Bearer {token()}"})
    assert status == 400
    rec = await _record(rw, hdrs["x-request-id"])
    assert rec["path"] == "/v1/%2e/chat/completions"
    status, _, _ = await raw_request(rw.base_url, "GET", "/v1/files/abc?x=%0d%0aX-Evil:%201&after=%23y", {"Authorization": f"Bearer {token()}"})
    assert status == 200
    assert [r.raw_path for r in fake.requests] == ["/v1/files/abc?x=%0d%0aX-Evil:%201&after=%23y"]
    assert "x-evil" not in {k.lower() for k in fake.requests[0].headers}


async def test_a_body_whose_encoding_is_broken_is_a_400_not_a_500(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory(AUDIT)
    status, hdrs, body = await raw_request(
        rw.base_url, "POST", "/v1/chat/completions",
        {"Authorization": f"Bearer {token()}", "Content-Type": "application/json", "Content-Encoding": "gzip"}, b"not gzip at all, really",
    )
    assert status == 400 and b"http." in body
    assert fake.requests == []
    if "x-request-id" in hdrs:
        rec = await _record(rw, hdrs["x-request-id"])
        assert rec["status"] == 400
