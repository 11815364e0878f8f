"""End to end: a model's too-deep or too-long tool arguments through the real server.

Before the bounds, 500-deep arguments made the schema validator raise and the
client got a 500 (or a stream ending with ``internal_error``); now the model
is told the limit in a corrective turn, and the client only ever sees an
allowed call or a 422 naming the bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import TOOLS

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "take a note"}]}
NOTE_TOOL: list[Any] = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}]
DEEP = '{"text": ' + "[" * 499 + "]" * 499 + "}"
LONG = '{"text": "' + "x" * 70_000 + '"}'
GOOD = '{"text": "hello"}'


@pytest.fixture
async def client(warden_factory: Any, tmp_path: Path, token: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    tw = await warden_factory(
        {
            "plugins": {"enabled": ["tools"]},
            "policy": {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0},
            "tools": TOOLS,
        }
    )
    async with openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(groups=["billing"]), max_retries=0) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("bad", "told"), [(DEEP, "nested 500 levels deep and at most 32"), (LONG, "at least 70012 bytes long and at most 65536")])
async def test_the_model_is_told_the_bound_and_corrects(client: openai.AsyncOpenAI, fake: FakeProvider, stream: bool, bad: str, told: str) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "note", "arguments": bad}]),
        Reply(content=None, tool_calls=[{"id": "c2", "name": "note", "arguments": GOOD}]),
    )
    if stream:
        s = await client.chat.completions.create(**BODY, tools=NOTE_TOOL, stream=True)
        got = []
        async for chunk in s:
            for ch in chunk.choices:
                got += [(tc.id, tc.function.arguments) for tc in ch.delta.tool_calls or [] if tc.function]
        assert got == [("c2", GOOD)]
    else:
        r = await client.chat.completions.create(**BODY, tools=NOTE_TOOL)
        assert [(tc.id, tc.function.arguments) for tc in r.choices[0].message.tool_calls or []] == [("c2", GOOD)]  # type: ignore[union-attr]
    corrective = fake.chat_requests()[1].body["messages"][-1]
    assert corrective["role"] == "tool" and corrective["tool_call_id"] == "c1"
    assert told in corrective["content"] and "Call 'note' again" in corrective["content"]


@pytest.mark.parametrize(("bad", "rule"), [(DEEP, "tools.argument_depth"), (LONG, "tools.argument_bytes")])
async def test_a_model_that_keeps_going_past_the_bound_gets_a_422(client: openai.AsyncOpenAI, fake: FakeProvider, bad: str, rule: str) -> None:
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"c{i}", "name": "note", "arguments": bad}]))
    with pytest.raises(openai.UnprocessableEntityError) as err:
        await client.chat.completions.create(**BODY, tools=NOTE_TOOL)
    assert f"rule: {rule}" in str(err.value) and "tool call 'note'" in str(err.value)
    assert "[[[[" not in str(err.value) and "xxxx" not in str(err.value), "the arguments are not echoed"
    assert len(fake.chat_requests()) == 3


async def test_streamed_past_the_bound_ends_with_an_error_naming_it(client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"c{i}", "name": "note", "arguments": DEEP}]))
    s = await client.chat.completions.create(**BODY, tools=NOTE_TOOL, stream=True)
    with pytest.raises(openai.APIError) as err:
        async for _ in s:
            pass
    assert "tools.argument_depth" in str(err.value) and "internal_error" not in str(err.value)
