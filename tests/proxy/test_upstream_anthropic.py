"""``[upstream] api = "anthropic"``: chat completions and Messages clients served by a native Anthropic provider.

Through the real server and the official SDKs (``openai`` chat.completions, ``anthropic`` messages.create and
messages.stream) to the fake provider's native Messages endpoint: the request Warden sends, the answers and
streams translated back, tools fenced (read-only, corrective turns), retrieval injected and cited, provider
errors (529 retried, then relayed in each API's format), refusals of what cannot be translated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, PROVIDER_KEY, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import LOOKUP_SCHEMA, TOOLS
from tests.proxy.protocols.conftest import _close_clients, anthropic_client
from tests.proxy.protocols.test_anthropic_tools import ask

__all__ = ["_close_clients"]  # the protocol tests' fixture that closes every SDK client while the test's loop runs

ANTHROPIC = {"upstream": {"api": "anthropic", "default_max_tokens": 777}}
CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}},
]
MSG_TOOLS: list[Any] = [{"name": "lookup", "input_schema": {"type": "object"}}, {"name": "note", "input_schema": {"type": "object"}}]


async def start(warden_factory: WardenFactory, tmp_path: Path, **over: Any) -> RunningWarden:
    cfg: dict[str, Any] = {**ANTHROPIC, **over}
    return await warden_factory(cfg)


def chat_client(rw: RunningWarden, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=token, max_retries=0, timeout=10)


async def chat(client: openai.AsyncOpenAI, stream: bool, **kw: Any) -> tuple[str, list[Any], str | None, Any]:
    """``(text, tool calls, finish_reason, usage)`` of one chat completion, streamed or not."""
    body: dict[str, Any] = {"model": "claude-x", "messages": [{"role": "user", "content": "refund inv_1"}], **kw}
    if not stream:
        c = await client.chat.completions.create(**body)
        m = c.choices[0].message
        return m.content or "", list(m.tool_calls or []), c.choices[0].finish_reason, c.usage
    text, calls, finish, usage = [], {}, None, None
    async for ch in await client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            text.append(choice.delta.content or "")
            for tc in choice.delta.tool_calls or []:
                calls.setdefault(tc.index, []).append(tc)
            finish = choice.finish_reason or finish
    return "".join(text), list(calls.values()), finish, usage


def told(fake: FakeProvider, turn: int) -> dict[str, str]:
    """The tool_result blocks Warden sent upstream in turn ``turn`` (tool_use_id → text)."""
    out = {}
    for m in fake.anthropic_requests()[turn].body["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b["type"] == "tool_result":
                out[b["tool_use_id"]] = b["content"]
    return out


# -- the request and the answer ----------------------------------------------------------------------


async def test_a_chat_completion_is_sent_as_a_messages_request_with_the_provider_key(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(content="Hi.", usage={"prompt_tokens": 30, "completion_tokens": 2}, model="claude-real"))
    client = chat_client(rw, token())
    c = await client.chat.completions.create(
        model="claude-x",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again"}],
        stop="END",
        user="u-1",
        temperature=0.5,
    )
    assert c.object == "chat.completion" and c.choices[0].message.content == "Hi." and c.choices[0].finish_reason == "stop"
    assert c.model == "claude-real" and c.usage is not None and (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (30, 2, 32)
    sent = fake.anthropic_requests()[-1]
    assert sent.body == {
        "model": "claude-x",
        "max_tokens": 777,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        "system": "Be brief.",
        "temperature": 0.5,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
    }
    assert sent.headers["x-api-key"] == PROVIDER_KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers, "the caller's token never goes upstream"
    assert fake.chat_requests() == []


async def test_a_chat_stream_is_translated_event_by_event_with_usage(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(content="one two three", usage={"prompt_tokens": 11, "completion_tokens": 3}))
    text, calls, finish, usage = await chat(chat_client(rw, token()), True)
    assert text == "one two three" and calls == [] and finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 3)
    assert fake.anthropic_requests()[-1].body["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_round_trips_as_tool_calls_and_tool_results(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(content="Checking.", tool_calls=[{"id": "toolu_1", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}]))
    client = chat_client(rw, token())
    text, calls, finish, _ = await chat(client, stream, tools=CHAT_TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert text == "Checking." and finish == "tool_calls"
    if stream:
        first = calls[0]
        assert first[0].id == "toolu_1" and "".join(d.function.arguments or "" for d in first) == '{"invoice_id":"inv_1"}'
    else:
        assert calls[0].id == "toolu_1" and orjson.loads(calls[0].function.arguments) == {"invoice_id": "inv_1"}
    sent = fake.anthropic_requests()[-1].body
    assert sent["tools"] == [{"name": "lookup", "input_schema": {"type": "object"}}, {"name": "note", "input_schema": {"type": "object"}}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    fake.push(Reply(content="Invoice inv_1 is paid."))
    history = [
        {"role": "user", "content": "refund inv_1"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "paid"},
    ]
    c = await client.chat.completions.create(model="claude-x", messages=history, tools=CHAT_TOOLS)
    assert c.choices[0].message.content == "Invoice inv_1 is paid."
    assert fake.anthropic_requests()[-1].body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"invoice_id": "inv_1"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "paid"}]},
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_anthropic_sdk_is_served_by_the_anthropic_provider(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(content="Stopped at", finish_reason="stop_sequence", stop_sequence="END", usage={"prompt_tokens": 9, "completion_tokens": 4}))
    msg = await ask(anthropic_client(rw, token()), stream, system="Be brief.", stop_sequences=["END"])
    assert [b.text for b in msg.content if b.type == "text"] == ["Stopped at"]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END"), "the matched stop sequence survives both translations"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (9, 4)
    sent = fake.anthropic_requests()[-1]
    assert sent.body["system"] == "Be brief." and sent.body["max_tokens"] == 100 and sent.body["stop_sequences"] == ["END"]
    assert sent.headers["x-api-key"] == PROVIDER_KEY


# -- the tool fence over the Anthropic provider --------------------------------------------------------


async def fenced(warden_factory: WardenFactory, tmp_path: Path, read_only: bool) -> RunningWarden:
    return await start(
        warden_factory,
        tmp_path,
        plugins={"enabled": ["tools", "headers"]},
        policy={"state_db": str(tmp_path / "state.db"), "read_only": read_only, "mode_refresh_s": 0},
        tools=TOOLS,
    )


@pytest.mark.parametrize("api", ["chat", "messages"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_write_tool_is_withheld_and_its_call_refused_in_read_only_mode(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool, api: str
) -> None:
    rw = await fenced(warden_factory, tmp_path, read_only=True)
    fake.push(Reply(content=None, tool_calls=[{"id": "n1", "name": "note", "arguments": '{"text": "x"}'}]), Reply(content="Notes are read-only now."))
    if api == "chat":
        text, calls, finish, _ = await chat(chat_client(rw, token()), stream, tools=CHAT_TOOLS)
        assert (text, calls, finish) == ("Notes are read-only now.", [], "stop")
    else:
        msg = await ask(anthropic_client(rw, token()), stream, tools=MSG_TOOLS)
        assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Notes are read-only now."
    first = fake.anthropic_requests()[0].body
    assert [t["name"] for t in first["tools"]] == ["lookup"] and first["tools"][0]["input_schema"] == LOOKUP_SCHEMA
    correction = fake.anthropic_requests()[1].body["messages"]
    assert correction[-2] == {"role": "assistant", "content": [{"type": "tool_use", "id": "n1", "name": "note", "input": {"text": "x"}}]}
    assert "rule policy.read_only" in told(fake, 1)["n1"]


@pytest.mark.parametrize("api", ["chat", "messages"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_invalid_call_is_corrected_before_the_application_sees_it(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool, api: str
) -> None:
    rw = await fenced(warden_factory, tmp_path, read_only=False)
    fake.push(
        Reply(content="Looking.", tool_calls=[{"id": "l1", "name": "lookup", "arguments": '{"invoice": 5}'}]),
        Reply(content=None, tool_calls=[{"id": "l2", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'}]),
    )
    if api == "chat":
        _, calls, finish, _ = await chat(chat_client(rw, token()), stream, tools=CHAT_TOOLS)
        ids = [c[0].id for c in calls] if stream else [c.id for c in calls]
        assert ids == ["l2"] and finish == "tool_calls"
    else:
        msg = await ask(anthropic_client(rw, token()), stream, tools=MSG_TOOLS)
        assert [(b.id, b.input) for b in msg.content if b.type == "tool_use"] == [("l2", {"invoice_id": "inv_1"})]
    assert "rule tools[0].schema" in told(fake, 1)["l1"]


async def test_an_exhausted_correction_is_refused_in_the_clients_format(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await fenced(warden_factory, tmp_path, read_only=True)
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await chat(chat_client(rw, token()), False, tools=CHAT_TOOLS)
    assert "(rule: policy.read_only)" in str(err.value)
    assert len(fake.anthropic_requests()) == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_retrieval_is_injected_into_the_system_prompt_and_cited(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await start(
        warden_factory,
        tmp_path,
        plugins={"enabled": ["headers", "retrieval"]},
        retrieval={"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedding_model": "fake-embed", "sync_interval_s": 0.2, "mode": "bm25", "embedder": "none", "routes": ["chat", "messages"]},
    )
    doc = {"title": "Vacation policy", "text": "# Vacation\n\nEmployees get 25 vacation days per year.", "acl": {"allow_groups": ["staff"]}, "kind": "markdown"}
    async with aiohttp.ClientSession() as s, s.put(f"{rw.admin_url}/admin/documents/acme/handbook/vacation.md?wait=true", json=doc, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 201
    fake.push(Reply(content="You get 25 days [1]."))
    client = anthropic_client(rw, token(groups=["staff"]))
    body: dict[str, Any] = {"model": "m", "max_tokens": 50, "system": "You are helpful.", "messages": [{"role": "user", "content": "How many vacation days do I get?"}]}
    if stream:
        async with client.messages.stream(**body) as st:
            text = "".join([t async for t in st.text_stream])
    else:
        raw = await client.messages.with_raw_response.create(**body)
        text = (await raw.parse()).content[0].text
        assert raw.headers["x-warden-citations"] == "1=handbook/vacation.md"
    assert text == "You get 25 days [1]."
    system = fake.anthropic_requests()[-1].body["system"]
    assert system.startswith("You are helpful.\n") and "25 vacation days" in system


# -- provider errors ---------------------------------------------------------------------------------


async def test_an_overloaded_provider_is_retried(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(status=529, error="Overloaded"), Reply(content="Made it."))
    text, _, _, _ = await chat(chat_client(rw, token()), False)
    assert text == "Made it." and len(fake.anthropic_requests()) == 2


@pytest.mark.parametrize(("status", "kind"), [(529, "overloaded_error"), (400, "invalid_request_error"), (429, "rate_limit_error")])
async def test_provider_errors_are_relayed_in_each_clients_format(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, status: int, kind: str
) -> None:
    rw = await start(warden_factory, tmp_path, upstream={"api": "anthropic", "max_retries": 0})
    fake.push(Reply(status=status, error="provider says no"))
    with pytest.raises(openai.APIStatusError) as oerr:
        await chat(chat_client(rw, token()), False)
    assert oerr.value.status_code == status
    assert isinstance(oerr.value.body, dict) and oerr.value.body["message"] == "provider says no" and oerr.value.body["type"] == kind
    fake.push(Reply(status=status, error="provider says no"))
    with pytest.raises(anthropic.APIStatusError) as aerr:
        await ask(anthropic_client(rw, token()), False)
    assert aerr.value.status_code == status
    body = aerr.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == kind and "provider says no" in body["error"]["message"]


async def test_a_mid_stream_error_event_ends_the_stream_with_an_error(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, audit={"enabled": True})
    fake.push(Reply(content="one two three", malformed="error_event", malformed_after=4))
    with pytest.raises(anthropic.APIStatusError) as err:
        await ask(anthropic_client(rw, token()), True)
    assert isinstance(err.value.body, dict) and "(rule: upstream.stream)" in err.value.body["error"]["message"]
    rid = err.value.body["request_id"]
    rec = await rw.warden.audit.find(rid)  # type: ignore[union-attr]
    assert rec is not None and rec["turns"][0]["error_kind"] == "stream_error" and rec["turns"][0]["error"] == "Overloaded"


# -- what cannot be translated ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"seed": 7}, "seed"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}, "messages[1]"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}, {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "messages[1].tool_calls[0].function.arguments"),
    ],
)
async def test_what_has_no_messages_form_is_refused_by_rule_before_the_provider(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, extra: dict[str, Any], param: str
) -> None:
    rw = await start(warden_factory, tmp_path)
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "x"}], **extra}
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        status, err = r.status, (await r.json())["error"]
    assert status == 400 and err["param"] == param and err["message"].endswith("(rule: protocol.unsupported)"), err
    assert fake.requests == []


async def test_neutral_values_of_refused_fields_pass(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await start(warden_factory, tmp_path)
    fake.push(Reply(content="ok"))
    text, _, _, _ = await chat(chat_client(rw, token()), False, n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"})
    assert text == "ok"


async def test_the_openai_format_relay_routes_are_refused_over_an_anthropic_provider(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path)
    client = chat_client(rw, token())
    with pytest.raises(openai.NotFoundError) as err:
        await client.embeddings.create(model="e", input="x")
    assert "(rule: upstream.api)" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        await client.models.list()
    assert fake.requests == []


# -- token counting -------------------------------------------------------------------------------------


async def test_count_tokens_is_relayed_governed_over_an_anthropic_provider(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(
        warden_factory,
        tmp_path,
        audit={"enabled": True},
        plugins={"enabled": ["tools", "headers"]},
        policy={"state_db": str(tmp_path / "state.db"), "read_only": True, "mode_refresh_s": 0},
        tools=TOOLS,
    )
    client = anthropic_client(rw, token(sub="carol"))
    raw = await client.messages.with_raw_response.count_tokens(model="claude-x", system="Be brief.", messages=[{"role": "user", "content": "count me"}], tools=MSG_TOOLS)
    count = await raw.parse()
    assert count.input_tokens > 0
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.body["system"] == "Be brief." and [t["name"] for t in sent.body["tools"]] == ["lookup"], "the count is of the governed request"
    assert "max_tokens" not in sent.body
    rec = await rw.warden.audit.find(raw.headers["x-request-id"])  # type: ignore[union-attr]
    assert rec is not None and rec["route"] == "messages.count_tokens" and rec["protocol"] == "anthropic.count_tokens" and rec["status"] == 200
    assert rec["principal"]["subject"] == "carol"
    with pytest.raises(anthropic.AuthenticationError) as err:
        await anthropic_client(rw, "not-a-token").messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}])
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "error"


async def test_count_tokens_refusals_and_provider_errors_are_in_anthropic_format(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await start(warden_factory, tmp_path, upstream={"api": "anthropic", "max_retries": 0})
    client = anthropic_client(rw, token())
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}], extra_body={"max_tokens": 5})
    assert isinstance(bad.value.body, dict) and "(rule: protocol.unsupported)" in bad.value.body["error"]["message"]
    fake.push(Reply(status=529, error="Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as over:
        await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}])
    assert over.value.status_code == 529 and isinstance(over.value.body, dict) and over.value.body["error"]["type"] == "overloaded_error"
    fake.push(Reply(status=200, body=b'{"input_tokens": -3}'))
    with pytest.raises(anthropic.APIStatusError) as malformed:
        await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}])
    assert malformed.value.status_code == 502 and "(rule: upstream.protocol)" in str(malformed.value)


async def test_count_tokens_stays_refused_over_an_openai_provider(warden: RunningWarden, token: Callable[..., str], fake: FakeProvider) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await anthropic_client(warden, token()).messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}])
    assert isinstance(err.value.body, dict) and "(rule: server.routes.ungoverned)" in err.value.body["error"]["message"]
    assert fake.requests == []


# -- metrics and traces, by API ------------------------------------------------------------------------


async def test_metrics_and_traces_are_labelled_by_the_clients_api_and_the_providers(
    warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from llm_warden.proxy.tracing import Tracing
    from tests.proxy.test_metrics import scrape, val

    rw = await start(warden_factory, tmp_path, upstream={"api": "anthropic", "provider_name": "anthropic"})
    exporter = InMemorySpanExporter()
    rw.warden.tracing = Tracing(rw.warden.config, exporter=exporter)
    fake.push(Reply(content="a"), Reply(content="b"))
    await chat(chat_client(rw, token()), False)
    aclient = anthropic_client(rw, token())
    await ask(aclient, True)
    await aclient.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_client(rw, "bad").messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    samples = await scrape(rw.admin_url)
    assert val(samples, "warden_requests_total", route="chat", model="claude-x", status_class="2xx") == 1
    assert val(samples, "warden_requests_total", route="messages", model="m", status_class="2xx") == 1
    assert val(samples, "warden_requests_total", route="messages.count_tokens", model="claude-x", status_class="2xx") == 1
    for _ in range(200):
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
        if len(servers) >= 4:
            break
        await asyncio.sleep(0.01)
    protocols = sorted(str((s.attributes or {}).get("warden.protocol")) for s in servers)
    assert protocols == ["anthropic.count_tokens", "anthropic.messages", "anthropic.messages", "openai.chat"], "a refusal before routing is labelled by its path's API"
    clients = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(clients) == 3 and {(s.attributes or {}).get("warden.upstream.api") for s in clients} == {"anthropic"}
    assert {(s.attributes or {}).get("gen_ai.provider.name") for s in clients if (s.attributes or {}).get("gen_ai.operation.name") == "chat"} == {"anthropic"}
