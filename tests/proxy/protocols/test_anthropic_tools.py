"""Tool use over ``/v1/messages`` is fenced exactly like chat tool calls: one ``[[tools]]`` registry, whichever API.

Read-only mode, schemas with corrective turns, approvals, the duplicate-mutation guard and the core's offer
check, non-streamed and streamed, through the official ``anthropic`` SDK; an exhausted correction is a 422
(invalid) or a 403 (forbidden) in Anthropic's error format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import LOOKUP_SCHEMA, REFUND_SCHEMA, TOOLS
from tests.proxy.protocols.conftest import anthropic_client

GOOD = '{"invoice_id": "inv_1", "amount": 25, "reason": "duplicate"}'
BIG = '{"invoice_id": "inv_1", "amount": 500, "reason": "fraud"}'
LOOKUP = {"name": "lookup", "description": "app text", "input_schema": {"type": "object"}}
NOTE = {"name": "note", "input_schema": {"type": "object"}}
REFUND = {"name": "refund", "input_schema": {"type": "object"}}
ASK: list[Any] = [{"role": "user", "content": "refund inv_1"}]


async def start(warden_factory: WardenFactory, tmp_path: Path, read_only: bool) -> RunningWarden:
    return await warden_factory(
        {
            "plugins": {"enabled": ["tools", "headers"]},
            "policy": {"state_db": str(tmp_path / "state.db"), "read_only": read_only, "mode_refresh_s": 0},
            "tools": TOOLS,
        }
    )


async def ask(client: anthropic.AsyncAnthropic, stream: bool, **kw: Any) -> Any:
    """One request; the final message (streamed through the SDK's helper when ``stream``)."""
    body = {"model": "m", "max_tokens": 100, "messages": ASK, **kw}
    if not stream:
        return await client.messages.create(**body)
    async with client.messages.stream(**body) as s:
        async for _ in s:
            pass
        return await s.get_final_message()


def told(fake: FakeProvider, turn: int) -> dict[str, str]:
    """What Warden told the model about each call in the corrective turn ``turn`` (tool_call_id → text)."""
    return {m["tool_call_id"]: m["content"] for m in fake.chat_requests()[turn].body["messages"] if m["role"] == "tool"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_write_tool_is_withheld_and_refused_in_read_only_mode(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    client = anthropic_client(rw, token(groups=["billing"]))
    fake.push(Reply(content=None, tool_calls=[{"id": "n1", "name": "note", "arguments": '{"text": "x"}'}]), Reply(content="Notes are read-only now."))
    msg = await ask(client, stream, tools=[LOOKUP, NOTE])
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Notes are read-only now."
    assert msg.stop_reason == "end_turn"
    first = fake.chat_requests()[0].body
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup"], "the write tool never reaches the model"
    assert first["tools"][0]["function"]["parameters"] == LOOKUP_SCHEMA, "the registry's schema replaces the application's"
    assert "rule policy.read_only" in told(fake, 1)["n1"]


@pytest.mark.parametrize("stream", [False, True])
async def test_still_refused_after_the_corrective_turns_is_a_403_in_anthropic_format(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    client = anthropic_client(rw, token(groups=["billing"]))
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]))
    with pytest.raises(anthropic.APIStatusError) as err:
        await ask(client, stream, tools=[NOTE])
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "tool call 'note' still refused after 2 corrective turn(s)" in body["error"]["message"]
    assert "(rule: policy.read_only)" in body["error"]["message"]
    if not stream:
        assert err.value.status_code == 403
    assert len(fake.chat_requests()) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_an_invalid_call_is_corrected_before_the_application_sees_it(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    client = anthropic_client(rw, token())
    fake.push(
        Reply(content="Looking it up.", tool_calls=[{"id": "l1", "name": "lookup", "arguments": '{"invoice": 5}'}]),
        Reply(content=None, tool_calls=[{"id": "l2", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}]),
    )
    msg = await ask(client, stream, tools=[LOOKUP])
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [(u.id, u.name, u.input) for u in uses] == [("l2", "lookup", {"invoice_id": "inv_1"})], "only the corrected call reaches the application"
    assert msg.stop_reason == "tool_use"
    assert "rule tools[0].schema" in told(fake, 1)["l1"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_exhausted_correction_is_a_422_invalid_request_error(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    client = anthropic_client(rw, token(groups=["billing"]))
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"r{i}", "name": "refund", "arguments": '{"amount": "lots"}'}]))
    with pytest.raises(anthropic.APIStatusError) as err:
        await ask(client, stream, tools=[REFUND])
    body = err.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "tool call 'refund'" in body["error"]["message"] and "(rule: tools[1].schema)" in body["error"]["message"]
    if not stream:
        assert isinstance(err.value, anthropic.UnprocessableEntityError) and err.value.status_code == 422


async def test_a_held_approval_is_told_to_the_model_and_listed_for_reviewers(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    client = anthropic_client(rw, token(groups=["billing"]))
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="Your refund awaits approval."))
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=ASK, tools=[REFUND])
    msg = await raw.parse()
    assert msg.content[0].text == "Your refund awaits approval." and [b.type for b in msg.content] == ["text"]
    assert raw.headers["x-warden-tool-decisions"].startswith("refund=held:apr_")
    async with aiohttp.ClientSession() as s, s.get(rw.admin_url + "/admin/approvals?status=pending", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        (apr,) = (await r.json())["data"]
    assert apr["tool"] == "refund" and apr["arguments"] == orjson.loads(BIG) and apr["id"] in told(fake, 1)["c1"]
    assert fake.chat_requests()[0].body["tools"][0]["function"]["parameters"] == REFUND_SCHEMA


async def test_a_repeated_mutation_from_the_tool_result_history_is_refused(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    client = anthropic_client(rw, token(groups=["billing"]))
    history: list[Any] = [
        {"role": "user", "content": "refund inv_1"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "old", "name": "refund", "input": orjson.loads(GOOD)}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "old", "content": '{"refund_id": "rf_1"}'}]},
    ]
    fake.push(Reply(content=None, tool_calls=[{"id": "again", "name": "refund", "arguments": GOOD}]), Reply(content="Already refunded (rf_1)."))
    msg = await client.messages.create(model="m", max_tokens=50, messages=history, tools=[REFUND])
    assert msg.content[0].text == "Already refunded (rf_1)."
    text = told(fake, 1)["again"]
    assert "rule tools.duplicate" in text and "rf_1" in text


@pytest.mark.parametrize("stream", [False, True])
async def test_without_a_tool_plugin_the_core_still_checks_the_offer_and_the_input_object(
    warden: RunningWarden, aclient: anthropic.AsyncAnthropic, fake: FakeProvider, stream: bool
) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "x1", "name": "shell", "arguments": '{"cmd": "ls"}'}]),
        Reply(content=None, tool_calls=[{"id": "x2", "name": "lookup", "arguments": "[1, 2]"}]),
        Reply(content=None, tool_calls=[{"id": "x3", "name": "lookup", "arguments": '{"invoice_id": "inv_9"}'}]),
    )
    msg = await ask(aclient, stream, tools=[LOOKUP])
    uses = [(b.id, b.input) for b in msg.content if b.type == "tool_use"]
    assert uses == [("x3", {"invoice_id": "inv_9"})]
    assert "rule tools.offered" in told(fake, 1)["x1"]
    assert "rule protocol.tool_input" in told(fake, 2)["x2"], "a call Anthropic's tool_use cannot carry goes back for repair"


async def test_a_forced_tool_that_the_policy_removed_is_a_403(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    client = anthropic_client(rw, token(groups=["billing"]))
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        await client.messages.create(model="m", max_tokens=5, messages=ASK, tools=[NOTE, LOOKUP], tool_choice={"type": "tool", "name": "note"})
    assert isinstance(err.value.body, dict) and "(rule: policy.read_only)" in err.value.body["error"]["message"]
    assert fake.chat_requests() == []
