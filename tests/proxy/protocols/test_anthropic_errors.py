"""Every refusal on the Anthropic paths comes back in Anthropic's error format, with its status and its rule.

``{"type": "error", "error": {"type", "message"}, "request_id"}``: authentication, routing, canonical paths,
body bounds, hostile bodies, limits, an exhausted correction (see test_anthropic_tools.py), the provider, the
audit log, and mid-stream failures (an ``event: error``).  Never a 500, never an echo of the input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from yarl import URL

from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.protocols.conftest import anthropic_client
from tests.proxy.protocols.test_anthropic_sdk import sse_events

MARKER = "<script>hostile marker</script>"
OK: dict[str, Any] = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def anthropic_error(status: int, body: bytes, want_status: int, want_type: str, rule: str) -> dict[str, Any]:
    assert status == want_status, body
    obj = orjson.loads(body)
    assert set(obj) == {"type", "error", "request_id"} and obj["type"] == "error", obj
    assert set(obj["error"]) == {"type", "message"} and obj["error"]["type"] == want_type, obj
    assert f"(rule: {rule})" in obj["error"]["message"], obj
    assert MARKER.encode() not in body
    return obj


async def request(rw: RunningWarden, method: str, path: str, *, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    url = URL(rw.base_url.removesuffix("/v1") + path, encoded=True)  # sent as written: no client-side normalisation
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data, headers=h) as r:
        return r.status, await r.read(), r.headers


# -- authentication -------------------------------------------------------------------------------


async def test_401_without_credentials(warden: RunningWarden) -> None:
    status, body, headers = await request(warden, "POST", "/v1/messages", body=OK)
    obj = anthropic_error(status, body, 401, "authentication_error", "auth.missing")
    assert headers["WWW-Authenticate"] == 'Bearer realm="warden"' and obj["request_id"] == headers["x-request-id"]


async def test_401_through_the_sdk_for_a_bad_key(warden: RunningWarden) -> None:
    client = anthropic_client(warden, "not-a-jwt")
    with pytest.raises(anthropic.AuthenticationError) as err:
        await client.messages.create(**OK)
    assert isinstance(err.value.body, dict) and err.value.body["error"]["type"] == "authentication_error"
    assert "(rule: auth.malformed)" in err.value.body["error"]["message"]


async def test_401_for_two_different_credentials(warden: RunningWarden, token: Callable[..., str]) -> None:
    status, body, _ = await request(warden, "POST", "/v1/messages", body=OK, headers={"x-api-key": token(), "Authorization": f"Bearer {token(sub='bob')}"})
    anthropic_error(status, body, 401, "authentication_error", "auth.credentials")
    status, _, _ = await request(warden, "POST", "/v1/messages", body=OK, headers={"x-api-key": (t := token()), "Authorization": f"Bearer {t}"})
    assert status == 200, "the same token in both headers is one credential"


async def test_x_api_key_is_not_a_credential_on_openai_routes(warden: RunningWarden, token: Callable[..., str]) -> None:
    status, body, _ = await request(warden, "POST", "/v1/chat/completions", body={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers={"x-api-key": token()})
    assert status == 401 and orjson.loads(body)["error"]["code"] == "missing_token", "OpenAI routes keep OpenAI's format and header"


# -- routes and paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "etype", "rule"),
    [
        ("POST", "/v1/messages/batches", 404, "not_found_error", "server.routes.ungoverned"),
        ("GET", "/v1/messages/batches/msgbatch_1", 404, "not_found_error", "server.routes.ungoverned"),
        ("POST", "/v1/messages/count_tokens", 404, "not_found_error", "server.routes.ungoverned"),
        ("POST", "/v1/messages/other", 404, "not_found_error", "server.routes"),
        ("GET", "/v1/messages", 405, "invalid_request_error", "server.routes"),
        ("POST", "/v1/messages/", 400, "invalid_request_error", "request.path"),
        ("POST", "/v1/messages/%2e%2e/chat/completions", 400, "invalid_request_error", "request.path"),
    ],
)
async def test_route_and_path_refusals(warden: RunningWarden, token: Callable[..., str], method: str, path: str, status: int, etype: str, rule: str) -> None:
    got, body, headers = await request(warden, method, path, body=OK, headers={"x-api-key": token()})
    anthropic_error(got, body, status, etype, rule)
    if status == 405:
        assert headers["Allow"] == "POST"


async def test_count_tokens_through_the_sdk_is_refused_by_name(aclient: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await aclient.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "cannot count tokens" in str(err.value) and "server.routes.ungoverned" in str(err.value)


# -- bounds and hostile bodies --------------------------------------------------------------------


def _deep(n: int) -> Any:
    v: Any = "x"
    for _ in range(n):
        v = {"a": v}
    return v


HOSTILE: list[tuple[str, Any, str]] = [
    ("not an object", [OK], "request.json"),
    ("model missing", {k: v for k, v in OK.items() if k != "model"}, "request.schema"),
    ("model a number", {**OK, "model": 5}, "request.schema"),
    ("model too long", {**OK, "model": "m" * 300}, "request.model"),
    ("model with a newline", {**OK, "model": "m\nx"}, "request.model"),
    ("max_tokens missing", {k: v for k, v in OK.items() if k != "max_tokens"}, "request.schema"),
    ("max_tokens a string", {**OK, "max_tokens": "16"}, "request.schema"),
    ("max_tokens a boolean", {**OK, "max_tokens": True}, "request.schema"),
    ("max_tokens zero", {**OK, "max_tokens": 0}, "request.schema"),
    ("max_tokens beyond int32", {**OK, "max_tokens": 2**40}, "request.schema"),
    ("messages missing", {"model": "m", "max_tokens": 5}, "request.schema"),
    ("messages empty", {**OK, "messages": []}, "request.schema"),
    ("messages an object", {**OK, "messages": {"role": "user"}}, "request.schema"),
    ("a message a number", {**OK, "messages": [1]}, "request.schema"),
    ("role system", {**OK, "messages": [{"role": "system", "content": "x"}]}, "request.schema"),
    ("role hostile", {**OK, "messages": [{"role": MARKER, "content": "x"}]}, "request.schema"),
    ("content missing", {**OK, "messages": [{"role": "user"}]}, "request.schema"),
    ("content a number", {**OK, "messages": [{"role": "user", "content": 42}]}, "request.schema"),
    ("extra message field", {**OK, "messages": [{"role": "user", "content": "x", MARKER: 1}]}, "protocol.unsupported"),
    ("block not an object", {**OK, "messages": [{"role": "user", "content": ["text"]}]}, "request.schema"),
    ("block type a number", {**OK, "messages": [{"role": "user", "content": [{"type": 5}]}]}, "request.schema"),
    ("unknown block type", {**OK, "messages": [{"role": "user", "content": [{"type": MARKER, "text": "x"}]}]}, "request.schema"),
    ("text not a string", {**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]}, "request.schema"),
    ("document block", {**OK, "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}, "citations": {"enabled": True}}]}]}, "protocol.unsupported"),
    ("search result block", {**OK, "messages": [{"role": "user", "content": [{"type": "search_result", "source": "s", "title": "t", "content": []}]}]}, "protocol.unsupported"),
    ("thinking block", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]}, {"role": "user", "content": "b"}]}, "protocol.unsupported"),
    ("server tool use block", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}}]}, {"role": "user", "content": "b"}]}, "protocol.unsupported"),
    ("citations in a text block", {**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}]}]}, "protocol.unsupported"),
    ("image with a bad media type", {**OK, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/svg+xml", "data": "x"}}]}]}, "request.schema"),
    ("image media_type a list (found by the fuzzer)", {**OK, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": [], "data": "x"}}]}]}, "request.schema"),
    ("image from the Files API", {**OK, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f1"}}]}]}, "protocol.unsupported"),
    ("image url not http", {**OK, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "javascript:alert(1)"}}]}]}, "request.schema"),
    ("image in a tool result", {**OK, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}]}]}, "protocol.unsupported"),
    ("tool result id hostile", {**OK, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": MARKER}]}]}, "request.schema"),
    ("tool result is_error a string", {**OK, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": "yes"}]}]}, "request.schema"),
    ("tool use input a string", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": "{}"}]}, {"role": "user", "content": "b"}]}, "request.schema"),
    ("tool use name hostile", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": MARKER, "input": {}}]}, {"role": "user", "content": "b"}]}, "request.schema"),
    ("prefill", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "The answer is"}]}, "protocol.unsupported"),
    ("system a number", {**OK, "system": 5}, "request.schema"),
    ("system with an image", {**OK, "system": [{"type": "image", "source": {"type": "url", "url": "https://x.test"}}]}, "request.schema"),
    ("tools an object", {**OK, "tools": {"name": "f"}}, "request.schema"),
    ("server tool", {**OK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "protocol.unsupported"),
    ("tool name hostile", {**OK, "tools": [{"name": MARKER, "input_schema": {"type": "object"}}]}, "request.schema"),
    ("tool schema not an object", {**OK, "tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "request.schema"),
    ("tool input examples", {**OK, "tools": [{"name": "f", "input_schema": {"type": "object"}, "input_examples": [{}]}]}, "protocol.unsupported"),
    ("tool unknown field", {**OK, "tools": [{"name": "f", "input_schema": {"type": "object"}, MARKER: 1}]}, "protocol.unsupported"),
    ("tool choice unknown", {**OK, "tool_choice": {"type": MARKER}}, "request.schema"),
    ("tool choice without a name", {**OK, "tool_choice": {"type": "tool"}}, "request.schema"),
    ("thinking enabled", {**OK, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "protocol.unsupported"),
    ("top_k", {**OK, "top_k": 5}, "protocol.unsupported"),
    ("mcp servers", {**OK, "mcp_servers": [{"type": "url", "url": "https://x.test", "name": "x"}]}, "protocol.unsupported"),
    ("unknown top-level field", {**OK, MARKER: 1}, "protocol.unsupported"),
    ("temperature above 1", {**OK, "temperature": 1.5}, "request.schema"),
    ("temperature a string", {**OK, "temperature": "0.5"}, "request.schema"),
    ("stop_sequences a string", {**OK, "stop_sequences": "END"}, "request.schema"),
    ("metadata user_id a number", {**OK, "metadata": {"user_id": 5}}, "request.schema"),
    ("metadata other field", {**OK, "metadata": {MARKER: "x"}}, "request.schema"),
    ("stream a string", {**OK, "stream": "yes"}, "request.schema"),
    ("nested past the depth bound", {**OK, "metadata": _deep(80)}, "request.json_depth"),
]


@pytest.mark.parametrize(("case", "body", "rule"), HOSTILE, ids=[c for c, _, _ in HOSTILE])
async def test_hostile_bodies_are_a_400_naming_the_rule(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, case: str, body: Any, rule: str) -> None:
    status, raw, _ = await request(warden, "POST", "/v1/messages", body=body, headers={"x-api-key": token()})
    anthropic_error(status, raw, 400, "invalid_request_error", rule)
    assert fake.chat_requests() == [], "nothing reaches the provider"


async def test_malformed_json_and_beta_header(warden: RunningWarden, token: Callable[..., str]) -> None:
    status, raw, _ = await request(warden, "POST", "/v1/messages", raw=b'{"model": "m", ' + MARKER.encode(), headers={"x-api-key": token()})
    anthropic_error(status, raw, 400, "invalid_request_error", "request.json")
    status, raw, _ = await request(warden, "POST", "/v1/messages", body=OK, headers={"x-api-key": token(), "anthropic-beta": "files-api-2025-04-14"})
    anthropic_error(status, raw, 400, "invalid_request_error", "protocol.unsupported")


async def test_translation_depth_bound_holds_under_a_permissive_json_depth(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"server": {"max_json_depth": 500}})
    tool_use = {"type": "tool_use", "id": "t1", "name": "f", "input": _deep(300)}
    body = {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [tool_use]}, {"role": "user", "content": "b"}]}
    # Python's json writes what orjson (past 254 levels) cannot; Warden's own serializer must never meet it.
    status, raw, _ = await request(rw, "POST", "/v1/messages", raw=json.dumps(body).encode(), headers={"x-api-key": token()})
    anthropic_error(status, raw, 400, "invalid_request_error", "request.json_depth")


async def test_size_and_count_bounds(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"server": {"max_body_bytes": 8192, "max_messages": 4, "max_tools": 2}})
    h = {"x-api-key": token()}
    status, raw, _ = await request(rw, "POST", "/v1/messages", body={**OK, "messages": [{"role": "user", "content": MARKER * 400}]}, headers=h)
    anthropic_error(status, raw, 413, "request_too_large", "server.max_body_bytes")
    status, raw, _ = await request(rw, "POST", "/v1/messages", body={**OK, "messages": [{"role": "user", "content": "x"}] * 5}, headers=h)
    anthropic_error(status, raw, 400, "invalid_request_error", "request.max_messages")
    results = [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "r"} for i in range(5)]
    status, raw, _ = await request(rw, "POST", "/v1/messages", body={**OK, "messages": [{"role": "user", "content": results}]}, headers=h)
    anthropic_error(status, raw, 400, "invalid_request_error", "request.max_messages")
    tools = [{"name": f"f{i}", "input_schema": {"type": "object"}} for i in range(3)]
    status, raw, _ = await request(rw, "POST", "/v1/messages", body={**OK, "tools": tools}, headers=h)
    anthropic_error(status, raw, 400, "invalid_request_error", "request.max_tools")


# -- limits, provider, audit, streams -------------------------------------------------------------


async def test_429_from_the_limits_plugin(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": {"backend": "memory", "rules": [{"scope": "user", "requests": "1/minute"}]}})
    client = anthropic_client(rw, token())
    await client.messages.create(**OK)
    with pytest.raises(anthropic.RateLimitError) as err:
        await client.messages.create(**OK)
    body = err.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error" and "(rule: limits.rules[0]" in body["error"]["message"]
    assert int(err.value.response.headers["retry-after"]) > 0


async def test_502_when_the_provider_is_unreachable(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"upstream": {"base_url": "http://127.0.0.1:9/v1", "max_retries": 0}})
    status, raw, _ = await request(rw, "POST", "/v1/messages", body=OK, headers={"x-api-key": token()})
    anthropic_error(status, raw, 502, "api_error", "upstream.base_url")


class FailingAudit:
    """An audit sink whose writes fail: Warden must refuse to answer without a record."""

    healthy = False

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def record_exchange(self, ex: Exchange) -> None:
        raise OSError("disk full")

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None: ...


@pytest.mark.parametrize("stream", [False, True])
async def test_503_when_the_audit_log_cannot_be_written(warden_factory: WardenFactory, token: Callable[..., str], stream: bool) -> None:
    rw = await warden_factory(audit=FailingAudit())
    status, raw, _ = await request(rw, "POST", "/v1/messages", body={**OK, "stream": stream}, headers={"x-api-key": token()})
    if not stream:
        anthropic_error(status, raw, 503, "api_error", "audit.durability")
        return
    assert status == 200
    events = sse_events(raw)
    assert events[-1][0] == "error" and "message_stop" not in [n for n, _ in events], "a stream without its record never ends as if whole"
    err = events[-1][1]
    assert err["type"] == "error" and err["error"]["type"] == "api_error" and "(rule: audit.durability)" in err["error"]["message"]


async def test_a_stream_cut_by_the_provider_ends_with_an_error_event(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three four", cut_after=3))
    with pytest.raises(anthropic.APIStatusError) as err:
        async with aclient.messages.stream(**OK) as s:
            async for _ in s:
                pass
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "(rule: upstream." in body["error"]["message"]


async def test_a_malformed_provider_answer_is_a_502_in_anthropic_format(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="leaked-content", malformed="choices_missing"))
    status, raw, _ = await request(warden, "POST", "/v1/messages", body=OK, headers={"x-api-key": token()})
    anthropic_error(status, raw, 502, "api_error", "upstream.protocol")
    assert b"leaked-content" not in raw


async def test_a_refused_body_is_recorded_by_size_and_digest_in_the_anthropic_protocol(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    body = {**OK, "thinking": {"type": "enabled", "budget_tokens": 1024}, "system": MARKER}
    status, raw, headers = await request(rw, "POST", "/v1/messages", body=body, headers={"x-api-key": token()})
    anthropic_error(status, raw, 400, "invalid_request_error", "protocol.unsupported")
    rec = await rw.warden.audit.find(headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "anthropic.messages" and rec["status"] == 400
    assert rec["error"]["rule"] == "protocol.unsupported" and rec["refused_request"]["refused"] == "protocol.unsupported"
    assert rec["refused_request"]["bytes"] == len(orjson.dumps(body)) and MARKER not in orjson.dumps(rec).decode()
    status, raw, headers = await request(rw, "POST", "/v1/messages", body=OK)
    rec = await rw.warden.audit.find(headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "anthropic.messages" and rec["error"]["rule"] == "auth.missing", "refused before routing, still in its API's protocol"


async def test_the_drain_deadline_ends_an_anthropic_stream_with_an_error_event(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="w " * 200, chunk_delay_s=0.05))
    raw = b""
    async with aiohttp.ClientSession() as s, s.post(warden.base_url + "/messages", json={**OK, "stream": True}, headers={"x-api-key": token()}) as r:
        async for line in r.content:
            raw += line
            if raw.count(b"content_block_delta") == 3 and not warden.warden.stream_cut.is_set():
                warden.warden.stream_cut.set()
    events = sse_events(raw)
    assert events[-1][0] == "error" and "message_stop" not in [n for n, _ in events]
    assert events[-1][1]["error"]["type"] == "api_error" and "(rule: server.drain)" in events[-1][1]["error"]["message"]
    status, body, _ = await request(warden, "POST", "/v1/messages", body=OK, headers={"x-api-key": token()})
    anthropic_error(status, body, 503, "api_error", "server.drain")
