"""What ``/v1/responses`` refuses, and how: OpenAI-format errors that name their rule, before anything reaches the provider.

Warden is stateless toward the provider on this API: every feature that needs state on the provider's
servers is refused with 400 ``protocol.state``, every feature a chat-completions upstream cannot honour
with 400 ``protocol.unsupported``, malformed values with 400 ``request.schema``; the stored-response
sub-routes are refused by name; hostile bodies never crash, hang or echo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider
from tests.proxy.protocols.test_responses_sdk import WEATHER, post

STATE: list[tuple[str, dict[str, Any]]] = [
    ("store", {"store": True}),
    ("previous_response_id", {"previous_response_id": "resp_abc"}),
    ("conversation", {"conversation": "conv_abc"}),
    ("conversation", {"conversation": {"id": "conv_abc"}}),
    ("background", {"background": True}),
    ("background_options", {"background_options": {"completion_window": "2h"}}),
    ("prompt", {"prompt": {"id": "pmpt_abc", "variables": {"x": "y"}}}),
    ("context_management", {"context_management": [{"type": "compaction", "compact_threshold": 1000}]}),
    ("include[0]", {"include": ["reasoning.encrypted_content"]}),
    ("include[0]", {"include": ["message.input_image.image_url"]}),
    ("input[0]", {"input": [{"type": "item_reference", "id": "msg_abc"}]}),
    ("input[1]", {"input": [{"role": "user", "content": "x"}, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"}]}),
    ("input[0]", {"input": [{"type": "compaction", "encrypted_content": "gAAAA"}]}),
    ("input[0].content[0].file_id", {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-abc", "detail": "auto"}]}]}),
]

UNSUPPORTED: list[tuple[str, dict[str, Any]]] = [
    *[("tools[0].type", {"tools": [t]}) for t in (
        {"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "linux"},
        {"type": "image_generation"}, {"type": "mcp", "server_label": "x", "server_url": "https://mcp.test"}, {"type": "local_shell"},
        {"type": "shell"}, {"type": "apply_patch"}, {"type": "custom", "name": "grammar", "format": {"type": "grammar", "syntax": "lark", "definition": "x"}},
    )],
    ("input[1]", {"input": [{"role": "user", "content": "x"}, {"type": "reasoning", "id": "rs_1", "summary": []}]}),
    ("input[0]", {"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "x"}}]}),
    ("input[0]", {"input": [{"type": "computer_call_output", "call_id": "c1", "output": {"type": "computer_screenshot"}}]}),
    ("input[0]", {"input": [{"type": "mcp_call", "id": "m1", "name": "x", "arguments": "{}", "server_label": "s"}]}),
    ("input[0]", {"input": [{"type": "custom_tool_call", "call_id": "c1", "name": "g", "input": "x"}]}),
    ("input[0].content[0]", {"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "data:application/pdf;base64,AAAA", "filename": "a.pdf"}]}]}),
    ("input[1].output[0]", {"input": [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                                      {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": "https://x.test/a.png"}]}]}),
    ("truncation", {"truncation": "auto"}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("include[0]", {"include": ["message.output_text.logprobs"]}),
    ("include[0]", {"include": ["file_search_call.results"]}),
    ("reasoning.summary", {"reasoning": {"effort": "low", "summary": "auto"}}),
    ("tool_choice", {"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_weather"}]}}),
    ("tool_choice", {"tool_choice": {"type": "web_search_preview"}}),
    ("tools[0].defer_loading", {"tools": [{**WEATHER, "defer_loading": True}]}),
    ("moderation", {"moderation": {"model": "omni-moderation-latest"}}),
    ("prompt_cache_options", {"prompt_cache_options": {"prewarm": True}}),
    ("body", {"frobnicate": 1}),
    ("input[0]", {"input": [{"role": "user", "content": "x", "cache": True}]}),
]  # fmt: skip

SCHEMA: list[tuple[str, dict[str, Any]]] = [
    ("input", {"input": None}),
    ("input", {"input": []}),
    ("input", {"input": 42}),
    ("input[0]", {"input": ["x"]}),
    ("input[0].type", {"input": [{"type": "teleport"}]}),
    ("input[0].role", {"input": [{"role": "tool", "content": "x"}]}),
    ("input[0].content", {"input": [{"role": "user", "content": {"text": "x"}}]}),
    ("input[0].content[0].type", {"input": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
    ("input[0].call_id", {"input": [{"type": "function_call_output", "call_id": "a b", "output": "x"}]}),
    ("input[0].name", {"input": [{"type": "function_call", "call_id": "c1", "name": "bad name!", "arguments": "{}"}]}),
    ("input[0].arguments", {"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": {"a": 1}}]}),
    ("input[0].content[0].image_url", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "file:///etc/passwd", "detail": "auto"}]}]}),
    ("stream", {"stream": "yes"}),
    ("store", {"store": "false"}),
    ("temperature", {"temperature": 3}),
    ("top_p", {"top_p": -1}),
    ("max_output_tokens", {"max_output_tokens": 0}),
    ("max_output_tokens", {"max_output_tokens": True}),
    ("metadata", {"metadata": {f"k{i}": "v" for i in range(17)}}),
    ("metadata", {"metadata": {"k": 1}}),
    ("user", {"user": "u" * 257}),
    ("tools", {"tools": {"type": "function"}}),
    ("tools[0].type", {"tools": [{"name": "f"}]}),
    ("tools[0].name", {"tools": [{"type": "function", "name": "", "parameters": {}, "strict": True}]}),
    ("tools[0].parameters", {"tools": [{"type": "function", "name": "f", "parameters": [], "strict": True}]}),
    ("tool_choice", {"tool_choice": "always"}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tools": [], "tool_choice": {"type": "function", "name": "get_weather"}}),
    ("text.format.type", {"text": {"format": {"type": "yaml"}}}),
    ("text.format.schema", {"text": {"format": {"type": "json_schema", "name": "x"}}}),
    ("reasoning.effort", {"reasoning": {"effort": "maximal"}}),
    ("truncation", {"truncation": "sometimes"}),
    ("include", {"include": "reasoning.encrypted_content"}),
    ("include[0]", {"include": ["nonsense.value"]}),
    ("stream_options", {"stream_options": {"include_obfuscation": False}}),
]


async def refusal(rw: RunningWarden, token: str, body: Any) -> tuple[int, dict[str, Any], bytes]:
    status, raw, _ = await post(rw, body, token)
    return status, orjson.loads(raw)["error"], raw


@pytest.mark.parametrize(("param", "fields"), STATE)
async def test_server_side_state_is_refused_by_rule(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, param: str, fields: dict[str, Any]) -> None:
    status, err, _ = await refusal(warden, token(), {"model": "m", "input": "x", **fields})
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"].endswith("(rule: protocol.state)") and "stateless toward the provider" in err["message"]
    assert fake.requests == []


@pytest.mark.parametrize(("param", "fields"), UNSUPPORTED)
async def test_what_a_chat_upstream_cannot_honour_is_refused_by_rule(
    warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, param: str, fields: dict[str, Any]
) -> None:
    status, err, _ = await refusal(warden, token(), {"model": "m", "input": "x", **fields})
    assert status == 400 and err["param"] == param and err["message"].endswith("(rule: protocol.unsupported)"), err
    assert fake.requests == []


@pytest.mark.parametrize(("param", "fields"), SCHEMA)
async def test_malformed_fields_are_refused_as_schema_errors(
    warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, param: str, fields: dict[str, Any]
) -> None:
    status, err, raw = await refusal(warden, token(), {"model": "m", "input": "x", **fields})
    assert status == 400 and err["param"] == param and err["message"].endswith("(rule: request.schema)"), err
    assert b"/etc/passwd" not in raw, "a client value is quoted only when it is a short identifier"
    assert fake.requests == []


async def test_what_the_agents_sdk_and_the_openai_sdk_send_by_default_is_accepted(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    await client.responses.create(
        model="m", input=[{"role": "user", "content": "x"}], include=[], store=False, background=False, truncation="disabled",
        reasoning=None, previous_response_id=None, conversation=None, prompt=None, text={"format": {"type": "text"}},
        tool_choice="auto", parallel_tool_calls=True, tools=[], metadata={}, max_tool_calls=3, service_tier="auto",
        prompt_cache_retention="24h", top_logprobs=0,
    )  # fmt: skip
    sent = fake.chat_requests()[-1].body
    assert sent == {"model": "m", "messages": [{"role": "user", "content": "x"}], "service_tier": "auto", "prompt_cache_retention": "24h"}, "no tool_choice without tools"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/responses/resp_1"), ("DELETE", "/responses/resp_1"), ("POST", "/responses/resp_1/cancel"), ("GET", "/responses/resp_1/input_items"),
     ("POST", "/responses/input_tokens"), ("POST", "/responses/compact"), ("POST", "/conversations"), ("GET", "/conversations/conv_1/items")],
)  # fmt: skip
async def test_stored_response_routes_are_refused_by_name(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, method: str, path: str) -> None:
    status, raw, _ = await post(warden, {"model": "m", "input": "x"}, token(), path=path, method=method)
    err = orjson.loads(raw)["error"]
    assert status == 404 and err["message"].endswith("(rule: server.routes.ungoverned)")
    assert ("provider" in err["message"]) and fake.requests == []


async def test_the_sdk_sees_the_stored_response_routes_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await client.responses.retrieve("resp_1")
    assert "Warden keeps no responses on any server" in err.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_tokens.count(model="m", input="x")


async def test_another_method_on_the_create_route_is_405(warden: RunningWarden, token: Callable[..., str]) -> None:
    status, raw, headers = await post(warden, {}, token(), method="GET")
    assert status == 405 and headers["Allow"] == "POST" and "(rule: server.routes)" in orjson.loads(raw)["error"]["message"]


async def test_without_a_token_it_is_a_401_in_openai_format(warden: RunningWarden, fake: FakeProvider) -> None:
    client = openai.AsyncOpenAI(base_url=warden.base_url, api_key="not-a-jwt", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as err:
        await client.responses.create(model="m", input="x")
    await client.close()
    assert isinstance(err.value.body, dict) and "(rule: auth." in err.value.body["message"] and fake.requests == []


async def test_a_body_past_the_limit_is_a_413(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"server": {"max_body_bytes": 4096}})
    status, err, _ = await refusal(rw, token(), {"model": "m", "input": "x" * 5000})
    assert status == 413 and err["message"].endswith("(rule: server.max_body_bytes)") and fake.requests == []


async def test_a_stream_refused_before_its_200_is_a_plain_error(warden: RunningWarden, token: Callable[..., str]) -> None:
    status, raw, headers = await post(warden, {"model": "m", "input": "x", "stream": True, "store": True}, token())
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(raw)["error"]["message"].endswith("(rule: protocol.state)")


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (b"[" * 400 + b"]" * 400, "request.json"),
        (orjson.dumps({"model": "m", "input": "x", "metadata": {"a": "b"}, "tools": [{"type": "function", "name": "f", "parameters": {"d": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}}]}), None),
        (b'{"model": "m", "input": "x", "tools": [' + b'{"type": "function", "name": "f", "parameters": {}},' * 600 + b'{"type": "function", "name": "f"}]}', "request.max_tools"),
        (b'{"model": "m", "input": [' + b'{"role": "user", "content": "x"},' * 5000 + b'{"role": "user", "content": "x"}]}', "request.max_messages"),
        (b'{"model": "m", "input": [' + b'{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},' * 10 + b'{"role": "user", "content": "x"}]}', None),
        (b'{"model": "' + b"m" * 300 + b'", "input": "x"}', "request.model"),
        (b'{"model": "m", "input": "x", "model": "n"}', None),
        (b'{"model": "m", "input": "\\ud800"}', None),
        (b'{"model": "m", "input": [{"role": "user", "content": [' + b'{"type": "input_text", "text": "x"},' * 5000 + b'{"type": "input_text", "text": "x"}]}]}', None),
    ],
)
async def test_hostile_bodies_are_refused_or_served_never_crash(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider, body: bytes, rule: str | None) -> None:
    status, raw, _ = await post(warden, body, token())
    assert status in (200, 400), raw[:300]
    if rule is not None:
        assert status == 400 and orjson.loads(raw)["error"]["message"].endswith(f"(rule: {rule})")
    if status == 400:
        assert len(raw) < 2000, "the input is never echoed"


async def test_nesting_past_the_translation_bound_is_refused(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"server": {"max_json_depth": 500}})
    deep = b"[" * 300 + b"1" + b"]" * 300
    body = b'{"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"d": ' + deep + b"}}]}"
    status, err, _ = await refusal(rw, token(), body)
    assert status == 400 and err["message"].endswith("(rule: request.json_depth)") and fake.requests == []


async def test_a_refused_body_is_recorded_by_rule_without_its_bytes(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    status, raw, headers = await post(rw, {"model": "m", "input": "secret plan", "previous_response_id": "resp_1"}, token())
    assert status == 400
    rec = await rw.warden.audit.find(headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "openai.responses" and rec["status"] == 400
    assert "secret plan" not in orjson.dumps(rec).decode()
