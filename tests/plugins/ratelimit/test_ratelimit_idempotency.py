"""Idempotency-Key on SQLite (memory backend) and Redis: replay, conflicts, waiting, tenants."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from llm_warden.plugins.ratelimit.idempotency import REPLAY_HEADER, completion_to_sse
from llm_warden.plugins.ratelimit.plugin import LimitsPlugin
from llm_warden.proxy.errors import BadRequest, Conflict
from tests.plugins.ratelimit.limits_helpers import MakePlugin, Upstream, completion, drive, make_exchange, recorded


@pytest.fixture(params=["sqlite", "redis"])
async def plugin(request: pytest.FixtureRequest, make_plugin: MakePlugin, redis_prefix: str) -> LimitsPlugin:
    if request.param == "sqlite":
        return await make_plugin(backend="memory", idempotency_wait_s=2.0)
    return await make_plugin(backend="redis", key_prefix=redis_prefix, idempotency_wait_s=2.0)


KEY = {"Idempotency-Key": "order-42"}


async def test_retry_replays_the_recorded_answer(plugin: LimitsPlugin) -> None:
    up = Upstream()
    first = await drive(plugin, make_exchange(headers=KEY), up, answer=completion("the answer"))
    assert first.local_reply is None and up.calls == 1
    retry = await drive(plugin, make_exchange(headers=KEY), up)
    assert up.calls == 1
    reply = retry.local_reply
    assert reply is not None and reply.status == 200 and reply.sse_events is None
    assert orjson.loads(reply.body) == completion("the answer")
    assert reply.headers[REPLAY_HEADER] == "true"
    assert reply.headers["content-type"] == "application/json"
    assert plugin.replays == 1


async def test_streamed_answer_is_replayed_as_sse(plugin: LimitsPlugin) -> None:
    up = Upstream()
    answer = completion("streamed words", prompt_tokens=4, completion_tokens=2)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
    await drive(plugin, make_exchange(headers=KEY, stream=True, body=body), up, answer=answer)
    retry = await drive(plugin, make_exchange(headers=KEY, stream=True, body=body), up)
    assert up.calls == 1
    reply = retry.local_reply
    assert reply is not None and reply.sse_events is not None
    assert reply.headers["content-type"] == "text/event-stream"
    chunks = [orjson.loads(e) for e in reply.sse_events]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == "streamed words"
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]] == [None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6


async def test_stream_replay_omits_usage_unless_asked(plugin: LimitsPlugin) -> None:
    up = Upstream()
    await drive(plugin, make_exchange(headers=KEY, stream=True), up)
    retry = await drive(plugin, make_exchange(headers=KEY, stream=True), up)
    assert retry.local_reply is not None and retry.local_reply.sse_events is not None
    assert all(orjson.loads(e)["choices"] for e in retry.local_reply.sse_events)


async def test_failed_stream_status_is_replayed_as_json(plugin: LimitsPlugin) -> None:
    up = Upstream()
    err = {"error": {"message": "unknown model", "type": "invalid_request_error", "code": None, "param": "model"}}
    await drive(plugin, make_exchange(headers=KEY, stream=True), up, status=404, answer=err)
    retry = await drive(plugin, make_exchange(headers=KEY, stream=True), up)
    assert up.calls == 1
    assert retry.local_reply is not None and retry.local_reply.sse_events is None and retry.local_reply.status == 404
    assert orjson.loads(retry.local_reply.body) == err


async def test_same_key_different_body_is_409(plugin: LimitsPlugin) -> None:
    await drive(plugin, make_exchange(headers=KEY))
    other = make_exchange(headers=KEY, body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "different"}]})
    ex = await drive(plugin, other)
    assert isinstance(ex.error, Conflict) and ex.status == 409
    assert ex.error.rule == "limits.idempotency" and "different request body" in ex.error.message


async def test_concurrent_duplicate_waits_for_the_first(plugin: LimitsPlugin) -> None:
    up = Upstream()
    gate = asyncio.Event()

    async def slow_provider() -> None:
        await gate.wait()

    first = asyncio.create_task(drive(plugin, make_exchange(headers=KEY), up, answer=completion("once"), before_complete=slow_provider))
    await asyncio.sleep(0.05)
    dupes = [asyncio.create_task(drive(plugin, make_exchange(headers=KEY), up)) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert not any(d.done() for d in dupes)  # waiting, not calling the provider
    gate.set()
    await first
    results = await asyncio.gather(*dupes)
    assert up.calls == 1
    for ex in results:
        assert ex.local_reply is not None and orjson.loads(ex.local_reply.body)["choices"][0]["message"]["content"] == "once"
        assert recorded(ex)["idempotency"] == "replay after wait"


async def test_waiting_is_bounded(make_plugin: MakePlugin) -> None:
    p = await make_plugin(idempotency_wait_s=0.2)
    first = make_exchange(headers=KEY)
    await p.on_request(first)  # still running
    ex = await drive(p, make_exchange(headers=KEY))
    assert isinstance(ex.error, Conflict) and "still in progress after waiting 0.2 s" in ex.error.message
    assert ex.error.headers["Retry-After"] == "1"


async def test_tenants_are_separate(plugin: LimitsPlugin) -> None:
    up = Upstream()
    await drive(plugin, make_exchange(tenant="a", headers=KEY), up, answer=completion("for tenant a"))
    b = await drive(plugin, make_exchange(tenant="b", headers=KEY), up, answer=completion("for tenant b"))
    assert b.local_reply is None and up.calls == 2
    # keys are per caller: another user of tenant a does not get the answer either...
    carol = await drive(plugin, make_exchange(tenant="a", subject="carol", headers=KEY), up, answer=completion("for carol"))
    assert carol.local_reply is None and up.calls == 3
    # ...while the same caller's retry is replayed
    a2 = await drive(plugin, make_exchange(tenant="a", headers=KEY), up)
    assert a2.local_reply is not None and b"for tenant a" in a2.local_reply.body


async def test_failed_first_attempt_releases_the_key(plugin: LimitsPlugin) -> None:
    up = Upstream()
    failed = await drive(plugin, make_exchange(headers=KEY), up, status=502)
    assert failed.local_reply is None
    retry = await drive(plugin, make_exchange(headers=KEY), up, answer=completion("second try"))
    assert retry.local_reply is None and up.calls == 2
    third = await drive(plugin, make_exchange(headers=KEY), up)
    assert third.local_reply is not None and b"second try" in third.local_reply.body


async def test_upstream_429_is_not_recorded(plugin: LimitsPlugin) -> None:
    up = Upstream()
    await drive(plugin, make_exchange(headers=KEY), up, status=429, answer={"error": {"message": "slow down"}})
    assert (await drive(plugin, make_exchange(headers=KEY), up)).local_reply is None
    assert up.calls == 2


async def test_client_error_answers_are_recorded(plugin: LimitsPlugin) -> None:
    up = Upstream()
    await drive(plugin, make_exchange(headers=KEY), up, status=400, answer={"error": {"message": "bad model"}})
    replay = await drive(plugin, make_exchange(headers=KEY), up)
    assert replay.local_reply is not None and replay.local_reply.status == 400 and up.calls == 1


async def test_refused_request_releases_the_key(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "tenant", "requests": "1/minute"}])
    up = Upstream()
    await drive(p, make_exchange(), up)
    refused = await drive(p, make_exchange(headers=KEY), up)
    assert refused.status == 429
    # the key is free again: a later retry is processed (and limited) anew, not stuck
    again = await drive(p, make_exchange(headers=KEY), up)
    assert again.status == 429 and not isinstance(again.error, Conflict)


async def test_replays_are_not_charged(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "tenant", "requests": "1/minute"}])
    up = Upstream()
    await drive(p, make_exchange(headers=KEY), up)
    for _ in range(3):
        assert (await drive(p, make_exchange(headers=KEY), up)).local_reply is not None


async def test_invalid_key_is_400(plugin: LimitsPlugin) -> None:
    for bad in ("", "x" * 256, "naïve", "tab\there"):
        ex = await drive(plugin, make_exchange(headers={"Idempotency-Key": bad}))
        assert isinstance(ex.error, BadRequest) and ex.error.param == "Idempotency-Key"


async def test_expired_record_is_processed_again(make_plugin: MakePlugin) -> None:
    p = await make_plugin(idempotency_ttl_s=0.15)
    up = Upstream()
    await drive(p, make_exchange(headers=KEY), up)
    assert (await drive(p, make_exchange(headers=KEY), up)).local_reply is not None
    await asyncio.sleep(0.2)
    assert (await drive(p, make_exchange(headers=KEY), up)).local_reply is None
    assert up.calls == 2


async def test_oversized_answer_is_not_recorded(make_plugin: MakePlugin) -> None:
    p = await make_plugin(idempotency_max_bytes=100)
    up = Upstream()
    await drive(p, make_exchange(headers=KEY), up, answer=completion("x" * 200))
    assert (await drive(p, make_exchange(headers=KEY), up)).local_reply is None


async def test_waiter_registry_is_cleaned_up(make_plugin: MakePlugin) -> None:
    p = await make_plugin(idempotency_wait_s=0.1)
    first = make_exchange(headers=KEY)
    await p.on_request(first)
    await drive(p, make_exchange(headers=KEY))
    assert len(p.waiters) == 0


def test_completion_to_sse_with_tool_calls() -> None:
    body = completion()
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":1}'}}],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    first = orjson.loads(completion_to_sse(body)[0])
    tc = first["choices"][0]["delta"]["tool_calls"][0]
    assert tc == {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":1}'}}
