"""Tool calls the judge must see whatever shape the provider gives them.

Every tool call reaches ``on_tool_call`` or the answer is refused: calls in a
second choice (``n`` > 1), ``tool_calls`` that is not a list, and streamed
deltas without ``index``/``id`` must not slip past the judge.
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp
import orjson
import pytest

from llm_warden.proxy.exchange import Decision, Exchange, ToolCall
from llm_warden.proxy.plugin import Plugin
from tests.fakeprovider import FakeProvider, Reply

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
# Every tool the provider calls is offered: the core refuses calls of tools never offered (rule
# tools.offered) before the plugin judges, and these tests are about what reaches the plugin.
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("rm", "get", "lookup")]
CALL = {"id": "c1", "type": "function", "function": {"name": "rm", "arguments": "{}"}}


class Recorder(Plugin):
    """Denies ``rm``, allows the rest, and remembers every call it judged."""

    name = "recorder"
    seen: ClassVar[list[tuple[str, str, str]]] = []

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
        Recorder.seen.append((call.id, call.name, call.arguments))
        if call.name == "rm":
            return Decision.deny("test.deny", "no")
        return Decision.allow("test.allow")


@pytest.fixture
async def rw(warden_factory: Any) -> Any:
    Recorder.seen = []
    return await warden_factory({"plugins": {"enabled": ["recorder"]}}, plugin_classes={"recorder": Recorder})


def _auth(token: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


def _completion(*messages: dict[str, Any]) -> bytes:
    choices = [{"index": i, "message": m, "finish_reason": "tool_calls" if m.get("tool_calls") else "stop"} for i, m in enumerate(messages)]
    return orjson.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": choices})


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


async def test_n_above_one_with_tools_is_refused(rw: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "n": 2, "tools": TOOLS}, headers=_auth(token)) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["param"] == "n" and "tools.single_choice" in err["message"]
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "n": 2}, headers=_auth(token)) as r:
            assert r.status == 200, "n > 1 without tools is untouched"
    assert len(fake.chat_requests()) == 1


async def test_tool_calls_in_a_second_choice_are_not_relayed(rw: Any, token: Any, fake: FakeProvider) -> None:
    fake.push(Reply(body=_completion({"role": "assistant", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]})))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "tools": TOOLS}, headers=_auth(token)) as r:
            text = await r.text()
            assert r.status == 502, text
            assert '"rm"' not in text and "upstream.protocol" in text


async def test_tool_calls_that_are_not_a_list_are_not_relayed(rw: Any, token: Any, fake: FakeProvider) -> None:
    fake.push(Reply(body=_completion({"role": "assistant", "content": None, "tool_calls": CALL})))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "tools": TOOLS}, headers=_auth(token)) as r:
            text = await r.text()
            assert r.status == 502, text
            assert '"rm"' not in text


async def test_streamed_tool_calls_in_a_second_choice_are_not_relayed(rw: Any, token: Any, fake: FakeProvider) -> None:
    events = [_chunk({"tool_calls": [{"index": 0, **CALL}]}, index=1), _chunk({"content": "hi"}, "stop"), b"[DONE]"]
    fake.push(Reply(raw_events=events))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "stream": True, "tools": TOOLS}, headers=_auth(token)) as r:
            text = await r.text()
    assert '"rm"' not in text
    assert "upstream.protocol" in text and "[DONE]" not in text


async def test_streamed_deltas_without_index_are_assembled(rw: Any, token: Any, fake: FakeProvider) -> None:
    """Some providers send ``index`` (and ``id``) only on a call's first delta, or never."""
    events = [
        _chunk({"role": "assistant"}),
        _chunk({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"function": {"arguments": '{"a":'}}]}),
        _chunk({"tool_calls": [{"function": {"arguments": "1}"}}]}),
        _chunk({"tool_calls": [{"id": "c2", "type": "function", "function": {"name": "get", "arguments": '{"b": 2}'}}]}),
        _chunk({}, "tool_calls"),
        b"[DONE]",
    ]
    fake.push(Reply(raw_events=events))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "stream": True, "tools": TOOLS}, headers=_auth(token)) as r:
            text = await r.text()
    assert Recorder.seen == [("c1", "get", '{"a":1}'), ("c2", "get", '{"b": 2}')]
    relayed = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    deltas = [tc for ev in relayed for ch in ev["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert [(d["index"], d["id"], d["function"]["arguments"]) for d in deltas] == [(0, "c1", '{"a":1}'), (1, "c2", '{"b": 2}')]


async def test_streamed_tool_calls_are_bounded(rw: Any, token: Any, fake: FakeProvider) -> None:
    """A provider cannot make Warden hold an unbounded number of streamed calls."""
    from llm_warden.proxy.tooling import MAX_STREAMED_CALLS

    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"tool_calls": [{"index": i, "id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}) for i in range(MAX_STREAMED_CALLS + 5)]
    events += [_chunk({}, finish="tool_calls"), b"[DONE]"]
    fake.push(Reply(raw_events=events))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{rw.base_url}/chat/completions", json={**BODY, "stream": True, "tools": TOOLS}, headers=_auth(token)) as r:
            raw = await r.read()
    assert b"malformed stream" in raw and b'"name":"lookup"' not in raw
