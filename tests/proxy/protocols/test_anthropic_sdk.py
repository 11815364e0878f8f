"""``POST /v1/messages`` end to end: the official ``anthropic`` SDK through a running Warden to the OpenAI-format fake provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.protocols.conftest import anthropic_client

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event of an Anthropic stream, in order."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


async def post(rw: RunningWarden, body: Any, headers: dict[str, str], path: str = "/messages") -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + path, data=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.read(), r.headers


async def test_create_translates_the_request_and_renders_a_message(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    fake.push(Reply(content="Hi Alice.", usage={"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}, model="gpt-up"))
    raw = await aclient.messages.with_raw_response.create(
        model="claude-test",
        max_tokens=64,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "text", "text": "Again"}]}],
        stop_sequences=["END"],
        metadata={"user_id": "u-42"},
        extra_body={"temperature": 0.3, "top_p": 0.9},  # sampling fields the Messages API takes (this SDK no longer names them)
    )
    msg = await raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "gpt-up"
    assert [(b.type, getattr(b, "text", None)) for b in msg.content] == [("text", "Hi Alice.")]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (21, 4)
    rid = raw.headers["x-request-id"]
    assert raw.headers["request-id"] == rid and msg.id == "msg_" + rid.removeprefix("req_")
    sent = fake.chat_requests()[-1]
    assert sent.body == {
        "model": "claude-test",
        "messages": [
            {"role": "system", "content": "Be brief.\nBe kind."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"},
        ],
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["END"],
        "user": "u-42",
    }
    assert "x-api-key" not in sent.headers and "anthropic-version" not in sent.headers
    assert sent.headers["Authorization"].startswith("Bearer sk-test-provider"), "the provider key goes upstream, never the caller's token"


@pytest.mark.parametrize(("finish", "expected"), [("length", "max_tokens"), ("content_filter", "refusal"), ("model_length", "model_context_window_exceeded")])
async def test_finish_reasons_become_stop_reasons(aclient: anthropic.AsyncAnthropic, fake: FakeProvider, finish: str, expected: str) -> None:
    fake.push(Reply(content="cut", finish_reason=finish))
    msg = await aclient.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert msg.stop_reason == expected


async def test_stream_events_in_anthropic_order_with_usage(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three", usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}))
    status, raw, headers = await post(warden, {"model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "count"}]}, {"x-api-key": token()})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["stop_reason"] is None
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "one two three"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None} and delta["usage"] == {"input_tokens": 9, "output_tokens": 3}
    sent = fake.chat_requests()[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_sdk_stream_helper_accumulates_the_message(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    fake.push(Reply(content="Streaming works fine", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}))
    async with aclient.messages.stream(model="m", max_tokens=20, messages=[{"role": "user", "content": "go"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Streaming works fine"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn" and (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_round_trip(aclient: anthropic.AsyncAnthropic, fake: FakeProvider, stream: bool) -> None:
    fake.push(Reply(content="Let me check.", tool_calls=[{"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]))
    kw: dict[str, Any] = {"model": "m", "max_tokens": 50, "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    if stream:
        async with aclient.messages.stream(**kw) as s:
            async for _ in s:
                pass
            msg: Any = await s.get_final_message()
    else:
        msg = await aclient.messages.create(**kw)
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    use = msg.content[1]
    assert (use.id, use.name, use.input) == ("call_w1", "get_weather", {"city": "Paris"})
    assert msg.stop_reason == "tool_use"
    sent = fake.chat_requests()[-1].body
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"], "description": WEATHER["description"]}}]
    # The application runs the tool and sends the result back, as the SDK documents.
    fake.push(Reply(content="It is sunny in Paris."))
    follow = await aclient.messages.create(
        **{**kw, "messages": [*kw["messages"], {"role": "assistant", "content": msg.content}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_w1", "content": "sunny, 24C"}, {"type": "text", "text": "Summarise."}]}]},
    )
    assert follow.content[0].text == "It is sunny in Paris."
    msgs = fake.chat_requests()[-1].body["messages"]
    assert msgs[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
    }
    assert msgs[2:] == [{"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 24C"}, {"role": "user", "content": "Summarise."}]


async def test_tool_choice_and_tool_error_results_are_translated(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    history: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [{"type": "text", "text": "timeout"}]}]},
    ]
    await aclient.messages.create(model="m", max_tokens=5, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, messages=history)
    sent = fake.chat_requests()[-1].body
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}} and sent["parallel_tool_calls"] is False
    assert sent["messages"][1]["content"] is None and sent["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "Tool error: timeout"}
    await aclient.messages.create(model="m", max_tokens=5, tools=[WEATHER], tool_choice={"type": "any"}, messages=[{"role": "user", "content": "x"}])
    assert fake.chat_requests()[-1].body["tool_choice"] == "required"


async def test_images_become_image_parts(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    await aclient.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
    ]}])
    assert fake.chat_requests()[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
    ]


async def test_a_provider_error_keeps_its_status_in_anthropic_format(aclient: anthropic.AsyncAnthropic, fake: FakeProvider) -> None:
    fake.push(Reply(status=400, error="context length exceeded"))
    with pytest.raises(anthropic.BadRequestError) as err:
        await aclient.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "the provider answered 400: context length exceeded" == body["error"]["message"]
    assert body["request_id"] == err.value.response.headers["x-request-id"]


async def test_bearer_auth_token_works_as_well(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    client = anthropic_client(warden, None, auth_token=token())  # type: ignore[arg-type]
    msg = await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert msg.content[0].type == "text"


async def test_the_record_is_one_format_with_the_anthropic_protocol(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    client = anthropic_client(rw, token())
    fake.push(Reply(content="Hello.", tool_calls=[{"id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'}]))
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=9, tools=[WEATHER], messages=[{"role": "user", "content": "Rome?"}])
    rec = await rw.warden.audit.find(raw.headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "anthropic.messages" and rec["route"] == "messages" and rec["path"] == "/v1/messages"
    assert rec["status"] == 200 and rec["model"]["requested"] == "m"
    assert rec["turns"][0]["request"]["messages"] == [{"role": "user", "content": "Rome?"}], "the turn as sent upstream, in the chat shape"
    assert rec["turns"][0]["response"]["object"] == "chat.completion"
    assert rec["tool_calls"][0]["name"] == "get_weather" and rec["tool_calls"][0]["decision"] == "allow"
    assert rec["params"]["max_tokens"] == 9 and rec["params"]["tools_offered"] == ["get_weather"]
    assert "x-api-key" not in rec["request_headers"] and "anthropic-version" in rec["request_headers"]
    assert rec["usage"]["prompt_tokens"] > 0


async def test_metrics_are_labelled_by_the_messages_route(warden: RunningWarden, aclient: anthropic.AsyncAnthropic) -> None:
    await aclient.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    async with aiohttp.ClientSession() as s, s.get(warden.admin_url + "/metrics") as r:
        text = await r.text()
    assert any(line.startswith("warden_requests_total{") and 'route="messages"' in line and 'status_class="2xx"' in line for line in text.splitlines())


async def test_a_provider_keep_alive_starts_the_message_once(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="hi there", comment=b"keep-alive"))
    status, raw, _ = await post(warden, {"model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]}, {"x-api-key": token()})
    names = [n for n, _ in sse_events(raw)]
    assert status == 200 and names[:3] == ["message_start", "ping", "content_block_start"] and names.count("message_start") == 1
    assert names[-2:] == ["message_delta", "message_stop"]
