"""OpenTelemetry traces: names, GenAI attributes and parent/child structure of real exchanges."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_warden.proxy.app import Warden
from llm_warden.proxy.config import load_config
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, Exchange, Principal, RetrievalSummary, ToolCall, UpstreamTurn, Usage
from llm_warden.proxy.plugin import Plugin, available_plugins
from llm_warden.proxy.testing import RunningWarden
from llm_warden.proxy.tracing import Tracing
from tests.fakeprovider import FakeProvider, Reply

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "what is our refund policy"}], "temperature": 0.2, "max_tokens": 50, "top_p": 0.9}


class Judge(Plugin):
    """Repairs tool 'bad', allows the rest."""

    name = "judge"

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
        if call.name == "bad":
            return Decision.repair("test.schema", "/x: must be an integer")
        return Decision.allow("test.allow")


class Retrieval(Plugin):
    """Records retrieval on the exchange the way the retrieval plugin does (query, counts, stage timings)."""

    name = "retrieval_stand_in"

    async def on_request(self, ex: Exchange) -> None:
        await asyncio.sleep(0.01)
        ex.retrieval = RetrievalSummary(
            query="refund policy", mode="hybrid", top_k=4, candidates=9, injected=2, excluded={"acl": 3}, context_tokens=120, timings_ms={"bm25": 1.25, "total": 9.5}
        )
        ex.timings["retrieval_s"] = 0.01


PLUGINS = {"judge": Judge, "retrieval_stand_in": Retrieval}
TOOLS: Any = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("bad", "lookup", "ok")]


async def traced(warden_factory: Any, overrides: dict[str, Any] | None = None) -> tuple[Any, InMemorySpanExporter]:
    cfg = {"plugins": {"enabled": ["retrieval_stand_in", "judge", "headers"]}, "upstream": {"provider_name": "openai"}}
    w = await warden_factory({**cfg, **(overrides or {})}, plugin_classes=PLUGINS)
    exporter = InMemorySpanExporter()
    w.warden.tracing = Tracing(w.warden.config, exporter=exporter)
    return w, exporter


async def finished(exporter: InMemorySpanExporter, count: int = 1) -> list[ReadableSpan]:
    """Spans once ``count`` SERVER spans ended (the handler ends them just after the last byte)."""
    for _ in range(200):
        spans = list(exporter.get_finished_spans())
        if sum(1 for s in spans if s.kind == SpanKind.SERVER) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"no SERVER span ended: {[s.name for s in exporter.get_finished_spans()]}")


async def test_streamed_exchange_with_retrieval_and_a_tool_decision(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory)
    fake.push(
        Reply(content="Let me check.", tool_calls=[{"id": "call_1", "name": "bad", "arguments": '{"x": "nope"}'}], usage={"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}),
        Reply(content="Refunds within 30 days [1].", usage={"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}),
    )
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    stream = await c.chat.completions.create(**BODY, tools=TOOLS, stream=True, extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    async for _ in stream:
        pass
    spans = await finished(exporter)
    by_kind: dict[SpanKind, list[ReadableSpan]] = {}
    for s in spans:
        by_kind.setdefault(s.kind, []).append(s)

    (server,) = by_kind[SpanKind.SERVER]
    assert server.name == "chat m"
    assert server.context is not None and server.parent is not None
    assert format(server.context.trace_id, "032x") == TRACE_ID, "the incoming traceparent continues the trace"
    assert format(server.parent.span_id, "016x") == PARENT_ID
    a = dict(server.attributes or {})
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == "m"
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == 60
    assert a["gen_ai.usage.output_tokens"] == 13
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert str(a["gen_ai.response.id"]).startswith("chatcmpl-")
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == fake.port
    assert a["http.response.status_code"] == 200
    assert a["warden.tenant"] == "acme"
    assert a["warden.corrective_turns"] == 1
    assert "error.type" not in a

    server_id = server.context.span_id
    turns = sorted(by_kind[SpanKind.CLIENT], key=lambda s: s.start_time or 0)
    assert [t.name for t in turns] == ["chat m", "chat m"]
    assert [dict(t.attributes or {})["warden.turn.reason"] for t in turns] == ["initial", "correction"]
    for t in turns:
        assert t.parent is not None and t.parent.span_id == server_id
        ta = dict(t.attributes or {})
        assert ta["gen_ai.operation.name"] == "chat" and ta["http.response.status_code"] == 200
        assert (server.start_time or 0) <= (t.start_time or 0) <= (t.end_time or 0) <= (server.end_time or 0)

    assert 0 < float(dict(turns[0].attributes or {})["gen_ai.response.time_to_first_chunk"]) < 5  # type: ignore[arg-type]

    internal = {s.name: s for s in by_kind[SpanKind.INTERNAL]}
    assert set(internal) == {"retrieval acme", "execute_tool bad"}
    r = internal["retrieval acme"]
    assert r.parent is not None and r.parent.span_id == server_id
    ra = dict(r.attributes or {})
    assert ra["gen_ai.operation.name"] == "retrieval"
    assert ra["gen_ai.request.top_k"] == 4
    assert "gen_ai.retrieval.top_k" not in ra, "not a registered attribute"
    assert ra["warden.retrieval.injected"] == 2 and ra["warden.retrieval.excluded.acl"] == 3
    assert ra["warden.retrieval.bm25_ms"] == 1.25
    assert (r.end_time or 0) - (r.start_time or 0) == pytest.approx(10_000_000, rel=0.01)
    assert (r.end_time or 0) <= (turns[0].start_time or 0) + 1000, "retrieval ends before the first upstream turn"

    tool = internal["execute_tool bad"]
    assert tool.parent is not None and tool.parent.span_id == server_id
    toola = dict(tool.attributes or {})
    assert toola["gen_ai.operation.name"] == "execute_tool"
    assert toola["gen_ai.tool.name"] == "bad"
    assert toola["gen_ai.tool.call.id"] == "call_1"
    assert toola["warden.decision"] == "repair"
    assert toola["warden.rule"] == "test.schema"
    assert tool.start_time == turns[0].end_time, "the verdict sits at the end of the turn that produced the call"

    everything = repr([dict(s.attributes or {}) for s in spans]) + repr([e.attributes for s in spans for e in s.events])
    for secret in ("refund policy", "Let me check", "Refunds within", '{"x": "nope"}', "must be an integer", c.api_key):
        assert secret not in everything, f"{secret!r} must not be in spans without capture_content"

    sent = fake.chat_requests()
    want = [f"00-{TRACE_ID}-{t.context.span_id:016x}-01" for t in turns if t.context is not None]
    assert [r.headers["traceparent"] for r in sent] == want, "each turn's provider call has that turn's CLIENT span as parent"
    assert len(set(want)) == 2


async def test_turn_spans_carry_their_own_usage_and_the_span_id_sent_upstream(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory)
    fake.push(
        Reply(content=None, tool_calls=[{"id": "call_1", "name": "bad", "arguments": '{"x": "nope"}'}], usage={"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}),
        Reply(content="Done.", usage={"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}),
    )
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    await c.chat.completions.create(**BODY, tools=TOOLS)
    spans = await finished(exporter)
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    turns = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert server.context is not None
    a = dict(server.attributes or {})
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (60, 13), "the exchange's totals"
    got = [dict(t.attributes or {}) for t in turns]
    assert [(g["gen_ai.usage.input_tokens"], g["gen_ai.usage.output_tokens"]) for g in got] == [(20, 5), (40, 8)], "each turn its own"
    assert [g["gen_ai.response.finish_reasons"] for g in got] == [("tool_calls",), ("stop",)]
    assert all(str(g["gen_ai.response.id"]).startswith("chatcmpl-") and g["gen_ai.response.model"] == "m" for g in got)
    sent = [r.headers["traceparent"].split("-")[2] for r in fake.chat_requests()]
    assert [f"{t.context.span_id:016x}" for t in turns if t.context is not None] == sent
    assert all(t.parent is not None and t.parent.span_id == server.context.span_id for t in turns)
    assert all(t.context is not None and t.context.trace_id == server.context.trace_id for t in turns)


async def test_embeddings_spans(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory)
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    await c.embeddings.create(model="e", input="hello there", encoding_format="float")
    spans = await finished(exporter)
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (client,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert server.name == client.name == "embeddings e"
    for span in (server, client):
        a = dict(span.attributes or {})
        assert a["gen_ai.operation.name"] == "embeddings"
        assert a["gen_ai.request.model"] == "e"
        assert a["gen_ai.response.model"] == "e"
        assert a["gen_ai.usage.input_tokens"] == 2
        assert "gen_ai.usage.output_tokens" not in a, "the provider reported no output tokens"
        assert "gen_ai.response.finish_reasons" not in a
    assert dict(server.attributes or {})["gen_ai.request.encoding_formats"] == ("float",)


async def test_passthrough_spans_are_named_by_the_route_template(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory, {"server": {"passthrough_routes": ["POST /v1/files/{file_id}/content"]}})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{w.base_url}/files/file-abc123/content", json={"x": 1}, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200, await r.text()
    spans = await finished(exporter)
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (client,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert server.name == client.name == "POST passthrough /v1/files/{file_id}/content"
    assert not any("file-abc123" in s.name for s in spans), "no id in a span name"
    assert not any(k.startswith("gen_ai.") for k in dict(client.attributes or {})), "not inference"
    assert client.parent is not None and server.context is not None and client.parent.span_id == server.context.span_id


async def test_connection_failure_is_error_type_connection(warden_factory: Any, token: Any) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    w, exporter = await traced(warden_factory, {"upstream": {"base_url": f"http://127.0.0.1:{port}/v1", "provider_name": "openai"}})
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    with pytest.raises(openai.APIStatusError):
        await c.chat.completions.create(**BODY)
    spans = await finished(exporter)
    client = [sp for sp in spans if sp.kind == SpanKind.CLIENT]
    assert client, [sp.name for sp in spans]
    for sp in client:
        assert dict(sp.attributes or {})["error.type"] == "connection"
        assert sp.status.status_code == StatusCode.ERROR


class _Request:
    """What ``Tracing.start_exchange`` reads of an aiohttp request."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}


def _tracing(exporter: InMemorySpanExporter) -> Tracing:
    return Tracing(load_config({"auth": {"mode": "none"}, "audit": {"enabled": False}}, available_plugins()), exporter=exporter)


def test_client_spans_take_the_turns_span_ids_and_error_types() -> None:
    exporter = InMemorySpanExporter()
    tr = _tracing(exporter)
    ex = Exchange(request_id="req_1", route="chat", method="POST", path="/v1/chat/completions", protocol="openai.chat")
    ex.principal = Principal(tenant="acme", subject="alice")
    span = tr.start_exchange(ex, _Request({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}))  # type: ignore[arg-type]
    ex.model = "m"
    t0 = ex.started
    ex.turns = [
        UpstreamTurn(index=0, body=b"", status=None, started=t0, duration_s=0.01, error="cannot connect", error_kind="connection", span_id="1111111111111111"),
        UpstreamTurn(index=1, body=b"", status=503, started=t0 + 0.02, duration_s=0.01, error="provider status 503", span_id="00000000000000ab", reason="correction"),
        UpstreamTurn(index=2, body=b"", status=200, started=t0 + 0.04, duration_s=0.01, error="client disconnected", span_id="", reason="correction"),
    ]
    ex.cut = "client"
    ex.usage = Usage(1, 2, 3)
    tr.end_exchange(ex, span, 499)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    client = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert server.context is not None and format(server.context.trace_id, "032x") == TRACE_ID
    assert [c.context.span_id for c in client if c.context is not None][:2] == [0x1111111111111111, 0xAB]
    third = client[2].context
    assert third is not None and third.span_id not in (0, 0x1111111111111111, 0xAB, server.context.span_id), "no span id given: a random one"
    assert [dict(c.attributes or {})["error.type"] for c in client] == ["connection", "503", "cancelled"]
    assert all(c.parent is not None and c.parent.span_id == server.context.span_id for c in client)
    assert all("gen_ai.usage.input_tokens" not in dict(c.attributes or {}) for c in client), "several streamed turns: no turn's own usage is known"
    assert dict(server.attributes or {})["warden.cut"] == "client"


async def test_capture_content_records_prompt_answer_and_arguments(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory, {"tracing": {"capture_content": True, "content_max_chars": 200}})
    fake.push(Reply(content=None, tool_calls=[{"id": "c9", "name": "lookup", "arguments": '{"q": "refunds"}'}]))
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    await c.chat.completions.create(**BODY, tools=TOOLS)
    spans = {s.name: s for s in await finished(exporter) if s.kind != SpanKind.CLIENT}
    a = dict(spans["chat m"].attributes or {})
    assert "what is our refund policy" in str(a["gen_ai.input.messages"])
    assert '"role":"user"' in str(a["gen_ai.input.messages"])
    assert '"type":"tool_call","id":"c9","name":"lookup"' in str(a["gen_ai.output.messages"])
    assert dict(spans["execute_tool lookup"].attributes or {})["gen_ai.tool.call.arguments"] == '{"q": "refunds"}'
    assert dict(spans["retrieval acme"].attributes or {})["gen_ai.retrieval.query.text"] == "refund policy"


async def test_refusal_and_new_root_trace(warden_factory: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory)
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await c.chat.completions.create(**BODY)
    (server,) = await finished(exporter)
    assert server.parent is None, "no traceparent: a new root"
    a = dict(server.attributes or {})
    assert a["http.response.status_code"] == 401
    assert a["error.type"] and a["warden.rule"].startswith("auth.")  # type: ignore[union-attr]
    assert server.status.status_code == StatusCode.UNSET, "a 4xx is the caller's error, not the server's"


async def test_unsampled_trace_still_propagates(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w, exporter = await traced(warden_factory, {"tracing": {"sample_ratio": 0.0}})
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    await c.chat.completions.create(**BODY)
    await c.chat.completions.create(**BODY, extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    await asyncio.sleep(0.05)
    assert exporter.get_finished_spans() == ()
    first, second = (r.headers["traceparent"] for r in fake.chat_requests())
    assert len(first.split("-")[1]) == 32 and int(first.split("-")[3], 16) & 1 == 0, "a new trace id, not sampled"
    assert second.startswith(f"00-{TRACE_ID}-") and int(second.split("-")[3], 16) & 1 == 0


async def test_otlp_export_reaches_a_collector(base_config: dict[str, Any], token: Any, fake: FakeProvider, tmp_path: Path) -> None:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        assert request.headers.get("x-collector-key") == "k123"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        received.append(msg)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    os.environ["WARDEN_TEST_OTLP_HEADERS"] = "x-collector-key=k123"
    try:
        data = {**base_config, "tracing": {"enabled": True, "endpoint": f"http://127.0.0.1:{port}/v1/traces", "service_name": "warden-test", "headers_env": "WARDEN_TEST_OTLP_HEADERS"}}
        cfg = load_config(data, available_plugins())
        rw = await RunningWarden.start(Warden(cfg))
        c = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0)
        await c.chat.completions.create(**BODY)
        await rw.stop()  # flushes the batch exporter
    finally:
        os.environ.pop("WARDEN_TEST_OTLP_HEADERS", None)
        await runner.cleanup()
    names = [s.name for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(names) == ["chat m", "chat m"]
    resource = {kv.key: kv.value.string_value for m in received for rs in m.resource_spans for kv in rs.resource.attributes}
    assert resource["service.name"] == "warden-test"


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="tracing.sample_ratio"):
        load_config({"auth": {"mode": "none"}, "tracing": {"sample_ratio": 1.5}}, available_plugins())
    with pytest.raises(ConfigError, match="tracing.endpoint"):
        load_config({"auth": {"mode": "none"}, "tracing": {"enabled": True, "endpoint": "collector:4318"}}, available_plugins())


def test_tracing_off_never_imports_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from proxy.config import load_config\n"
        "from proxy.serve import build_warden\n"
        "w = build_warden(load_config({'auth': {'mode': 'none'}, 'audit': {'enabled': False}}))\n"
        "assert w.tracing is None\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
