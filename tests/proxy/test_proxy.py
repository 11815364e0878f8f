"""The proxy end to end: the official openai SDK through Warden to the fake provider."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import PROVIDER_KEY
from tests.fakeprovider import FakeProvider, Reply


async def test_non_streaming_chat(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="The answer is 42."))
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    resp = raw.parse()
    assert resp.choices[0].message.content == "The answer is 42."
    assert resp.usage is not None and resp.usage.total_tokens > 0
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-warden-principal"] == "acme/alice"
    assert raw.headers["x-warden-upstream-turns"] == "1"
    (req,) = fake.chat_requests()
    assert req.headers["Authorization"] == f"Bearer {PROVIDER_KEY}", "the provider key, never the caller's token"
    assert req.body["messages"] == [{"role": "user", "content": "hi"}]
    assert req.headers["traceparent"].startswith("00-")


async def test_streaming_chat_relays_events(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three four"))
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "count"}], stream=True)
    pieces = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "one two three four"
    assert len(pieces) == 4, "relayed event by event"
    (req,) = fake.chat_requests()
    assert req.body["stream_options"] == {"include_usage": True}, "Warden asks for usage to account tokens"


async def test_streaming_usage_only_when_client_asked(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_streaming_preserves_time_to_first_token(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="a b c d e", chunk_delay_s=0.15))
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    first_at = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first_at is None:
            first_at = loop.time() - start
    total = loop.time() - start
    assert first_at is not None and first_at < total - 0.4, (first_at, total)


async def test_models_and_embeddings(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    emb = await client.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == fake.embedding_dim


async def test_a_configured_passthrough_is_authenticated(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w = await warden_factory({"server": {"passthrough_routes": ["POST /v1/files/{file_id}"]}})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/files/abc?x=1", json={"a": 1}, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
            body = await r.json()
            assert body["path"] == "/v1/files/abc" and body["body"] == {"a": 1}
        async with s.post(f"{w.base_url}/files/abc", json={"a": 1}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "missing_token"
    (req,) = fake.requests
    assert req.raw_path == "/v1/files/abc?x=1"
    assert req.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_request_id_propagation(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        h = {"Authorization": f"Bearer {token()}", "x-request-id": "app-req-123"}
        async with s.post(f"{warden.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
            assert r.headers["x-request-id"] == "app-req-123"
        h["x-request-id"] = "bad id\twith junk" + "x" * 300
        async with s.post(f"{warden.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
            assert r.headers["x-request-id"].startswith("req_")
    assert fake.chat_requests()[0].headers["x-request-id"] == "app-req-123"


async def test_traceparent_continues_the_trace(warden: Any, token: Any, fake: FakeProvider) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with aiohttp.ClientSession() as s:
        h = {"Authorization": f"Bearer {token()}", "traceparent": tp}
        async with s.post(f"{warden.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
            assert r.status == 200
    sent = fake.chat_requests()[0].headers["traceparent"]
    assert sent.startswith("00-0af7651916cd43dd8448eb211c80319c-") and sent != tp


@pytest.mark.parametrize(
    "body,param,rule",
    [
        (b"{not json", None, "request.json"),
        (b"[1,2]", None, "request.json"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "request.schema"),
        (b'{"model": "m", "messages": []}', "messages", "request.schema"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "request.schema"),
    ],
)
async def test_bad_requests_are_400(warden: Any, token: Any, fake: FakeProvider, body: bytes, param: str | None, rule: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{warden.base_url}/chat/completions", data=body, headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param
            assert f"(rule: {rule})" in err["message"]
            assert "Traceback" not in err["message"]
    assert fake.chat_requests() == []


async def test_oversized_body_is_413(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w = await warden_factory({"server": {"max_body_bytes": 2048}})
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/chat/completions", json=big, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "payload_too_large"


async def test_unknown_route_is_openai_404(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        for url in (warden.base_url.replace("/v1", "/nope"), warden.base_url + "/files/abc"):
            async with s.get(url, headers={"Authorization": f"Bearer {token()}"}) as r:
                assert r.status == 404
                err = (await r.json())["error"]
                assert err["code"] == "not_found" and "(rule: server.routes)" in err["message"]
            # Authentication runs before routing: without a token, the allow-list is not revealed.
            async with s.get(url) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "missing_token"
    assert fake.requests == []


async def test_stream_relays_keepalive_comments_and_provider_headers(warden: Any, token: Any, fake: FakeProvider) -> None:
    fake.push(Reply(content="hi there", comment=b"PROCESSING", headers={"openai-processing-ms": "42"}))
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with s.post(f"{warden.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.headers["openai-processing-ms"] == "42"
            raw = await r.read()
    assert raw.startswith(b": PROCESSING\n\n")
    assert raw.rstrip().endswith(b"data: [DONE]")
