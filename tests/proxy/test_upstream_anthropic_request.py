"""The internal chat body as a Messages request (``[upstream] api = "anthropic"``): the mapping, and what is refused by rule."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llm_warden.proxy.config import load_config
from llm_warden.proxy.errors import BadRequest, ConfigError
from llm_warden.proxy.upstream_anthropic import count_tokens_request, messages_request, openai_error

PNG = "iVBORw0KGgo="


def test_the_conversation_maps_block_by_block() -> None:
    body: dict[str, Any] = {
        "model": "claude-x",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
            {"role": "system", "content": "Context [1]."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}}, {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "one"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "t"}, {"type": "text", "text": "wo"}]},
            {"role": "user", "content": "Thanks."},
        ],
        "max_completion_tokens": 50,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "a", "description": "A.", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}, "strict": True}},
                  {"type": "function", "function": {"name": "b"}}],
        "tool_choice": {"type": "function", "function": {"name": "a"}},
        "top_p": 0.5,
        "seed": None,
    }
    out = messages_request(body, 4096)
    assert out == {
        "model": "claude-x",
        "max_tokens": 50,
        "system": "Rules.\nContext [1].",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Calling."},
                {"type": "tool_use", "id": "c1", "name": "a", "input": {"x": 1}},
                {"type": "tool_use", "id": "c2", "name": "b", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "c2", "content": "two"},
                {"type": "text", "text": "Thanks."},
            ]},
        ],
        "top_p": 0.5,
        "stream": True,
        "tools": [
            {"name": "a", "description": "A.", "input_schema": {"type": "object", "properties": {"x": {"type": "integer"}}}, "strict": True},
            {"name": "b", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "a"},
    }
    assert count_tokens_request(body) == {k: out[k] for k in ("model", "messages", "system", "tools", "tool_choice")}


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [("auto", None, {"type": "auto"}), ("none", None, {"type": "none"}), ("required", False, {"type": "any", "disable_parallel_tool_use": True}), (None, False, {"type": "auto", "disable_parallel_tool_use": True}), (None, None, None)],
)
def test_tool_choice(choice: Any, parallel: Any, expected: Any) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": choice, "parallel_tool_calls": parallel}
    assert messages_request(body, 10).get("tool_choice") == expected


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"store": True}, "store"),
        ({"metadata": {"k": "v"}}, "metadata"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"n": True}, "n"),
        ({"whatever": 1}, "body"),
        ({"tools": [{"type": "custom", "custom": {"name": "c"}}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "messages[1]"),
        ({"messages": [{"role": "function", "name": "f", "content": "r"}]}, "messages[0].role"),
    ],
)
def test_what_has_no_messages_form_is_refused_naming_the_field(extra: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(BadRequest) as err:
        messages_request(body, 10)
    assert err.value.rule == "protocol.unsupported" and err.value.param == param


def test_anthropic_error_bodies_become_openai_errors() -> None:
    raw = orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_1"})
    assert orjson.loads(openai_error(raw)) == {"error": {"message": "Overloaded", "type": "overloaded_error", "code": None, "param": None}}
    assert openai_error(b"<html>bad gateway</html>") == b"<html>bad gateway</html>"


@pytest.mark.parametrize(("key", "value"), [("api", "gemini"), ("default_max_tokens", 0), ("anthropic_version", "2023/06/01")])
def test_upstream_api_keys_are_validated(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"upstream.{key}"):
        load_config({"upstream": {key: value}, "auth": {"mode": "none"}})
