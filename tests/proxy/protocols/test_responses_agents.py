"""The OpenAI Agents SDK runs a real tool loop over the Responses API through Warden, unchanged.

The agent's model is ``OpenAIResponsesModel`` on an ``openai`` client whose base URL is Warden; the fake
provider's scripted model calls the function tool, the SDK runs it and sends its output back with the whole
conversation, and the model answers.  Every model call is one governed exchange with its own audit record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import TOOLS


@pytest.fixture(autouse=True)
def _no_tracing_export() -> Iterator[None]:
    """The SDK exports traces to OpenAI by default; these tests never leave the machine."""
    set_tracing_disabled(True)
    yield


def weather_agent(rw: RunningWarden, token: str, ran: list[str], **settings: Any) -> tuple[Agent[Any], openai.AsyncOpenAI]:
    @function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        ran.append(city)
        return f"sunny in {city}, 24C"

    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token, max_retries=0, timeout=10)
    agent: Agent[Any] = Agent(
        name="forecaster", instructions="Answer with the weather.", tools=[get_weather],
        model=OpenAIResponsesModel("gpt-test", client), model_settings=ModelSettings(**settings),
    )  # fmt: skip
    return agent, client


def script(fake: FakeProvider) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "call_p1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]),
        Reply(content="It is sunny in Paris (24C)."),
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_runs_its_tool_loop_through_warden(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, stream: bool) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    ran: list[str] = []
    agent, client = weather_agent(rw, token(), ran)
    script(fake)
    if stream:
        result: Any = Runner.run_streamed(agent, "What is the weather in Paris?")
        kinds = [e.type async for e in result.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    else:
        result = await Runner.run(agent, "What is the weather in Paris?")
    await client.close()
    assert ran == ["Paris"], "the SDK ran the tool the model called"
    assert result.final_output == "It is sunny in Paris (24C)."
    first, second = (r.body for r in fake.chat_requests())
    assert first["messages"] == [{"role": "system", "content": "Answer with the weather."}, {"role": "user", "content": "What is the weather in Paris?"}]
    assert second["messages"][2:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_p1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_p1", "content": "sunny in Paris, 24C"},
    ], "the tool output came back as a chat tool message"
    ids = [mr.response_id for mr in result.raw_responses]
    assert len(ids) == 2 and all(i is not None and i.startswith("resp_") for i in ids)
    records = [await rw.warden.audit.find("req_" + str(i).removeprefix("resp_")) for i in ids]
    assert all(r is not None and r["protocol"] == "openai.responses" and r["status"] == 200 and r["stream"] is stream for r in records)
    calls = [tc for r in records if r for tc in r["tool_calls"]]
    assert [(tc["name"], tc["decision"]) for tc in calls] == [("get_weather", "allow")]
    results = [res for r in records if r for res in r["tool_results"]]
    assert [res["tool_call_id"] for res in results] == ["call_p1"], "the second exchange links the tool output to its call"


async def test_the_agents_sdk_settings_it_sends_are_honoured(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    ran: list[str] = []
    agent, client = weather_agent(warden, token(), ran, temperature=0.2, max_tokens=100, parallel_tool_calls=False, store=False, truncation="disabled", metadata={"run": "r1"})
    script(fake)
    result = await Runner.run(agent, "Paris?")
    await client.close()
    assert result.final_output == "It is sunny in Paris (24C)." and ran == ["Paris"]
    sent = fake.chat_requests()[0].body
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 100 and sent["parallel_tool_calls"] is False


async def test_a_stateful_agent_setting_is_refused_by_rule(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    agent, client = weather_agent(warden, token(), [], store=True)
    with pytest.raises(openai.BadRequestError) as err:
        await Runner.run(agent, "Paris?")
    await client.close()
    assert "(rule: protocol.state)" in err.value.message and fake.chat_requests() == []


async def test_a_write_tool_in_read_only_mode_never_reaches_the_agent(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({
        "plugins": {"enabled": ["tools", "headers"]},
        "policy": {"state_db": str(tmp_path / "state.db"), "read_only": True, "mode_refresh_s": 0},
        "tools": TOOLS,
    })  # fmt: skip
    ran: list[str] = []

    @function_tool
    def note(text: str) -> str:
        """Write a note."""
        ran.append(text)
        return "noted"

    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(groups=["billing"]), max_retries=0, timeout=10)
    agent: Agent[Any] = Agent(name="notes", tools=[note], model=OpenAIResponsesModel("m", client))
    fake.push(Reply(content=None, tool_calls=[{"id": "n1", "name": "note", "arguments": '{"text": "x"}'}]), Reply(content="Notes are read-only now."))
    result = await Runner.run(agent, "note x")
    await client.close()
    assert result.final_output == "Notes are read-only now." and ran == [], "the refused call was corrected before the SDK saw it"
    assert "tools" not in fake.chat_requests()[0].body, "the write tool was withheld from the model"
