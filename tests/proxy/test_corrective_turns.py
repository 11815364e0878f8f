"""The core's tool-call mechanism: assembly, judging, corrective turns, exhaustion.

A small test plugin gives verdicts by tool name; the real policy lives in
plugins/tools and has its own tests.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from llm_warden.proxy.exchange import Decision, Exchange, ToolCall
from llm_warden.proxy.plugin import Plugin
from tests.fakeprovider import FakeProvider, Reply


class ByName(Plugin):
    name = "by_name"

    async def on_request(self, ex: Exchange) -> None:
        ex.max_corrections = 2

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
        if call.parse_error:
            return Decision.repair("test.json", call.parse_error)
        if call.name == "bad":
            return Decision.repair("test.schema", "/x: must be an integer")
        if call.name == "forbidden":
            return Decision.deny("test.policy", "not for you")
        return Decision.allow("test.allow")


@pytest.fixture
async def tw(warden_factory: Any) -> Any:
    return await warden_factory({"plugins": {"enabled": ["by_name", "headers"]}}, plugin_classes={"by_name": ByName})


@pytest.fixture
def tclient(tw: Any, token: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(), max_retries=0)


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


# Every tool the fake provider calls is offered: the core refuses calls of tools never offered
# (rule tools.offered) before any plugin judges, and these tests are about the plugin's verdicts.
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "do it"}], "tools": [_tool("ok"), _tool("bad"), _tool("forbidden")]}


@pytest.mark.parametrize("stream", [False, True])
async def test_allowed_parallel_calls_relayed_intact(tclient: openai.AsyncOpenAI, fake: FakeProvider, stream: bool) -> None:
    calls = [{"id": "call_a", "name": "ok", "arguments": '{"q": "first"}'}, {"id": "call_b", "name": "ok", "arguments": '{"q": "second", "n": [1, 2]}'}]
    fake.push(Reply(content=None, tool_calls=calls))
    if stream:
        s = await tclient.chat.completions.create(**BODY, stream=True)
        acc: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in s:
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    d = acc.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                    d["id"] = tc.id or d["id"]
                    d["name"] += tc.function.name or "" if tc.function else ""
                    d["args"] += tc.function.arguments or "" if tc.function else ""
                finish = ch.finish_reason or finish
        got = [(v["id"], v["name"], v["args"]) for _, v in sorted(acc.items())]
        assert finish == "tool_calls"
    else:
        r = await tclient.chat.completions.create(**BODY)
        got = [(tc.id, tc.function.name, tc.function.arguments) for tc in r.choices[0].message.tool_calls or []]  # type: ignore[union-attr]
    assert got == [("call_a", "ok", '{"q": "first"}'), ("call_b", "ok", '{"q": "second", "n": [1, 2]}')]
    assert len(fake.chat_requests()) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_call_gets_a_corrective_turn(tclient: openai.AsyncOpenAI, fake: FakeProvider, stream: bool) -> None:
    fake.push(
        Reply(content="Let me check.", tool_calls=[{"id": "call_1", "name": "bad", "arguments": '{"x": "nope"}'}]),
        Reply(content=None, tool_calls=[{"id": "call_2", "name": "ok", "arguments": '{"x": 1}'}]),
    )
    if stream:
        s = await tclient.chat.completions.create(**BODY, stream=True)
        names = []
        text = []
        async for chunk in s:
            for ch in chunk.choices:
                text.append(ch.delta.content or "")
                names += [tc.function.name for tc in ch.delta.tool_calls or [] if tc.function and tc.function.name]
        assert names == ["ok"], "the refused call is never shown"
        assert "".join(text) == "Let me check."
    else:
        r = await tclient.chat.completions.create(**BODY)
        assert [tc.function.name for tc in r.choices[0].message.tool_calls or []] == ["ok"]  # type: ignore[union-attr]
        assert r.usage is not None and r.usage.total_tokens > 0
    first, second = fake.chat_requests()
    msgs = second.body["messages"]
    assert msgs[:-2] == first.body["messages"]
    assert msgs[-2]["role"] == "assistant" and msgs[-2]["tool_calls"][0]["function"]["arguments"] == '{"x": "nope"}'
    assert msgs[-1]["role"] == "tool" and msgs[-1]["tool_call_id"] == "call_1"
    assert "rule test.schema" in msgs[-1]["content"] and "/x: must be an integer" in msgs[-1]["content"]


async def test_broken_json_arguments_are_repaired(tclient: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "ok", "arguments": '{"x": '}]), Reply(content="fine"))
    r = await tclient.chat.completions.create(**BODY)
    assert r.choices[0].message.content == "fine"
    assert "not valid JSON" in fake.chat_requests()[1].body["messages"][-1]["content"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name,status", [("bad", 422), ("forbidden", 403)])
async def test_exhausted_corrections_are_an_error(tclient: openai.AsyncOpenAI, fake: FakeProvider, stream: bool, name: str, status: int) -> None:
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"c{i}", "name": name, "arguments": "{}"}]))
    if stream:
        s = await tclient.chat.completions.create(**BODY, stream=True)
        with pytest.raises(openai.APIError) as ei:
            async for _ in s:
                pass
        assert f"tool call '{name}' still refused after 2 corrective turn(s)" in str(ei.value)
        assert f"rule: test.{'schema' if name == 'bad' else 'policy'}" in str(ei.value)
    else:
        with pytest.raises(openai.APIStatusError) as ei2:
            await tclient.chat.completions.create(**BODY)
        assert ei2.value.status_code == status
        assert f"rule: test.{'schema' if name == 'bad' else 'policy'}" in str(ei2.value)
    assert len(fake.chat_requests()) == 3, "initial turn plus max_corrections"


async def test_mixed_turn_refuses_all_and_explains(tclient: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "a", "name": "ok", "arguments": "{}"}, {"id": "b", "name": "forbidden", "arguments": "{}"}]),
        Reply(content="done"),
    )
    r = await tclient.chat.completions.create(**BODY)
    assert r.choices[0].message.content == "done"
    tool_msgs = [m for m in fake.chat_requests()[1].body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["a", "b"]
    assert tool_msgs[0]["content"].startswith("Not executed")
    assert "not for you" in tool_msgs[1]["content"]


async def test_corrective_body_is_valid_json_for_provider(tclient: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content=None, tool_calls=[{"id": "c", "name": "bad", "arguments": '{"x": "\\u0000"}'}]), Reply(content="ok"))
    await tclient.chat.completions.create(**BODY)
    second = fake.chat_requests()[1].body
    assert orjson.loads(orjson.dumps(second))
    assert "rule test.schema" in second["messages"][-1]["content"], "corrected for the plugin's verdict, not the offer"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("offer", ["another_tool", "no_tools"])
async def test_a_call_of_a_tool_never_offered_is_refused_by_the_core(tclient: openai.AsyncOpenAI, fake: FakeProvider, stream: bool, offer: str) -> None:
    # "ok" is allowed by the plugin: only the core's offer rule can refuse it.
    body: dict[str, Any] = {"model": "m", "messages": BODY["messages"]}
    if offer == "another_tool":
        body["tools"] = [_tool("bad")]
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "ok", "arguments": "{}"}]), Reply(content="fine"))
    if stream:
        s = await tclient.chat.completions.create(**body, stream=True)
        text, names = [], []
        async for chunk in s:
            for ch in chunk.choices:
                text.append(ch.delta.content or "")
                names += [tc.function.name for tc in ch.delta.tool_calls or [] if tc.function]
        assert names == [] and "".join(text) == "fine"
    else:
        r = await tclient.chat.completions.create(**body)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "fine"
    refusal = fake.chat_requests()[1].body["messages"][-1]
    assert refusal["role"] == "tool" and refusal["tool_call_id"] == "c1"
    assert "rule tools.offered" in refusal["content"]


async def test_legacy_functions_are_an_offer(tclient: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    body = {"model": "m", "messages": BODY["messages"], "functions": [{"name": "ok", "parameters": {"type": "object"}}]}
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "ok", "arguments": "{}"}]))
    r = await tclient.chat.completions.create(**body)
    assert [tc.function.name for tc in r.choices[0].message.tool_calls or []] == ["ok"]  # type: ignore[union-attr]
    assert len(fake.chat_requests()) == 1
