"""``POST /v1/responses`` end to end: the official ``openai`` SDK's ``client.responses`` through a running Warden to the chat-format fake provider."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
    "strict": True,
}


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event of a Responses stream, in order."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


async def post(rw: RunningWarden, body: Any, token: str, path: str = "/responses", method: str = "POST") -> tuple[int, bytes, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s, s.request(method, rw.base_url + path, data=data, headers=headers) as r:
        return r.status, await r.read(), r.headers


async def test_create_translates_the_request_and_renders_a_response(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="Hi Alice.", usage={"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}, model="gpt-up"))
    raw = await client.responses.with_raw_response.create(
        model="gpt-test",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Be kind."},
            {"role": "user", "content": "Hello"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Again"}]},
        ],
        max_output_tokens=64,
        temperature=0.3,
        top_p=0.9,
        user="u-42",
        safety_identifier="h-42",
        metadata={"ticket": "T-1"},
        store=False,
    )
    resp = raw.parse()
    assert resp.object == "response" and resp.status == "completed" and resp.model == "gpt-up"
    assert resp.output_text == "Hi Alice."
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert resp.usage is not None and (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (21, 4, 25)
    rid = raw.headers["x-request-id"]
    assert resp.id == "resp_" + rid.removeprefix("req_") and item.id.startswith("msg_")
    assert resp.instructions == "Be brief." and resp.metadata == {"ticket": "T-1"} and resp.max_output_tokens == 64
    assert resp.temperature == 0.3 and resp.user == "u-42" and resp.incomplete_details is None
    assert resp.model_extra is not None and resp.model_extra["store"] is False, "nothing is kept on any server"
    sent = fake.chat_requests()[-1]
    assert sent.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"},
        ],
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.9,
        "user": "u-42",
        "safety_identifier": "h-42",
    }
    assert sent.headers["Authorization"].startswith("Bearer sk-test-provider"), "the provider key goes upstream, never the caller's token"


async def test_a_string_input_is_one_user_message(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    resp = await client.responses.create(model="m", input="Hello there")
    assert resp.output_text == "Hello from the fake provider."
    assert fake.chat_requests()[-1].body["messages"] == [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
async def test_a_cut_answer_is_incomplete_with_its_reason(client: openai.AsyncOpenAI, fake: FakeProvider, finish: str, reason: str) -> None:
    fake.push(Reply(content="cut", finish_reason=finish))
    resp = await client.responses.create(model="m", input="x")
    assert resp.status == "incomplete" and resp.incomplete_details is not None and resp.incomplete_details.reason == reason
    assert resp.output[0].status == "incomplete"


async def test_stream_events_in_order_with_sequence_numbers(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three", usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}))
    status, raw, headers = await post(warden, {"model": "m", "stream": True, "input": "count"}, token())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "one two three"
    done = events[-1][1]["response"]
    assert done["status"] == "completed" and done["store"] is False
    assert done["usage"] == {
        "input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12,
    }  # fmt: skip
    assert done["output"][0]["content"][0]["text"] == "one two three"
    sent = fake.chat_requests()[-1].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_sdk_stream_helper_accumulates_the_response(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="Streaming works fine", usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}))
    async with client.responses.stream(model="m", input="go") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "Streaming works fine" == final.output_text
    assert final.status == "completed" and final.usage is not None and final.usage.total_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
async def test_function_call_round_trip(client: openai.AsyncOpenAI, fake: FakeProvider, stream: bool) -> None:
    fake.push(Reply(content="Let me check.", tool_calls=[{"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]))
    kw: dict[str, Any] = {"model": "m", "tools": [WEATHER], "input": [{"role": "user", "content": "Weather in Paris?"}], "parallel_tool_calls": False}
    if stream:
        async with client.responses.stream(**kw) as s:
            async for _ in s:
                pass
            resp: Any = await s.get_final_response()
    else:
        resp = await client.responses.create(**kw)
    assert [o.type for o in resp.output] == ["message", "function_call"]
    call = resp.output[1]
    assert (call.call_id, call.name, call.arguments, call.status) == ("call_w1", "get_weather", '{"city": "Paris"}', "completed")
    assert call.id.startswith("fc_") and resp.parallel_tool_calls is False
    sent = fake.chat_requests()[-1].body
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["parameters"], "strict": True}}]
    assert sent["parallel_tool_calls"] is False
    # The application runs the tool and sends the output back with the whole conversation (no previous_response_id).
    fake.push(Reply(content="It is sunny in Paris."))
    follow = await client.responses.create(
        **{**kw, "input": [*kw["input"], *[o.model_dump(exclude_none=True, exclude={"parsed_arguments"}) for o in resp.output],
                           {"type": "function_call_output", "call_id": "call_w1", "output": "sunny, 24C"}]},
    )  # fmt: skip
    assert follow.output_text == "It is sunny in Paris."
    msgs = fake.chat_requests()[-1].body["messages"]
    assert msgs[1:] == [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 24C"},
    ]


async def test_stream_of_a_function_call_has_its_typed_events(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content=None, tool_calls=[{"id": "c9", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]))
    status, raw, _ = await post(warden, {"model": "m", "stream": True, "input": "Oslo?", "tools": [WEATHER]}, token())
    events = sse_events(raw)
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    added, done = events[2][1], events[5][1]
    assert added["item"]["type"] == "function_call" and added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert done["item"] == {**added["item"], "arguments": '{"city": "Oslo"}', "status": "completed"}
    assert events[4][1]["arguments"] == '{"city": "Oslo"}' and events[4][1]["name"] == "get_weather"


async def test_tool_choice_text_format_and_reasoning_are_translated(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    await client.responses.create(
        model="m", input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "count", "schema": schema, "strict": True}, "verbosity": "low"},
        reasoning={"effort": "low"}, include=[], truncation="disabled", prompt_cache_key="k1",
    )  # fmt: skip
    sent = fake.chat_requests()[-1].body
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}
    assert sent["verbosity"] == "low" and sent["reasoning_effort"] == "low" and sent["prompt_cache_key"] == "k1"
    await client.responses.create(model="m", input="x", tools=[WEATHER], tool_choice="required", text={"format": {"type": "json_object"}})
    sent = fake.chat_requests()[-1].body
    assert sent["tool_choice"] == "required" and sent["response_format"] == {"type": "json_object"}


async def test_images_become_image_parts(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    await client.responses.create(model="m", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
        {"type": "input_image", "image_url": "https://example.test/cat.jpg", "detail": "auto"},
    ]}])  # fmt: skip
    assert fake.chat_requests()[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg", "detail": "auto"}},
    ]


async def test_a_provider_error_keeps_its_status_and_openai_body(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(status=400, error="context length exceeded"))
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(model="m", input="x")
    body = err.value.body
    assert isinstance(body, dict) and body["message"] == "context length exceeded"


async def test_the_record_has_the_protocol_and_the_turns(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    fake.push(Reply(content="Hello.", tool_calls=[{"id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'}]))
    raw = await client.responses.with_raw_response.create(model="m", max_output_tokens=9, tools=[WEATHER], input="Rome?")
    await client.close()
    rec = await rw.warden.audit.find(raw.headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "openai.responses" and rec["route"] == "responses" and rec["path"] == "/v1/responses"
    assert rec["status"] == 200 and rec["model"]["requested"] == "m"
    assert rec["turns"][0]["request"]["messages"] == [{"role": "user", "content": "Rome?"}], "the turn as sent upstream, in the chat shape"
    assert rec["tool_calls"][0]["name"] == "get_weather" and rec["tool_calls"][0]["decision"] == "allow"
    assert rec["params"]["max_tokens"] == 9 and rec["params"]["tools_offered"] == ["get_weather"]


async def test_metrics_and_traces_are_labelled_by_the_responses_route(warden: RunningWarden, client: openai.AsyncOpenAI) -> None:
    await client.responses.create(model="m", input="x")
    async with aiohttp.ClientSession() as s, s.get(warden.admin_url + "/metrics") as r:
        text = await r.text()
    assert any(line.startswith("warden_requests_total{") and 'route="responses"' in line and 'status_class="2xx"' in line for line in text.splitlines())


async def test_a_provider_keep_alive_starts_the_response_once(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="hi there", comment=b"keep-alive"))
    status, raw, _ = await post(warden, {"model": "m", "stream": True, "input": "x"}, token())
    names = [n for n, _ in sse_events(raw)]
    assert status == 200 and names[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert names.count("response.created") == 1 and names[-1] == "response.completed"


async def test_the_trace_is_a_genai_chat_span_with_the_responses_protocol(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from llm_warden.proxy.tracing import Tracing

    exporter = InMemorySpanExporter()
    warden.warden.tracing = Tracing(warden.warden.config, exporter=exporter)
    status, _, _ = await post(warden, {"model": "m", "input": "x", "temperature": 0.5, "max_output_tokens": 20}, token())
    assert status == 200
    for _ in range(100):
        (server, *_) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER] or [None]
        if server is not None:
            break
        await asyncio.sleep(0.01)
    assert server is not None
    a = dict(server.attributes or {})
    assert a["warden.protocol"] == "openai.responses" and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.max_tokens"] == 20


async def test_structured_output_parses_through_the_sdk(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    from pydantic import BaseModel

    class Count(BaseModel):
        n: int

    fake.push(Reply(content='{"n": 3}'))
    resp = await client.responses.parse(model="m", input="count", text_format=Count)
    assert resp.output_parsed == Count(n=3)
    fmt = fake.chat_requests()[-1].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Count" and fmt["json_schema"]["strict"] is True


CITED = "See the docs."
URL = {"type": "url_citation", "url_citation": {"start_index": 4, "end_index": 12, "title": "Docs", "url": "https://docs.test/"}}


def _completion(message: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}]})


def _chunks(*deltas: dict[str, Any]) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    return [chunk({"role": "assistant"}), *[chunk(d) for d in deltas], chunk({}, "stop"), b"[DONE]"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refusal_and_the_providers_url_citations_are_rendered(client: openai.AsyncOpenAI, fake: FakeProvider, stream: bool) -> None:
    if stream:
        fake.push(Reply(raw_events=_chunks({"content": CITED, "annotations": [URL]}, {"refusal": "I cannot do more."})))
        async with client.responses.stream(model="m", input="x") as s:
            refusal = "".join([e.delta async for e in s if e.type == "response.refusal.delta"])
            resp: Any = await s.get_final_response()
        assert refusal == "I cannot do more."
    else:
        fake.push(Reply(body=_completion({"content": CITED, "refusal": "I cannot do more.", "annotations": [URL]})))
        resp = await client.responses.create(model="m", input="x")
    text, refused = resp.output[0].content
    assert text.type == "output_text" and text.text == CITED and refused.type == "refusal" and refused.refusal == "I cannot do more."
    (a,) = text.annotations
    assert (a.type, a.url, a.title, a.start_index, a.end_index) == ("url_citation", "https://docs.test/", "Docs", 4, 12)


async def test_a_provider_cut_mid_stream_ends_with_error_then_response_failed(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three four five", cut_after=3))
    status, raw, _ = await post(warden, {"model": "m", "stream": True, "input": "x"}, token())
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert status == 200 and names[-2:] == ["error", "response.failed"] and "response.completed" not in names
    assert "(rule: upstream." in events[-2][1]["message"]
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == "one two"
