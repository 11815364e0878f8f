"""The Anthropic adapter without a server: translation, rendering, the stream renderer, credentials; and fuzzing.

Fuzz properties (Hypothesis):

- any JSON object as a Messages body: :func:`translate` returns a chat body or raises ``BadRequest`` naming
  ``request.*`` or ``protocol.unsupported``, never anything else; a translated body always serializes;
- a well-formed rich request with any one node replaced by any JSON value: the same.

The in-suite run is short; ``WARDEN_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q -p no:cacheprovider -o timeout=0
tests/proxy/protocols/test_anthropic_translate.py`` fuzzes longer (``WARDEN_FUZZ_SEED`` fixes a seed).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from llm_warden.proxy.errors import BadRequest, ToolCallInvalid, Unauthorized
from llm_warden.proxy.exchange import Exchange, Usage
from llm_warden.proxy.protocols import adapter_for, protocol_for_path
from llm_warden.proxy.protocols.anthropic import AnthropicMessages, AnthropicStream, error_type, render_message, stop_reason
from llm_warden.proxy.protocols.anthropic_request import translate
from llm_warden.proxy.protocols.base import Bounds

BOUNDS = Bounds(max_messages=64, max_tools=16)
RICH: dict[str, Any] = {
    "model": "m",
    "max_tokens": 100,
    "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "calling"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": [1, {"b": None}]}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "ok"}]}, {"type": "text", "text": "next"}]},
    ],
    "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {"type": "array"}}}, "strict": True}],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "stop_sequences": ["Z"],
    "temperature": 0.5,
    "top_p": 1,
    "metadata": {"user_id": "u1"},
    "thinking": {"type": "disabled"},
    "service_tier": "auto",
    "stream": True,
}


def _exchange(body: dict[str, Any] | None = None) -> Exchange:
    ex = Exchange(request_id="req_abc123", route="messages", method="POST", path="/v1/messages", protocol="anthropic.messages")
    ex.model = "m"
    ex.body = body or {}
    return ex


def test_a_rich_request_translates_to_the_chat_shape() -> None:
    t = translate(RICH, BOUNDS)
    assert t.stream is True and t.model == "m"
    assert t.body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
            {"role": "assistant", "content": "calling", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":[1,{"b":null}]}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "ok"},
            {"role": "user", "content": "next"},
        ],
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "top_p": 1,
        "stop": ["Z"],
        "user": "u1",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": RICH["tools"][0]["input_schema"], "description": "d", "strict": True}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }


def test_parse_sets_the_exchange_and_refuses_beta_headers() -> None:
    ex = _exchange()
    raw = orjson.dumps(RICH)
    ex.raw_body = raw
    AnthropicMessages().parse(ex, RICH, BOUNDS)
    assert ex.model == "m" and ex.stream and ex.body_modified and ex.client_body is ex.body and ex.body["max_tokens"] == 100
    ex2 = _exchange()
    ex2.request_headers = {"anthropic-beta": "anything"}
    with pytest.raises(BadRequest) as err:
        AnthropicMessages().parse(ex2, RICH, BOUNDS)
    assert err.value.rule == "protocol.unsupported" and ex2.body_refused == "protocol.unsupported"


def test_render_message_maps_content_calls_stop_and_usage() -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "up",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "thinking", "thinking": "x"}, {"type": "text", "text": "b"}],
                     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    msg = render_message(_exchange(), completion)
    assert msg == {
        "id": "msg_abc123", "type": "message", "role": "assistant", "model": "up",
        "content": [{"type": "text", "text": "ab"}, {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}}],
        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2},
    }


def test_render_refuses_what_is_not_a_completion() -> None:
    ex = _exchange()
    with pytest.raises(Exception) as err:
        AnthropicMessages().render(ex, 200, b'{"choices": "no"}')
    assert getattr(err.value, "rule", None) == "protocol.render" and getattr(err.value, "status", None) == 502


@pytest.mark.parametrize(
    ("finish", "vendor", "stops", "calls", "expected"),
    [
        ("stop", None, None, False, ("end_turn", None)),
        ("stop", "END", ["END"], False, ("stop_sequence", "END")),
        ("stop", "END", ["OTHER"], False, ("end_turn", None)),
        ("stop", None, None, True, ("tool_use", None)),
        ("tool_calls", None, None, True, ("tool_use", None)),
        ("length", None, None, True, ("max_tokens", None)),
        ("content_filter", None, None, False, ("refusal", None)),
        ("eos_token", None, None, False, ("end_turn", None)),
        (None, None, None, False, ("end_turn", None)),
    ],
)
def test_stop_reasons(finish: str | None, vendor: Any, stops: Any, calls: bool, expected: tuple[str, str | None]) -> None:
    assert stop_reason(finish, vendor, stops, calls) == expected


@pytest.mark.parametrize(("status", "etype"), [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
                                               (405, "invalid_request_error"), (409, "invalid_request_error"), (413, "request_too_large"), (422, "invalid_request_error"),
                                               (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "api_error"), (504, "api_error"), (529, "overloaded_error")])
def test_error_types_by_status(status: int, etype: str) -> None:
    assert error_type(status) == etype


def test_an_error_body_names_the_rule_and_the_request() -> None:
    body = orjson.loads(AnthropicMessages().error_body(_exchange(), ToolCallInvalid("tool call 'f' still refused", rule="tools[0].schema")))
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": "tool call 'f' still refused (rule: tools[0].schema)"}, "request_id": "req_abc123"}


def _events(parts: list[bytes | None]) -> list[tuple[str, dict[str, Any]]]:
    raw = b"".join(p for p in parts if p)
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return out


def test_the_stream_renderer_builds_blocks_from_chat_chunks() -> None:
    r = AnthropicStream(_exchange({"stop": ["Q"]}))

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"model": "up", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}

    calls = {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                            {"index": 1, "id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    parts = [
        r.keepalive(b": keep-alive\n\n"),
        r.event(chunk({"role": "assistant", "content": ""}), None),
        r.event(chunk({"content": "Hel"}), None),
        r.event(chunk({"content": "lo"}), None),
        r.event(chunk(calls), None),
        r.event(chunk({}, "stop", stop_reason="Q"), None),
        *r.end(None, Usage(4, 5, 9).as_dict()),
    ]
    events = _events(parts)
    assert [n for n, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert [d.get("index") for n, d in events if n.startswith("content_block")] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert events[7][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"input_tokens": 4, "output_tokens": 5}}


def test_a_replayed_stream_takes_its_usage_from_the_usage_chunk() -> None:
    r = AnthropicStream(_exchange())
    parts = [r.event({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}]}, None),
             r.event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}, None), *r.end(None, None)]
    delta = _events(parts)[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"] == {"input_tokens": 2, "output_tokens": 1}


def test_credentials() -> None:
    a = AnthropicMessages()
    assert a.credential({"x-api-key": "tok"}) == "Bearer tok"
    assert a.credential({"Authorization": "Bearer tok"}) == "Bearer tok"
    assert a.credential({"Authorization": "bearer tok", "x-api-key": "tok"}) == "bearer tok"
    assert a.credential({}) is None
    with pytest.raises(Unauthorized) as err:
        a.credential({"Authorization": "Bearer one", "x-api-key": "two"})
    assert err.value.rule == "auth.credentials"


def test_adapters_by_protocol_and_path() -> None:
    assert adapter_for("anthropic.messages").name == "anthropic.messages"
    assert adapter_for("openai.chat").name == "openai.chat"
    assert adapter_for("openai.embeddings").name == "openai"
    assert protocol_for_path("/v1/messages") == protocol_for_path("/v1/messages/batches") == "anthropic.messages"
    assert protocol_for_path("/v1/messagesx") == protocol_for_path("/v1/chat/completions") == "openai.chat"


# -- fuzzing --------------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("WARDEN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SEED = os.environ.get("WARDEN_FUZZ_SEED")


def _seeded(f: Any) -> Any:
    return seed(int(_SEED))(f) if _SEED else f


leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(), st.text(max_size=10),
                 st.sampled_from(["text", "image", "tool_use", "tool_result", "user", "assistant", "auto", "any", "tool", "object", "base64", "url"]))
json_values = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=16)
keys = st.sampled_from(["model", "max_tokens", "messages", "system", "tools", "tool_choice", "metadata", "stop_sequences", "stream", "temperature", "top_p", "thinking"])


def _holds(body: Any) -> None:
    try:
        t = translate(body, BOUNDS)
    except BadRequest as e:
        assert e.rule is not None and (e.rule.startswith("request.") or e.rule == "protocol.unsupported"), e.rule
        assert e.status == 400
        return
    orjson.dumps(t.body)
    assert t.body["messages"] and isinstance(t.stream, bool)


@_seeded
@SETTINGS
@given(st.dictionaries(st.one_of(keys, st.text(max_size=6)), json_values, max_size=8))
def test_any_json_object_is_translated_or_refused_by_rule(body: dict[str, Any]) -> None:
    _holds(body)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


_RICH_PATHS = [p for p in _paths(RICH) if p]


@_seeded
@SETTINGS
@given(st.sampled_from(_RICH_PATHS), json_values)
def test_a_rich_request_with_any_node_replaced_is_translated_or_refused_by_rule(path: tuple[Any, ...], value: Any) -> None:
    body = copy.deepcopy(RICH)
    node: Any = body
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _holds(body)
