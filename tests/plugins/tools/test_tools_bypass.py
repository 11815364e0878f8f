"""Regression tests: tool calls that used to reach the application unjudged."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.test_tools_e2e import BODY, MemoryAudit, audit, fn, tw  # noqa: F401

__all__ = ["audit", "tw"]

EVIL = '{"invoice_id": "inv_1", "amount": 5000, "reason": "fraud"}'


def _completion(message: dict[str, Any], extra_choices: list[dict[str, Any]] | None = None) -> bytes:
    choices = [{"index": 0, "message": message, "finish_reason": "tool_calls"}, *(extra_choices or [])]
    return orjson.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m", "choices": choices,
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


async def _post(tw: Any, tok: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(tw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {tok}"}) as r:
            return r.status, await r.read()


async def test_n_above_one_with_tools_is_refused(tw: Any, token: Any, fake: FakeProvider) -> None:
    status, raw = await _post(tw, token(sub="bob", groups=["sales"]), {**BODY, "n": 2, "tools": [fn("lookup")]})
    assert status == 400
    assert orjson.loads(raw)["error"]["code"] == "tools.n" or b"tools.n" in raw
    assert fake.chat_requests() == []


async def test_tool_call_in_a_second_choice_never_reaches_the_app(tw: Any, token: Any, fake: FakeProvider) -> None:
    # A hostile (or non-conforming) provider answers with a refund call in choice 1.
    bad = {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "refund", "arguments": EVIL}}]}, "finish_reason": "tool_calls"}
    fake.push(Reply(body=_completion({"role": "assistant", "content": "hi"}, [bad]), headers={"Content-Type": "application/json"}))
    status, raw = await _post(tw, token(sub="bob", groups=["sales"]), {**BODY, "tools": [fn("lookup")]})
    assert b"refund" not in raw or status >= 400
    assert status >= 400


async def test_legacy_function_call_is_judged(tw: Any, token: Any, fake: FakeProvider) -> None:
    msg = {"role": "assistant", "content": None, "function_call": {"name": "refund", "arguments": EVIL}}
    for _ in range(3):
        fake.push(Reply(body=_completion(msg), headers={"Content-Type": "application/json"}))
    body = {**BODY, "functions": [{"name": "lookup", "parameters": {"type": "object"}}, {"name": "refund", "parameters": {"type": "object"}}]}
    status, raw = await _post(tw, token(sub="bob", groups=["sales"]), body)
    assert status == 403, raw
    assert b"tools[1].allow_groups" in raw, "refund was offered and withheld by the fence: its rule, not only tools.offered"
    # Not offered at all: refused by the core's offer rule.
    for _ in range(3):
        fake.push(Reply(body=_completion(msg), headers={"Content-Type": "application/json"}))
    status, raw = await _post(tw, token(sub="bob", groups=["sales"]), {**BODY, "functions": [{"name": "lookup", "parameters": {"type": "object"}}]})
    assert status == 403 and b"tools.offered" in raw


def _sse(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(e) for e in events] + [b"[DONE]"]


def _chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


async def _stream(tw: Any, tok: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as s:
        async with s.post(tw.base_url + "/chat/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {tok}"}) as r:
            return await r.read()


async def test_streamed_legacy_function_call_is_judged(tw: Any, token: Any, fake: FakeProvider) -> None:
    events = _sse([
        _chunk({"role": "assistant", "content": None}),
        _chunk({"function_call": {"name": "refund", "arguments": ""}}),
        _chunk({"function_call": {"arguments": EVIL}}),
        _chunk({}, finish="function_call"),
    ])
    for _ in range(3):
        fake.push(Reply(raw_events=events))
    offered = [{"name": "lookup", "parameters": {"type": "object"}}, {"name": "refund", "parameters": {"type": "object"}}]
    raw = await _stream(tw, token(sub="bob", groups=["sales"]), {**BODY, "functions": offered})
    assert b"5000" not in raw
    assert b"tools[1].allow_groups" in raw


async def test_streamed_allowed_legacy_function_call_keeps_its_format(tw: Any, token: Any, fake: FakeProvider) -> None:
    events = _sse([
        _chunk({"role": "assistant", "content": None}),
        _chunk({"function_call": {"name": "lookup", "arguments": '{"invoice_id"'}}),
        _chunk({"function_call": {"arguments": ': "inv_1"}'}}),
        _chunk({}, finish="function_call"),
    ])
    fake.push(Reply(raw_events=events))
    raw = await _stream(tw, token(sub="bob", groups=["sales"]), {**BODY, "functions": [{"name": "lookup", "parameters": {"type": "object"}}]})
    calls = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for ch in orjson.loads(line[6:]).get("choices", []):
                fc = ch.get("delta", {}).get("function_call")
                if fc:
                    calls.append(fc)
    assert calls == [{"name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}]


async def test_streamed_tool_call_in_a_second_choice_is_refused(tw: Any, token: Any, fake: FakeProvider) -> None:
    events = _sse([
        _chunk({"role": "assistant", "content": "hi"}),
        _chunk({"tool_calls": [{"index": 0, "id": "c9", "type": "function", "function": {"name": "refund", "arguments": EVIL}}]}, index=1),
        _chunk({}, finish="stop"),
    ])
    fake.push(Reply(raw_events=events))
    raw = await _stream(tw, token(sub="bob", groups=["sales"]), {**BODY, "tools": [fn("lookup")]})
    assert b"5000" not in raw
    assert b"upstream.protocol" in raw


@pytest.mark.parametrize("args", ['{"invoice_id": "inv_1", "invoice_id": "inv_2"}'])
async def test_duplicate_keys_in_arguments_are_repaired(tw: Any, token: Any, fake: FakeProvider, args: str) -> None:
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "lookup", "arguments": args}]),
              Reply(content=None, tool_calls=[{"id": "c2", "name": "lookup", "arguments": '{"invoice_id": "inv_2"}'}]))
    status, raw = await _post(tw, token(sub="bob", groups=["sales"]), {**BODY, "tools": [fn("lookup")]})
    assert status == 200, raw
    assert b"inv_1" not in raw
    second = fake.chat_requests()[1].body["messages"][-1]["content"]
    assert "duplicate key" in second
