"""Limits end to end: the official openai SDK through a running Warden to the fake provider."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import openai
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply

MSG = [{"role": "user", "content": "hello"}]


def sdk(rw: RunningWarden, token: Callable[..., str], **claims: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(**claims), max_retries=0, timeout=10)


async def start(warden_factory: WardenFactory, **limits: Any) -> RunningWarden:
    return await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": limits})


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, redis_prefix: str) -> dict[str, str]:
    return {"backend": "memory"} if request.param == "memory" else {"backend": "redis", "key_prefix": redis_prefix}


async def test_429_with_retry_after_through_the_sdk(
    warden_factory: WardenFactory, token: Callable[..., str], backend: dict[str, str]
) -> None:
    rw = await start(warden_factory, **backend, rules=[{"scope": "user", "requests": "2/minute"}])
    client = sdk(rw, token)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    await client.chat.completions.create(model="gpt-test", messages=MSG)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="gpt-test", messages=MSG)
    e = err.value
    assert e.status_code == 429
    assert int(e.response.headers["retry-after"]) in (29, 30)
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.code == "rate_limit_exceeded"
    assert "limits.rules[0] (user requests 2/minute)" in e.message
    # another user is not affected
    other = sdk(rw, token, sub="bob")
    assert (await other.chat.completions.create(model="gpt-test", messages=MSG)).choices[0].message.content


async def test_streamed_answer_replayed_for_the_same_idempotency_key(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, backend: dict[str, str]
) -> None:
    rw = await start(warden_factory, **backend)
    client = sdk(rw, token)
    fake.push(Reply(content="exactly once please"))
    headers = {"Idempotency-Key": "pay-7781"}

    async def run() -> tuple[str, Any, dict[str, str]]:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MSG, stream=True, stream_options={"include_usage": True}, extra_headers=headers
        )
        stream = raw.parse()
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage, dict(raw.headers)

    first_text, first_usage, first_headers = await run()
    again_text, again_usage, again_headers = await run()
    assert first_text == again_text == "exactly once please"
    assert again_usage == first_usage and again_usage is not None
    assert len(fake.chat_requests()) == 1
    assert "x-warden-idempotent-replay" not in first_headers
    assert again_headers["x-warden-idempotent-replay"] == "true"
    assert again_headers["x-request-id"] != first_headers["x-request-id"]
    # the same key with another body is a conflict
    with pytest.raises(openai.ConflictError) as err:
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "other"}], extra_headers=headers)
    assert "different request body" in err.value.message


async def test_concurrent_duplicates_call_the_provider_once(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory)
    client = sdk(rw, token)
    fake.push(Reply(content="slow answer", delay_s=0.3))
    headers = {"Idempotency-Key": "dup-1"}
    results = await asyncio.gather(
        *[client.chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers) for _ in range(4)]
    )
    assert {r.choices[0].message.content for r in results} == {"slow answer"}
    assert len({r.id for r in results}) == 1
    assert len(fake.chat_requests()) == 1


async def test_idempotency_is_per_tenant(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory)
    fake.push(Reply(content="tenant a secret"), Reply(content="tenant b answer"))
    headers = {"Idempotency-Key": "same-key"}
    a = await sdk(rw, token, tenant="a").chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    b = await sdk(rw, token, tenant="b").chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    assert a.choices[0].message.content == "tenant a secret"
    assert b.choices[0].message.content == "tenant b answer"
    assert len(fake.chat_requests()) == 2


async def test_idempotency_is_per_user_within_a_tenant(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    """A recorded answer may hold context only its user may read: another user's same key does not replay it."""
    rw = await start(warden_factory)
    fake.push(Reply(content="alice's answer"), Reply(content="bob's answer"))
    headers = {"Idempotency-Key": "same-key"}
    a = await sdk(rw, token, tenant="a", sub="alice").chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    b = await sdk(rw, token, tenant="a", sub="bob").chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    assert a.choices[0].message.content == "alice's answer"
    assert b.choices[0].message.content == "bob's answer"
    assert len(fake.chat_requests()) == 2


async def test_streamed_tokens_are_reconciled(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    # Per hour, so the bucket refills by ~1 token a second: a loaded machine cannot blur the count.
    rw = await start(warden_factory, rules=[{"scope": "tenant", "tokens": "5000/hour"}])
    client = sdk(rw, token)
    fake.push(Reply(content="a b c", usage={"prompt_tokens": 40, "completion_tokens": 60, "total_tokens": 100}))
    stream = await client.chat.completions.create(model="gpt-test", messages=MSG, stream=True, max_tokens=2000)
    _ = [c async for c in stream]  # the complete hooks (reconciliation) ran before the stream's end was sent
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, max_tokens=0)
    # after the stream only its 100 reported tokens remain charged, not the 2000+ reserved
    reserved_now = 5000 - 100 - int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 0 < reserved_now < 20


async def test_upstream_429_is_relayed_with_retry_after(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory)
    client = sdk(rw, token)
    fake.push(Reply(status=429, error="provider quota", headers={"Retry-After": "7"}), Reply(content="fine now"))
    headers = {"Idempotency-Key": "retry-me"}
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    assert err.value.response.headers["retry-after"] == "7"
    # the provider's 429 was not recorded: the retry reaches the provider
    ok = await client.chat.completions.create(model="gpt-test", messages=MSG, extra_headers=headers)
    assert ok.choices[0].message.content == "fine now"
    assert len(fake.chat_requests()) == 2


async def test_upstream_concurrency_cap(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, upstream_concurrency=1, upstream_queue_s=5)
    client = sdk(rw, token)
    fake.push(Reply(content="one", delay_s=0.2), Reply(content="two", delay_s=0.2))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(*[client.chat.completions.create(model="gpt-test", messages=MSG) for _ in range(2)])
    assert sorted(r.choices[0].message.content or "" for r in results) == ["one", "two"]
    assert loop.time() - t0 >= 0.4  # one at a time
