"""Function calls over ``/v1/responses`` are fenced exactly like chat tool calls: one ``[[tools]]`` registry, whichever API.

Read-only mode, schemas with corrective turns, approvals, the duplicate-mutation guard, non-streamed and
streamed, through the official ``openai`` SDK; an exhausted correction is a 422 (invalid) or a 403
(forbidden) in OpenAI's error format — after the 200 of a stream, ``error`` then ``response.failed``.
Retrieval injects permission-scoped context after ``instructions`` and its citations become annotations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import LOOKUP_SCHEMA, REFUND_SCHEMA, TOOLS
from tests.proxy.protocols.test_anthropic_tools import start, told
from tests.proxy.protocols.test_responses_sdk import post, sse_events

GOOD = '{"invoice_id": "inv_1", "amount": 25, "reason": "duplicate"}'
BIG = '{"invoice_id": "inv_1", "amount": 500, "reason": "fraud"}'
LOOKUP = {"type": "function", "name": "lookup", "description": "app text", "parameters": {"type": "object"}, "strict": False}
NOTE = {"type": "function", "name": "note", "parameters": {"type": "object"}, "strict": False}
REFUND = {"type": "function", "name": "refund", "parameters": {"type": "object"}, "strict": False}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def sdk(rw: RunningWarden, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=token, max_retries=0, timeout=10)


async def ask(client: openai.AsyncOpenAI, stream: bool, **kw: Any) -> Any:
    """One request; the final response (streamed through the SDK's helper when ``stream``)."""
    body = {"model": "m", "input": "refund inv_1", **kw}
    try:
        if not stream:
            return await client.responses.create(**body)
        async with client.responses.stream(**body) as s:
            async for _ in s:
                pass
            return await s.get_final_response()
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_write_tool_is_withheld_and_refused_in_read_only_mode(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    fake.push(Reply(content=None, tool_calls=[{"id": "n1", "name": "note", "arguments": '{"text": "x"}'}]), Reply(content="Notes are read-only now."))
    resp = await ask(sdk(rw, token(groups=["billing"])), stream, tools=[LOOKUP, NOTE])
    assert [o.type for o in resp.output] == ["message"] and resp.output_text == "Notes are read-only now."
    first = fake.chat_requests()[0].body
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup"], "the write tool never reaches the model"
    assert first["tools"][0]["function"]["parameters"] == LOOKUP_SCHEMA, "the registry's schema replaces the application's"
    assert "rule policy.read_only" in told(fake, 1)["n1"]


async def test_still_refused_after_the_corrective_turns_is_a_403(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await ask(sdk(rw, token(groups=["billing"])), False, tools=[NOTE])
    assert "tool call 'note' still refused after 2 corrective turn(s)" in err.value.message and "(rule: policy.read_only)" in err.value.message
    assert len(fake.chat_requests()) == 3


async def test_a_stream_refused_after_its_200_ends_with_error_then_response_failed(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    fake.push(*[Reply(content="Trying.", tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]) for i in range(3)])
    status, raw, _ = await post(rw, {"model": "m", "stream": True, "input": "note", "tools": [NOTE]}, token(groups=["billing"]))
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert status == 200 and names[-2:] == ["error", "response.failed"] and "response.completed" not in names
    error, failed = events[-2][1], events[-1][1]
    assert "(rule: policy.read_only)" in error["message"] and error["code"]
    assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["error"]["message"] == error["message"]
    message = failed["response"]["output"][0]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "Trying.Trying.Trying."
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


async def test_the_sdk_reads_the_refused_streams_end_as_typed_events(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    fake.push(*[Reply(content=None, tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]) for i in range(3)])
    client = sdk(rw, token(groups=["billing"]))
    stream = await client.responses.create(model="m", input="note", tools=[NOTE], stream=True)
    events = [e async for e in stream]
    await client.close()
    error, failed = events[-2], events[-1]
    assert isinstance(error, openai.types.responses.ResponseErrorEvent) and "(rule: policy.read_only)" in error.message
    assert isinstance(failed, openai.types.responses.ResponseFailedEvent) and failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.message == error.message


@pytest.mark.parametrize("stream", [False, True])
async def test_an_invalid_call_is_corrected_before_the_application_sees_it(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    fake.push(
        Reply(content="Looking it up.", tool_calls=[{"id": "l1", "name": "lookup", "arguments": '{"invoice": 5}'}]),
        Reply(content=None, tool_calls=[{"id": "l2", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}]),
    )
    resp = await ask(sdk(rw, token()), stream, tools=[LOOKUP])
    calls = [(o.call_id, o.name, o.arguments) for o in resp.output if o.type == "function_call"]
    assert calls == [("l2", "lookup", '{"invoice_id": "inv_1"}')], "only the corrected call reaches the application"
    assert "rule tools[0].schema" in told(fake, 1)["l1"]


async def test_an_exhausted_correction_is_a_422(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"r{i}", "name": "refund", "arguments": '{"amount": "lots"}'}]))
    with pytest.raises(openai.UnprocessableEntityError) as err:
        await ask(sdk(rw, token(groups=["billing"])), False, tools=[REFUND])
    assert "tool call 'refund'" in err.value.message and "(rule: tools[1].schema)" in err.value.message


async def test_a_held_approval_is_told_to_the_model_and_listed_for_reviewers(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    client = sdk(rw, token(groups=["billing"]))
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="Your refund awaits approval."))
    raw = await client.responses.with_raw_response.create(model="m", input="refund inv_1", tools=[REFUND])
    await client.close()
    resp = raw.parse()
    assert resp.output_text == "Your refund awaits approval." and [o.type for o in resp.output] == ["message"]
    assert raw.headers["x-warden-tool-decisions"].startswith("refund=held:apr_")
    async with aiohttp.ClientSession() as s, s.get(rw.admin_url + "/admin/approvals?status=pending", headers=ADMIN) as r:
        (apr,) = (await r.json())["data"]
    assert apr["tool"] == "refund" and apr["arguments"] == orjson.loads(BIG) and apr["id"] in told(fake, 1)["c1"]
    assert fake.chat_requests()[0].body["tools"][0]["function"]["parameters"] == REFUND_SCHEMA


async def test_a_repeated_mutation_from_the_input_items_is_refused(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, read_only=False)
    history: list[Any] = [
        {"role": "user", "content": "refund inv_1"},
        {"type": "function_call", "call_id": "old", "name": "refund", "arguments": GOOD},
        {"type": "function_call_output", "call_id": "old", "output": '{"refund_id": "rf_1"}'},
    ]
    fake.push(Reply(content=None, tool_calls=[{"id": "again", "name": "refund", "arguments": GOOD}]), Reply(content="Already refunded (rf_1)."))
    resp = await ask(sdk(rw, token(groups=["billing"])), False, input=history, tools=[REFUND])
    assert resp.output_text == "Already refunded (rf_1)."
    text = told(fake, 1)["again"]
    assert "rule tools.duplicate" in text and "rf_1" in text


async def test_a_forced_tool_that_the_policy_removed_is_a_403(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path, read_only=True)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await ask(sdk(rw, token(groups=["billing"])), False, tools=[NOTE, LOOKUP], tool_choice={"type": "function", "name": "note"})
    assert "(rule: policy.read_only)" in err.value.message and fake.chat_requests() == []


async def _put(rw: RunningWarden, doc_id: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as s, s.put(f"{rw.admin_url}/admin/documents/acme/{doc_id}?wait=true", json=body, headers=ADMIN) as r:
        return r.status


@pytest.mark.parametrize("stream", [False, True])
async def test_retrieval_is_injected_and_cited_as_annotations(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await warden_factory({
        "plugins": {"enabled": ["headers", "retrieval"]},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedding_model": "fake-embed", "sync_interval_s": 0.2,
                      "routes": ["responses"]},
    })  # fmt: skip
    assert await _put(rw, "handbook/vacation.md", {"title": "Vacation policy", "text": "# Vacation\n\nEmployees get 25 vacation days per year.",
                                                   "acl": {"allow_groups": ["staff"]}, "kind": "markdown"}) == 201  # fmt: skip
    assert await _put(rw, "salaries", {"text": "Salary bands and vacation payouts.", "acl": {"allow_groups": ["hr"]}}) == 201
    fake.push(Reply(content="You get 25 days [1]."))
    resp = await ask(sdk(rw, token(groups=["staff"])), stream, instructions="You are helpful.", input="How many vacation days do I get?")
    assert resp.output_text == "You get 25 days [1]."
    (annotation,) = resp.output[0].content[0].annotations
    assert annotation.type == "file_citation" and annotation.file_id == "handbook/vacation.md" and annotation.filename == "Vacation policy"
    assert annotation.index == len("You get 25 days [1]")
    msgs = fake.chat_requests()[-1].body["messages"]
    assert [m["role"] for m in msgs] == ["system", "system", "user"] and msgs[0]["content"] == "You are helpful."
    assert "25 vacation days" in msgs[1]["content"] and "Salary" not in msgs[1]["content"]


async def test_an_idempotent_replay_is_rendered_as_a_response(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": {"backend": "memory", "rules": [{"scope": "user", "tokens": "100000/minute"}]}})
    fake.push(Reply(content="exactly once please", usage={"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}))
    headers = {"Authorization": f"Bearer {token()}", "Idempotency-Key": "pay-7781", "Content-Type": "application/json"}
    for stream in (False, True):
        body = {"model": "m", "input": "pay", "stream": stream}
        async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/responses", json=body, headers={**headers, "Idempotency-Key": f"pay-{stream}"}) as r:
            first = await r.read()
        async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/responses", json=body, headers={**headers, "Idempotency-Key": f"pay-{stream}"}) as r:
            again, replayed = await r.read(), r.headers.get("x-warden-idempotent-replay")
        assert replayed == "true"
        if stream:
            a, b = sse_events(first)[-1][1]["response"], sse_events(again)[-1][1]["response"]
        else:
            a, b = orjson.loads(first), orjson.loads(again)
        assert a["output"][0]["content"][0]["text"] == b["output"][0]["content"][0]["text"] == "exactly once please"
        assert b["usage"]["total_tokens"] == 9 and b["status"] == "completed"
        fake.push(Reply(content="exactly once please", usage={"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}))
    assert len(fake.chat_requests()) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_the_record_holds_every_turn_of_a_corrected_exchange(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await warden_factory({
        "plugins": {"enabled": ["tools", "headers"]}, "audit": {"enabled": True},
        "policy": {"state_db": str(tmp_path / "state.db"), "read_only": True, "mode_refresh_s": 0}, "tools": TOOLS,
    })  # fmt: skip
    fake.push(Reply(content=None, tool_calls=[{"id": "n1", "name": "note", "arguments": '{"text": "x"}'}]), Reply(content="Read-only."))
    status, _, headers = await post(rw, {"model": "m", "input": "note x", "tools": [NOTE, LOOKUP], "stream": stream}, token(groups=["billing"]))
    assert status == 200
    rec = await rw.warden.audit.find(headers["x-request-id"])
    assert rec is not None and rec["protocol"] == "openai.responses" and rec["stream"] is stream
    assert [t["reason"] for t in rec["turns"]] == ["initial", "correction"]
    assert [(c["turn"], c["name"], c["decision"], c["rule"]) for c in rec["tool_calls"]] == [(0, "note", "deny", "policy.read_only")]
