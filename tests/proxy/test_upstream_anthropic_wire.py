"""A hostile or broken Anthropic provider: answers that break the Messages wire are refused before anything of them is relayed.

Non-streamed: 502 ``upstream.protocol`` and nothing of the answer.  Streamed: the good events before the bad one
are relayed, then the stream ends with an error event (never a clean end), and the record says so.  Events
past ``[upstream] max_sse_event_bytes`` fail the stream; a stream that ends without ``message_stop`` is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.sse import RawEvent, SSEError
from llm_warden.proxy.upstream_anthropic_answer import MessagesStream, ProviderStreamError, completion_of
from tests.conftest import WardenFactory
from tests.fakeprovider import ANTHROPIC_MALFORMED, FakeProvider, Reply

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
# Defects of one shape only (the other shape of the answer has no such event or field), or legal ones.
STREAM_ONLY = {"no_message_stop", "error_event", "delta_to_closed_block", "second_message_start", "event_name_mismatch", "before_message_start", "unknown_event"}
LEGAL = {"unknown_event"}


async def _chat(rw: Any, token: Callable[..., str], stream: bool) -> tuple[int, bytes, str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": stream}
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        return r.status, await r.read(), r.headers["x-request-id"]


def _warden(warden_factory: WardenFactory, **upstream: Any) -> Any:
    return warden_factory({"audit": {"enabled": True}, "upstream": {"api": "anthropic", **upstream}})


@pytest.mark.parametrize("name", sorted(set(ANTHROPIC_MALFORMED) - STREAM_ONLY))
async def test_a_malformed_message_is_a_502_naming_the_rule(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, name: str) -> None:
    rw = await _warden(warden_factory)
    fake.push(Reply(content="secret-looking-content", malformed=name, tool_calls=[{"name": "lookup", "arguments": "{}"}]))
    status, body, rid = await _chat(rw, token, stream=False)
    assert status == 502, body
    assert "upstream.protocol" in orjson.loads(body)["error"]["message"]
    assert b"secret-looking-content" not in body and b"toolu_" not in body
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and rec["status"] == 502 and rec["error"]["rule"] == "upstream.protocol" and rec["turns"][0]["error_kind"] == "malformed"


@pytest.mark.parametrize("name", sorted(set(ANTHROPIC_MALFORMED) - LEGAL))
async def test_a_stream_that_goes_bad_ends_with_an_error_event_and_a_truthful_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, name: str
) -> None:
    rw = await _warden(warden_factory)
    fake.push(Reply(content="one two three", malformed=name, malformed_after=4))
    status, body, rid = await _chat(rw, token, stream=True)
    assert status == 200
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events and events[-1] != b"[DONE]", "a stream that went bad is never ended as if it were whole"
    last = orjson.loads(events[-1])
    assert "upstream." in last["error"]["message"]
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and rec["error"]["rule"].startswith("upstream.")
    blocks = [b for b in body.split(b"\n\n") if b.strip()]  # data events and relayed pings (keep-alive comments)
    assert rec["stream_end"]["cut"] == "refused" and rec["stream_end"]["events"] == len(blocks) - 1


async def test_an_unknown_event_type_is_ignored_and_never_relayed(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await _warden(warden_factory)
    fake.push(Reply(content="one two three", malformed="unknown_event", malformed_after=4))
    status, body, _ = await _chat(rw, token, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n") and b"never relayed" not in body


async def test_an_event_past_the_bound_fails_the_stream(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await _warden(warden_factory, max_sse_event_bytes=2048)
    fake.push(Reply(content="small " + "x" * 4096))
    status, body, rid = await _chat(rw, token, stream=True)
    assert status == 200 and b"[DONE]" not in body and b"upstream.protocol" in body
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and "exceeded 2048 bytes" in rec["turns"][0]["error"]


async def test_a_stream_cut_before_message_stop_is_an_error(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await _warden(warden_factory)
    fake.push(Reply(content="one two three", cut_after=5))
    status, body, rid = await _chat(rw, token, stream=True)
    assert status == 200 and b"[DONE]" not in body and b'"error"' in body
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and rec["error"]["rule"].startswith("upstream.")


async def test_a_2xx_error_body_and_a_body_that_is_not_a_message_are_refused(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await _warden(warden_factory)
    for raw in (b'{"type": "error", "error": {"type": "api_error", "message": "boom"}}', b'{"object": "chat.completion", "choices": []}', b"[1]"):
        fake.push(Reply(body=raw))
        status, body, _ = await _chat(rw, token, stream=False)
        assert status == 502 and b"upstream.protocol" in body and b"boom" not in body


# -- the checks, one by one ---------------------------------------------------------------------------


def _ev(kind: str, obj: dict[str, Any], name: str | None = None) -> RawEvent:
    data = orjson.dumps({"type": kind, **obj})
    return RawEvent(raw=b"event: " + (name or kind).encode() + b"\ndata: " + data + b"\n\n", data=data, event=name or kind)


START = _ev("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "c", "content": [], "usage": {"input_tokens": 5, "output_tokens": 1}}})


def _run(*events: RawEvent) -> tuple[MessagesStream, list[Any]]:
    t = MessagesStream()
    out: list[Any] = []
    for ev in (START, *events):
        out.extend(t.feed(ev))
    return t, out


def test_a_whole_stream_becomes_chat_chunks_with_cumulative_usage() -> None:
    t, out = _run(
        _ev("ping", {}),
        _ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        _ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        _ev("content_block_stop", {"index": 0}),
        _ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        _ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a":'}}),
        _ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": " 1}"}}),
        _ev("content_block_stop", {"index": 1}),
        _ev("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9, "cache_read_input_tokens": 3}}),
        _ev("message_stop", {}),
    )
    assert t.done
    assert out[1] == b": ping\n\n"
    chunks = [o for o in out if isinstance(o, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and chunks[0]["id"] == "msg_1"
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[2]["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert chunks[4]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"] == {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17, "prompt_tokens_details": {"cached_tokens": 3}}


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ([_ev("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}})], "not at the next block index"),
        ([_ev("content_block_stop", {"index": 0})], "not open"),
        ([_ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}), _ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "{"}})], "delta in a text block"),
        ([_ev("content_block_start", {"index": 0, "content_block": {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}})], "never asks for"),
        ([_ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}), _ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}})], "block is open"),
        ([_ev("message_stop", {})], "before message_delta"),
        ([_ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2**60}})], "token count"),
        ([_ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {}})], "output_tokens"),
        ([_ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}), _ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})], "after message_delta"),
        ([_ev("content_block_start", {"index": "0", "content_block": {"type": "text", "text": ""}})], "not an integer"),
        ([_ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}), _ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "{bad"}}), _ev("content_block_stop", {"index": 0})], "do not make a JSON object"),
        ([_ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": 5, "name": "f", "input": {}}})], "string id and name"),
        ([_ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}, name="content_block_delta")], "does not have its event's type"),
    ],
)
def test_out_of_order_or_malformed_events_are_refused(events: list[RawEvent], why: str) -> None:
    with pytest.raises(SSEError, match=why):
        _run(*events)


def test_a_tool_use_without_input_deltas_has_empty_object_arguments_and_bad_json_data_is_refused() -> None:
    _, out = _run(
        _ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
        _ev("content_block_stop", {"index": 0}),
    )
    assert out[-1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == "{}"
    with pytest.raises(SSEError, match="not JSON"):
        MessagesStream().feed(RawEvent(raw=b"data: {\n\n", data=b"{", event=None))
    with pytest.raises(ProviderStreamError):
        MessagesStream().feed(_ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}))


def test_a_message_becomes_a_chat_completion() -> None:
    msg = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "c", "stop_reason": "max_tokens", "stop_sequence": None,
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": [1]}}],
        "usage": {"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 2, "cache_read_input_tokens": None},
    }
    completion, why = completion_of(msg)
    assert why is None and completion is not None
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "ab"
    assert choice["message"]["tool_calls"] == [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x":[1]}'}}]
    assert completion["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    for bad, reason in (
        ({**msg, "role": "user"}, "role"),
        ({**msg, "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}] * 2}, "repeats"),
        ({**msg, "usage": {"input_tokens": -1, "output_tokens": 0}}, "token count"),
        ({**msg, "stop_reason": "pause_turn"}, "did not complete"),
        ({**msg, "content": [{"type": "redacted_thinking", "data": "x"}]}, "never asks for"),
        ({**msg, "content": "text"}, "not a list"),
    ):
        assert completion_of(bad)[0] is None and reason in str(completion_of(bad)[1])
