"""What the client sees when the provider fails: the right status, an OpenAI body, no hang."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakeprovider import FakeProvider, Reply

BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_refused_connection_is_502(warden_factory: Any, token: Any) -> None:
    w = await warden_factory({"upstream": {"base_url": f"http://127.0.0.1:{_closed_port()}/v1"}})
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    with pytest.raises(openai.APIStatusError) as ei:
        await c.chat.completions.create(**BODY)
    assert ei.value.status_code == 502
    assert ei.value.body["code"] == "upstream_unavailable"  # type: ignore[index]


async def test_timeout_is_504(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w = await warden_factory({"upstream": {"timeout_s": 0.3, "max_retries": 0}})
    fake.push(Reply(hang=True))
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    with pytest.raises(openai.APIStatusError) as ei:
        await c.chat.completions.create(**BODY)
    assert ei.value.status_code == 504
    assert "(rule: upstream.timeout_s)" in str(ei.value)


async def test_provider_error_status_relayed_with_body(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(status=400, error="context length exceeded"))
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(**BODY)
    assert "context length exceeded" in str(ei.value)
    fake.push(Reply(status=429, error="slow down", headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as ei2:
        await client.chat.completions.create(**BODY)
    assert ei2.value.response.headers["retry-after"] == "7"


async def test_non_json_error_body_becomes_openai_shaped(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(status=500, body=b"<html>oops</html>"))
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(**BODY)
    assert ei.value.body["code"] == "upstream_error"  # type: ignore[index]


async def test_503_before_any_byte_is_retried(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(status=503), Reply(content="recovered"))
    resp = await client.chat.completions.create(**BODY)
    assert resp.choices[0].message.content == "recovered"
    assert len(fake.chat_requests()) == 2


async def test_malformed_json_answer_is_502(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(body=b'{"choices": [broken'))
    with pytest.raises(openai.APIStatusError) as ei:
        await client.chat.completions.create(**BODY)
    assert ei.value.status_code == 502
    assert "(rule: upstream.protocol)" in str(ei.value) and "broken" not in str(ei.value)


async def test_malformed_sse_ends_with_error_event(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(raw_events=[b'{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}', b"this is not json"]))
    stream = await client.chat.completions.create(**BODY, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="malformed stream"):
        async for chunk in stream:
            got.append(chunk)
    assert got and got[0].choices[0].delta.content == "hi"


async def test_stream_cut_midway_ends_with_error_event(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="a b c d e f", cut_after=3))
    stream = await client.chat.completions.create(**BODY, stream=True)
    with pytest.raises(openai.APIError, match="ended before the answer was complete|broke off"):
        async for _ in stream:
            pass


async def test_client_disconnect_mid_stream_cancels_upstream(warden: Any, token: Any, fake: FakeProvider) -> None:
    fake.push(Reply(content=" ".join(["word"] * 200), chunk_delay_s=0.02))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{warden.base_url}/chat/completions", json={**BODY, "stream": True}, headers={"Authorization": f"Bearer {token()}"})
        assert resp.status == 200
        await resp.content.readline()
        resp.close()
    for _ in range(100):
        if fake.disconnects:
            break
        await asyncio.sleep(0.05)
    assert fake.disconnects == 1, "the upstream request is cancelled when the client goes away"
    for _ in range(50):
        if warden.warden.inflight == 0:
            break
        await asyncio.sleep(0.05)
    assert warden.warden.inflight == 0
