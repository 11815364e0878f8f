"""The core's contract: one pipeline, its stage order, and one exit (the record written last, before the send)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from llm_warden.proxy.audit.record import Projector, RecordStageError
from llm_warden.proxy.errors import Forbidden, WardenError
from llm_warden.proxy.exchange import Decision, Exchange, ToolCall
from llm_warden.proxy.plugin import Plugin, PluginChain
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


class Sink:
    """An audit sink that notes, for each exchange, the hooks that had run when it was recorded."""

    def __init__(self, trail: list[str]) -> None:
        self.trail = trail
        self.records: list[Exchange] = []
        self.healthy = True

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def record_exchange(self, ex: Exchange) -> None:
        self.trail.append(f"record:{ex.phase}")
        Projector("full").exchange(ex)  # the projector accepts it: this is the record stage
        self.records.append(ex)

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        pass

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        return None


def tracer(name: str, trail: list[str], *, refuse_at: str | None = None, verdict: Decision | None = None) -> type[Plugin]:
    class Traced(Plugin):
        async def on_request(self, ex: Exchange) -> None:
            trail.append(f"{name}.request")
            if refuse_at == "request":
                raise Forbidden(f"{name} refuses", rule=f"test.{name}")

        async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
            trail.append(f"{name}.tool")
            return verdict

        async def on_response(self, ex: Exchange) -> None:
            trail.append(f"{name}.response")
            if refuse_at == "response":
                raise RuntimeError("a hook that fails")

        async def on_complete(self, ex: Exchange) -> None:
            trail.append(f"{name}.complete")
            if refuse_at == "complete":
                raise RuntimeError("on_complete must not raise, and this one does")

        def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
            trail.append(f"{name}.audit_fields")
            return {"seen": name}

    Traced.name = name
    return Traced


async def _start(warden_factory: WardenFactory, trail: list[str], plugins: dict[str, type[Plugin]]) -> tuple[Any, Sink]:
    sink = Sink(trail)
    rw = await warden_factory({"plugins": {"enabled": list(plugins)}}, audit=sink, plugin_classes=plugins)
    return rw, sink


async def _post(rw: Any, token: Callable[..., str], body: dict[str, Any], path: str = "/chat/completions") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + path, json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("stream", [False, True])
async def test_stages_run_in_order_request_forward_then_response_and_complete_reversed_then_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail), "b": tracer("b", trail)})
    fake.push(Reply(content="hi"))
    status, _ = await _post(rw, token, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream})
    assert status == 200
    assert trail == [
        "a.request", "b.request",
        "b.response", "a.response",
        "b.complete", "a.complete",
        "a.audit_fields", "b.audit_fields",
        "record:record",
    ]
    (ex,) = sink.records
    assert ex.plugin_fields == {"a": {"seen": "a"}, "b": {"seen": "b"}}
    assert ex.phase == "observe", "after the record: send, then observe"


async def test_a_refusing_request_hook_stops_the_chain_and_still_runs_response_complete_and_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail, refuse_at="request"), "b": tracer("b", trail)})
    status, body = await _post(rw, token, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 403 and b"test.a" in body
    assert trail[0] == "a.request" and "b.request" not in trail
    assert trail[-1] == "record:record" and "b.complete" in trail and "a.complete" in trail
    assert fake.chat_requests() == [], "a refused request never reaches the provider"
    assert sink.records[0].error is not None and sink.records[0].error.rule == "test.a"


async def test_a_failing_response_hook_becomes_a_500_that_is_recorded(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail, refuse_at="response")})
    status, body = await _post(rw, token, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 500 and b"internal_error" in body and b"Traceback" not in body
    assert sink.records[0].status == 500


async def test_a_raising_complete_hook_is_logged_and_the_record_is_still_written(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail, refuse_at="complete"), "b": tracer("b", trail)})
    status, _ = await _post(rw, token, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200
    assert trail.index("a.complete") < trail.index("record:record")
    assert len(sink.records) == 1


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [("/v1/nope", "POST", 404), ("/v1/chat/completions", "GET", 405), ("/v1/%2e/chat/completions", "POST", 400), ("/v1/responses/resp_1", "GET", 404)],
)
async def test_every_refused_route_has_one_record(warden_factory: WardenFactory, token: Callable[..., str], path: str, method: str, status: int) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail)})
    base = rw.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s, s.request(method, base + path, json={}, headers={"Authorization": f"Bearer {token()}"}) as r:
        assert r.status == status
        assert (await r.json())["error"]["type"]
    assert trail[-1] == "record:record" and trail.count("record:record") == 1
    assert len(sink.records) == 1


async def test_tool_verdicts_first_non_allow_wins_in_configured_order(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    trail: list[str] = []
    plugins = {
        "a": tracer("a", trail, verdict=Decision.allow("test.a")),
        "b": tracer("b", trail, verdict=Decision.deny("test.b", "no")),
        "c": tracer("c", trail, verdict=Decision.deny("test.c", "never asked")),
    }
    rw, sink = await _start(warden_factory, trail, plugins)
    fake.push(Reply(tool_calls=[{"name": "lookup", "arguments": "{}"}]), Reply(content="ok"))
    status, _ = await _post(rw, token, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    assert status == 200
    assert [t for t in trail if t.endswith(".tool")] == ["a.tool", "b.tool"], "c is not asked once b refused"
    (ex,) = sink.records
    assert ex.tool_decisions[0].decision.rule == "test.b"


async def test_the_chain_allows_when_every_plugin_abstains() -> None:
    class Abstains(Plugin):
        name = "abstains"

        async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
            return None

    ex = Exchange(request_id="r", route="chat", method="POST", path="/v1/chat/completions")
    d = await PluginChain([Abstains(None)]).judge_tool_call(ex, ToolCall(id="c", name="t", arguments="{}"))
    assert d.kind == "allow"


def test_an_exchange_outside_the_record_stage_cannot_be_recorded() -> None:
    ex = Exchange(request_id="r", route="chat", method="POST", path="/v1/chat/completions")
    for phase in ("identify", "flow", "response", "complete", "send"):
        ex.phase = phase
        with pytest.raises(RecordStageError):
            Projector("full").exchange(ex)


def test_warden_errors_are_typed_values_not_bare_exceptions() -> None:
    err = Forbidden("x", rule="r")
    assert isinstance(err, WardenError) and err.to_dict()["error"]["code"]


async def test_the_drain_deadline_cuts_open_streams_with_an_error_event_and_a_truthful_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail)})
    fake.push(Reply(content="w " * 200, chunk_delay_s=0.05))
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        async for line in r.content:
            if line.startswith(b"data: "):
                lines.append(line.strip())
                if len(lines) == 3:
                    rw.warden.stream_cut.set()
    assert len(lines) < 50, "the stream ended at the cut, not at its natural end"
    last = lines[-1]
    assert b"server.drain" in last and b"[DONE]" not in last
    (ex,) = sink.records
    assert ex.cut == "drain" and ex.error is not None and ex.error.rule == "server.drain"
    assert ex.relayed_events == len(lines) - 1 and ex.response_text
    assert "a.response" not in trail and "a.complete" in trail, "a cut stream skips the response hooks, never the complete hooks"
    # A stream that starts after the deadline is cut at once.
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        text = await r.read()
    assert b"server.drain" in text


async def test_the_drain_deadline_answers_a_request_still_waiting_on_the_provider_and_records_it(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    trail: list[str] = []
    rw, sink = await _start(warden_factory, trail, {"a": tracer("a", trail)})
    fake.push(Reply(hang=True))
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    async def cut_soon() -> None:
        for _ in range(500):
            if fake.chat_requests():
                break
            await asyncio.sleep(0.01)
        rw.warden.stream_cut.set()

    cutter = asyncio.create_task(cut_soon())
    status, answer = await _post(rw, token, body)
    await cutter
    assert status == 503 and b"server.drain" in answer
    (ex,) = sink.records
    assert ex.error is not None and ex.error.rule == "server.drain" and ex.status == 503
    assert trail[-1] == "record:record"
