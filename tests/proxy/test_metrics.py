"""``GET /metrics`` after scripted traffic: the values move as they should, labels stay bounded."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from llm_warden.proxy.config import MetricsConfig
from llm_warden.proxy.exchange import (
    Citation,
    Decision,
    Exchange,
    Principal,
    RetrievalSummary,
    ToolCall,
    ToolDecisionRecord,
    UpstreamTurn,
    Usage,
)
from llm_warden.proxy.metrics import UPSTREAM_ERROR_KINDS, Metrics, turn_outcome, upstream_error_kind
from llm_warden.proxy.plugin import Plugin
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.test_plugin_metrics import all_plugins_config

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(admin_url: str) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(f"{admin_url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, frozenset(smp.labels.items()))] = smp.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def sdk(rw: Any, token: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)


async def test_counts_by_status_class_and_a_histogram_observation(warden: Any, client: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    before = await scrape(warden.admin_url)
    await client.chat.completions.create(**BODY)
    await client.chat.completions.create(**BODY)
    bad = openai.AsyncOpenAI(base_url=warden.base_url, api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(**BODY)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{warden.base_url}/chat/completions", data=b"{nope", headers={"Authorization": f"Bearer {client.api_key}"}) as r:
            assert r.status == 400
    after = await scrape(warden.admin_url)

    assert val(before, "warden_requests_total", route="chat", model="m", status_class="2xx") == 0
    assert val(after, "warden_requests_total", route="chat", model="m", status_class="2xx") == 2
    assert total(after, "warden_requests_total", model="none", status_class="4xx") == 2
    assert val(after, "warden_requests_total", route="chat", model="none", status_class="4xx") >= 1
    assert total(after, "warden_refusals_total", status="401") == 1
    assert total(after, "warden_refusals_total", rule="request.json", status="400") == 1

    labels = {"route": "chat", "model": "m", "stream": "false"}
    assert val(after, "warden_request_duration_seconds_count", **labels) == 2
    assert val(after, "warden_request_duration_seconds_bucket", le="+Inf", **labels) == 2
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in after.items() if n == "warden_request_duration_seconds_bucket" and set(labels.items()) <= ls)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"
    assert 0 < val(after, "warden_request_duration_seconds_sum", **labels) < 10
    assert val(after, "warden_upstream_duration_seconds_count", route="chat", model="m") == 2
    assert total(after, "warden_overhead_seconds_count") == 4
    # Warden's own time on a loopback fake provider stays far below a second.
    assert total(after, "warden_overhead_seconds_bucket", le="0.1") == 4
    assert val(after, "warden_inflight_requests") == 0


async def test_tokens_from_usage_streamed_and_not(client: openai.AsyncOpenAI, fake: FakeProvider, warden: Any) -> None:
    fake.push(Reply(content="one two", usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}))
    await client.chat.completions.create(**BODY)
    fake.push(Reply(content="three four five", usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}))
    stream = await client.chat.completions.create(**BODY, stream=True)
    async for _ in stream:
        pass
    s = await scrape(warden.admin_url)
    assert val(s, "warden_tokens_total", model="m", type="prompt") == 16
    assert val(s, "warden_tokens_total", model="m", type="completion") == 10
    assert val(s, "warden_time_to_first_token_seconds_count", model="m") == 1
    assert val(s, "warden_request_duration_seconds_count", route="chat", model="m", stream="true") == 1


async def test_inflight_up_during_a_slow_stream_and_back_down(client: openai.AsyncOpenAI, fake: FakeProvider, warden: Any) -> None:
    fake.push(Reply(content=" ".join(["word"] * 15), chunk_delay_s=0.03))
    stream = await client.chat.completions.create(**BODY, stream=True)
    it = stream.__aiter__()
    await it.__anext__()
    assert val(await scrape(warden.admin_url), "warden_inflight_requests") == 1
    async for _ in it:
        pass
    for _ in range(50):
        if val(await scrape(warden.admin_url), "warden_inflight_requests") == 0:
            break
        await asyncio.sleep(0.02)
    assert val(await scrape(warden.admin_url), "warden_inflight_requests") == 0


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


async def test_upstream_errors_on_a_refused_connection(warden_factory: Any, token: Any) -> None:
    w = await warden_factory({"upstream": {"base_url": f"http://127.0.0.1:{_closed_port()}/v1"}})
    with pytest.raises(openai.APIStatusError) as ei:
        await sdk(w, token).chat.completions.create(**BODY)
    assert ei.value.status_code == 502
    s = await scrape(w.admin_url)
    assert val(s, "warden_upstream_errors_total", kind="connection") == 1
    assert val(s, "warden_upstream_errors_total", kind="timeout") == 0, "every kind is exported from the start"
    assert val(s, "warden_requests_total", route="chat", model="m", status_class="5xx") == 1
    assert total(s, "warden_refusals_total", rule="upstream.base_url", status="502") == 1


async def test_upstream_error_status_is_counted(client: openai.AsyncOpenAI, fake: FakeProvider, warden: Any) -> None:
    fake.push(Reply(status=400, error="context length exceeded"))
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(**BODY)
    s = await scrape(warden.admin_url)
    assert val(s, "warden_upstream_errors_total", kind="status_4xx") == 1
    assert val(s, "warden_requests_total", route="chat", model="m", status_class="4xx") == 1


class ByName(Plugin):
    """Verdicts by tool name, like the core's corrective-turn tests."""

    name = "by_name"

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
        if call.name == "bad":
            return Decision.repair("test.schema", "/x: must be an integer")
        if call.name == "forbidden":
            return Decision.deny("test.policy", "not for you")
        return Decision.allow("test.allow")


@pytest.mark.parametrize("stream", [False, True])
async def test_corrective_turns_and_tool_decisions(warden_factory: Any, token: Any, fake: FakeProvider, stream: bool) -> None:
    w = await warden_factory({"plugins": {"enabled": ["by_name", "headers"]}}, plugin_classes={"by_name": ByName})
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "bad", "arguments": '{"x": "no"}'}]),
        Reply(content=None, tool_calls=[{"id": "c2", "name": "forbidden", "arguments": "{}"}]),
        Reply(content=None, tool_calls=[{"id": "c3", "name": "ok", "arguments": '{"x": 1}'}]),
    )
    c = sdk(w, token)
    tools: Any = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("bad", "forbidden", "ok")]
    if stream:
        async for _ in await c.chat.completions.create(**BODY, tools=tools, stream=True):
            pass
    else:
        await c.chat.completions.create(**BODY, tools=tools)
    s = await scrape(w.admin_url)
    assert val(s, "warden_corrective_turns_total", reason="repair") == 1
    assert val(s, "warden_corrective_turns_total", reason="deny") == 1
    assert val(s, "warden_tool_calls_total", tool="bad", decision="repair") == 1
    assert val(s, "warden_tool_calls_total", tool="forbidden", decision="deny") == 1
    assert val(s, "warden_tool_calls_total", tool="ok", decision="allow") == 1
    assert val(s, "warden_upstream_duration_seconds_count", route="chat", model="m") == 3
    assert val(s, "warden_requests_total", route="chat", model="m", status_class="2xx") == 1


class RetrievalStandIn(Plugin):
    """Records retrieval results and citations on the exchange the way the retrieval plugin does."""

    name = "retrieval_stand_in"

    async def on_request(self, ex: Exchange) -> None:
        ex.retrieval = RetrievalSummary(mode="hybrid", top_k=5, injected=3, excluded={"acl": 2, "rank": 4}, timings_ms={"bm25": 1.5, "vector": 2.0, "total": 4.0})
        ex.timings["retrieval_s"] = 0.005

    async def on_response(self, ex: Exchange) -> None:
        ex.citations = [Citation(1, True, "d1", "c1"), Citation(2, True, "d2", "c2"), Citation(9, False)]


async def test_retrieval_and_citation_metrics_from_the_exchange(warden_factory: Any, token: Any) -> None:
    w = await warden_factory({"plugins": {"enabled": ["retrieval_stand_in"]}}, plugin_classes={"retrieval_stand_in": RetrievalStandIn})
    await sdk(w, token).chat.completions.create(**BODY)
    s = await scrape(w.admin_url)
    assert val(s, "warden_retrieval_duration_seconds_count", retriever="bm25") == 1
    assert val(s, "warden_retrieval_duration_seconds_sum", retriever="total") == pytest.approx(0.004)
    assert val(s, "warden_retrieval_duration_seconds_bucket", retriever="vector", le="0.0025") == 1
    assert val(s, "warden_retrieval_chunks_injected_count") == 1
    assert val(s, "warden_retrieval_chunks_injected_sum") == 3
    assert val(s, "warden_retrieval_chunks_injected_bucket", le="2.0") == 0
    assert val(s, "warden_retrieval_chunks_injected_bucket", le="3.0") == 1
    assert val(s, "warden_retrieval_acl_filtered_total") == 2
    assert val(s, "warden_citations_total", valid="true") == 2
    assert val(s, "warden_citations_total", valid="false") == 1


async def test_defined_metrics_push_callbacks_and_a_failing_callback(warden: Any) -> None:
    m: Metrics = warden.warden.metrics
    pending = {"n": 2}
    modes = {"*": True, "acme": False}
    m.gauge("warden_test_pending", "Things waiting.", callback=lambda: pending["n"])
    m.gauge("warden_test_mode", "1 while a mode is on, per tenant.", ("tenant",), callback=lambda: modes)
    m.counter("warden_test_decisions", "Decisions by rule and decision.", ("rule", "decision"))
    assert m.register_counter_callback("test_decisions", lambda: {("tenant-rpm", "allow"): 7, ("tenant-rpm", "deny"): 1}), "the old call reaches a defined metric"
    m.gauge("warden_test_backend_up", "1 while the backend answers.", callback=lambda: 1 / 0)
    docs = m.gauge("warden_test_documents", "Documents stored.")
    docs.set(42)
    lag = m.histogram("warden_test_lag_seconds", "Lag per sync.", buckets=(0.1, 1.0))
    lag.observe(0.5)
    s = await scrape(warden.admin_url)
    assert val(s, "warden_test_pending") == 2
    assert val(s, "warden_test_mode", tenant="*") == 1
    assert val(s, "warden_test_mode", tenant="acme") == 0
    assert val(s, "warden_test_decisions_total", rule="tenant-rpm", decision="deny") == 1
    assert val(s, "warden_test_documents") == 42
    assert val(s, "warden_test_lag_seconds_bucket", le="0.1") == 0 and val(s, "warden_test_lag_seconds_bucket", le="1.0") == 1
    assert ("warden_test_backend_up", frozenset()) not in s, "a failing callback drops its metric, not the scrape"
    pending["n"] = 0
    modes["acme"] = True
    s = await scrape(warden.admin_url)
    assert val(s, "warden_test_pending") == 0
    assert val(s, "warden_test_mode", tenant="acme") == 1


def _exposed(m: Metrics) -> Samples:
    return {(smp.name, frozenset(smp.labels.items())): smp.value for fam in text_string_to_metric_families(m.exposition().decode()) for smp in fam.samples}


def test_registration_rules() -> None:
    m = Metrics(MetricsConfig())
    for bad in ("approvals_pending", "Warden_x", "warden_", "warden_x-y", "warden_x_count", "warden_x_bucket", "warden_x_created"):
        with pytest.raises(ValueError):
            m.gauge(bad, "help")
    with pytest.raises(ValueError, match="documentation"):
        m.gauge("warden_x", "  ")
    for labels in (("user_id",), ("subject",), ("request_id",), ("path",), ("le",), ("Bad",), ("a", "a"), ("a", "b", "c", "d", "e")):
        with pytest.raises(ValueError):
            m.counter("warden_y", "help", labels)
    with pytest.raises(ValueError, match="clashes"):
        m.gauge("warden_requests", "a core name")
    with pytest.raises(ValueError, match="clashes"):
        m.counter("warden_inflight_requests", "a core name")
    with pytest.raises(ValueError, match="buckets"):
        m.histogram("warden_z_seconds", "help", buckets=(1.0, 0.5))
    with pytest.raises(TypeError):
        m.histogram("warden_h_seconds", "help").set_callback(lambda: 1)
    g = m.gauge("warden_thing", "A thing.", ("tenant",))
    assert m.gauge("warden_thing", "A thing.", ("tenant",)) is g, "a restarted plugin gets its metric back"
    with pytest.raises(ValueError, match="already defined"):
        m.gauge("warden_thing", "Another help.", ("tenant",))
    with pytest.raises(ValueError, match="already defined"):
        m.counter("warden_thing", "A thing.", ("tenant",))
    c = m.counter("warden_events_total", "Events.")
    assert c.name == "warden_events" and m.counter("warden_events", "Events.") is c
    c.inc(3)
    assert val(_exposed(m), "warden_events_total") == 3
    with pytest.raises(ValueError):
        g.labels("a", "b")
    with pytest.raises(ValueError):
        g.labels(tenant="a", other="b")


def test_labels_of_defined_metrics_are_bounded() -> None:
    m = Metrics(MetricsConfig(max_label_values=2))
    c = m.counter("warden_hits", "Hits by key.", ("key",))
    for i in range(5):
        c.labels(key=f"k{i}").inc()
    g = m.gauge("warden_levels", "Level by pool and kind.", ("pool", "kind"), callback=lambda: {("p0", "a"): 1, ("p1", "a"): 2, ("p2", "a"): 3, ("p3", "b"): 4, ("p4", "a"): 2})
    assert g.labelnames == ("pool", "kind")
    s = _exposed(m)
    assert val(s, "warden_hits_total", key="k0") == 1 and val(s, "warden_hits_total", key="k1") == 1
    assert val(s, "warden_hits_total", key="other") == 3
    assert {dict(ls)["key"] for n, ls in s if n == "warden_hits_total"} == {"k0", "k1", "other"}
    assert val(s, "warden_levels", pool="p0", kind="a") == 1
    assert val(s, "warden_levels", pool="other", kind="a") == 5, "past the bound, callback values are summed into other"
    assert val(s, "warden_levels", pool="other", kind="b") == 4


def test_old_callback_names_reach_only_metrics_a_plugin_defined(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(MetricsConfig())
    assert m.register_gauge_callback("x_index_staleness", lambda: 5) is False, "nothing defined it: not exposed"
    assert "x_index_staleness" in caplog.text and "not defined" in caplog.text
    assert "warden_x_index_staleness_seconds" not in m.metric_names()
    m.gauge("warden_x_index_staleness_seconds", "Lag of the x index.")
    assert m.register_gauge_callback("x_index_staleness", lambda: 5), "the unit suffix may be left out, as before"
    m.counter("warden_x_decisions", "Decisions.", ("decision",))
    assert m.register_counter_callback("warden_x_decisions", lambda: {"allow": 2})
    s = _exposed(m)
    assert val(s, "warden_x_index_staleness_seconds") == 5
    assert val(s, "warden_x_decisions_total", decision="allow") == 2
    with pytest.raises(KeyError, match="counter"):
        m.register_gauge_callback("x_decisions", lambda: 1)
    with pytest.raises(KeyError, match="gauge"):
        m.register_counter_callback("x_index_staleness", lambda: 1)
    for core in ("requests", "warden_requests", "inflight_requests", "audit_queue_depth"):
        with pytest.raises(KeyError, match="core"):
            m.register_gauge_callback(core, lambda: 1)


CORE_FAMILIES = {
    "warden_requests",
    "warden_request_duration_seconds",
    "warden_upstream_duration_seconds",
    "warden_time_to_first_token_seconds",
    "warden_overhead_seconds",
    "warden_inflight_requests",
    "warden_upstream_errors",
    "warden_tokens",
    "warden_refusals",
    "warden_tool_calls",
    "warden_corrective_turns",
    "warden_retrieval_duration_seconds",
    "warden_retrieval_chunks_injected",
    "warden_retrieval_acl_filtered",
    "warden_citations",
    "warden_audit_records",
    "warden_audit_write_failures",
    "warden_audit_queue_depth",
    "warden_audit_writer_restarts",
    "warden_audit_commit_duration_seconds",
    "warden_config_reloads",
    "warden_build_info",
}


def test_the_core_declares_only_core_metrics() -> None:
    m = Metrics(MetricsConfig())
    assert {f.name for f in m.registry.collect()} == CORE_FAMILIES, "plugins define their own metrics at start"
    assert m.defined == {}


# -- upstream errors: counted in the observe stage, from the turns, for every route -------------


def _exchange(route: str, protocol: str, *turns: UpstreamTurn, model: str | None = "m", cut: str | None = None) -> Exchange:
    ex = Exchange(request_id="req_t", route=route, method="POST", path="/v1/x", protocol=protocol)
    ex.model = model
    ex.cut = cut
    ex.turns.extend(turns)
    for t in turns:
        t.duration_s = 0.01
    return ex


def _turn(index: int = 0, status: int | None = 200, error: str | None = None, kind: str | None = None) -> UpstreamTurn:
    return UpstreamTurn(index=index, body=b"", status=status, error=error, error_kind=kind)


def test_failed_turns_are_counted_once_each_on_every_route() -> None:
    m = Metrics(MetricsConfig())
    exchanges = [
        # A provider 4xx relayed on /v1/embeddings and a 5xx on a pass-through route: the relay records only the status.
        _exchange("embeddings", "openai.embeddings", _turn(status=429)),
        _exchange("passthrough POST /v1/files/{file_id}/content", "passthrough", _turn(status=503), model=None),
        _exchange("models", "openai.models", _turn(status=None, error="cannot connect to the provider (Connection refused)", kind="connection"), model=None),
        _exchange("chat", "openai.chat", _turn(0), _turn(1, error="malformed answer from provider: x", kind="malformed")),
        _exchange("chat", "openai.chat", _turn(0, error="stream ended early", kind="truncated")),
        _exchange("chat", "openai.chat", _turn(0, error="overloaded", kind="stream_error")),
        _exchange("chat", "openai.chat", _turn(0, status=None, error="the provider did not answer in time", kind="timeout")),
        # A failure recorded without a kind still counts (as the transport breaking), never silently not at all.
        _exchange("chat", "openai.chat", _turn(0, error="ServerDisconnectedError")),
        # Not upstream failures: a clean turn, and a stream Warden stopped reading because the client left.
        _exchange("chat", "openai.chat", _turn(0)),
        _exchange("chat", "openai.chat", _turn(0, error="client disconnected"), cut="client"),
        _exchange("chat", "openai.chat", _turn(0, error="drained"), cut="drain"),
    ]
    for ex in exchanges:
        m.observe_exchange(ex, 200, 0.05)
    s = _exposed(m)
    got = {k: val(s, "warden_upstream_errors_total", kind=k) for k in UPSTREAM_ERROR_KINDS}
    assert got == {"connection": 2, "timeout": 1, "status_4xx": 1, "status_5xx": 1, "malformed": 1, "truncated": 1, "stream_error": 1}
    assert val(s, "warden_upstream_duration_seconds_count", route="embeddings", model="m") == 1
    assert val(s, "warden_requests_total", route="passthrough POST /v1/files/{file_id}/content", model="none", status_class="2xx") == 1


def test_turn_outcome() -> None:
    assert turn_outcome(_turn()) is None
    assert turn_outcome(_turn(status=404)) == "status_4xx"
    assert turn_outcome(_turn(status=502, error="provider status 502")) == "status_5xx"
    assert turn_outcome(_turn(status=500, kind="status_5xx")) == "status_5xx"
    assert turn_outcome(_turn(status=200, kind="malformed", error="x")) == "malformed"
    assert turn_outcome(_turn(status=None, error="ClientConnectorError")) == "connection"
    assert turn_outcome(_turn(error="client disconnected"), cut="client") == "cancelled"
    assert upstream_error_kind(_turn(error="client disconnected"), cut="client") is None
    assert turn_outcome(_turn(status=503), cut="client") == "status_5xx", "the provider's status outranks the cut"
    assert turn_outcome(_turn(kind="not-a-kind")) is None, "an unknown kind is not a label value"


def test_typed_exchange_fields() -> None:
    m = Metrics(MetricsConfig())
    ex = _exchange("chat", "openai.chat", _turn(0))
    ex.principal = Principal(tenant="acme", subject="alice")
    ex.usage = Usage(prompt_tokens=11, completion_tokens=0, total_tokens=11)
    ex.retrieval = RetrievalSummary(skipped="no_documents")
    ex.citations = [Citation(1, True, "d", "c"), Citation(4, False)]
    ex.tool_decisions = [ToolDecisionRecord(0, ToolCall(id="c1", name="lookup", arguments="{}"), Decision.deny("p", "no"))]
    m.observe_exchange(ex, 200, 0.05)
    ex2 = _exchange("chat", "openai.chat", _turn(0))
    ex2.retrieval = RetrievalSummary(injected=2, excluded={"acl": 3}, timings_ms={"bm25": 1.0})
    ex2.timings["retrieval_s"] = 0.002
    m.observe_exchange(ex2, 200, 0.05)
    s = _exposed(m)
    assert val(s, "warden_tokens_total", model="m", type="prompt") == 11
    assert val(s, "warden_tokens_total", model="m", type="completion") == 0
    assert val(s, "warden_retrieval_chunks_injected_count") == 1, "a skipped retrieval injected nothing: no observation"
    assert val(s, "warden_retrieval_chunks_injected_sum") == 2
    assert val(s, "warden_retrieval_acl_filtered_total") == 3
    assert val(s, "warden_retrieval_duration_seconds_count", retriever="bm25") == 1
    assert val(s, "warden_retrieval_duration_seconds_sum", retriever="total") == pytest.approx(0.002)
    assert val(s, "warden_citations_total", valid="true") == 1 and val(s, "warden_citations_total", valid="false") == 1
    assert val(s, "warden_tool_calls_total", tool="lookup", decision="deny") == 1


async def test_provider_errors_relayed_on_embeddings_and_passthrough_are_counted(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    # A provider of our own for the pass-through route, answering 503.
    async def files(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy", "type": "server_error", "code": None, "param": None}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/files/{file_id}/content", files)
    app.router.add_post("/v1/embeddings", files)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        w = await warden_factory()
        fake.push_embedding(Reply(status=429, error="slow down"))
        with pytest.raises(openai.RateLimitError):
            await sdk(w, token).embeddings.create(model="e", input="hello")
        s = await scrape(w.admin_url)
        assert val(s, "warden_upstream_errors_total", kind="status_4xx") == 1
        assert val(s, "warden_requests_total", route="embeddings", model="e", status_class="4xx") == 1

        port = runner.addresses[0][1]
        p = await warden_factory({"upstream": {"base_url": f"http://127.0.0.1:{port}/v1"}, "server": {"passthrough_routes": ["POST /v1/files/{file_id}/content"]}})
        async with aiohttp.ClientSession() as session:
            for fid in ("file-abc", "file-def"):
                async with session.post(f"{p.base_url}/files/{fid}/content", json={"x": 1}, headers={"Authorization": f"Bearer {token()}"}) as r:
                    assert r.status == 503
        s = await scrape(p.admin_url)
        assert val(s, "warden_upstream_errors_total", kind="status_5xx") == 2
        assert total(s, "warden_upstream_errors_total") == 2, "once per failed turn"
        routes = {dict(ls)["route"] for (n, ls) in s if n == "warden_requests_total"}
        assert not any("file-abc" in r for r in routes), routes
    finally:
        await runner.cleanup()


async def test_tenant_label_is_opt_in_and_bounded(warden_factory: Any, token: Any) -> None:
    w = await warden_factory({"metrics": {"tenant_label": True, "max_label_values": 1, "models": ["m"]}})
    c1 = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(tenant="acme"), max_retries=0)
    c2 = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(tenant="globex"), max_retries=0)
    await c1.chat.completions.create(**BODY)
    await c2.chat.completions.create(**BODY)
    await c2.chat.completions.create(model="unlisted-model", messages=BODY["messages"])
    s = await scrape(w.admin_url)
    assert val(s, "warden_requests_total", route="chat", model="m", status_class="2xx", tenant="acme") == 1
    assert val(s, "warden_requests_total", route="chat", model="m", status_class="2xx", tenant="other") == 1
    assert val(s, "warden_requests_total", route="chat", model="other", status_class="2xx", tenant="other") == 1


async def test_no_tenant_label_by_default(warden: Any, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(**BODY)
    s = await scrape(warden.admin_url)
    assert not any("tenant" in dict(ls) for (n, ls) in s if n == "warden_requests_total")


def test_open_labels_are_bounded() -> None:
    m = Metrics(MetricsConfig(max_label_values=3))
    seen = {m.model_label(f"model-{i}") for i in range(100)}
    assert seen == {"model-0", "model-1", "model-2", "other"}
    assert m.model_label(None) == "none"
    assert m.model_label("model-1") == "model-1"
    assert Metrics(MetricsConfig(max_label_values=3)).model_label("x" * 65) == "other"
    assert Metrics(MetricsConfig(max_label_values=3)).model_label("a\nb") == "other"


def test_audit_store_binding() -> None:
    class Store:
        """The attributes the SQLite audit store offers for metrics."""

        def __init__(self) -> None:
            self.queue_depth = 5
            self.writer_restarts = 2
            self.on_commit: Any = None

    m = Metrics(MetricsConfig())
    store = Store()
    m.bind_audit(store)
    store.on_commit(0.0004, 12)
    text = m.exposition().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert val(samples, "warden_audit_queue_depth") == 5
    assert val(samples, "warden_audit_writer_restarts_total") == 2
    assert val(samples, "warden_audit_commit_duration_seconds_count") == 1
    assert val(samples, "warden_audit_commit_duration_seconds_bucket", le="0.0005") == 1
    assert val(samples, "warden_audit_commit_duration_seconds_bucket", le="0.00025") == 0


def test_names_follow_prometheus_conventions() -> None:
    m = Metrics(MetricsConfig(tenant_label=True))
    for fam in m.registry.collect():
        assert fam.name.startswith("warden_"), fam.name
        if fam.type == "histogram" and fam.name != "warden_retrieval_chunks_injected":
            assert fam.name.endswith("_seconds"), fam.name
        for smp in fam.samples:
            assert not {"request_id", "user", "subject", "user_id"} & set(smp.labels), smp


# -- dashboard and alert rules are built on these metrics ------------------------------------

ROOT = Path(__file__).resolve().parents[2]
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")


@pytest.fixture
async def every_metric(warden_factory: Any, tmp_path: Path) -> Metrics:
    """The metrics of a Warden running every plugin: the core's own and those the plugins define at start."""
    w = await warden_factory(all_plugins_config(tmp_path, {"metrics": {"tenant_label": True}}))
    m: Metrics = w.warden.metrics
    return m


def _defined(m: Metrics) -> set[str]:
    """Sample names Warden can expose, plus the scrape health series Prometheus adds to every target."""
    return m.metric_names() | {"up"}


def _metric_refs(expr: str) -> set[str]:
    """Metric names an expression reads (label matchers and strings removed)."""
    bare = _LABEL_MATCHERS.sub("", re.sub(r'"[^"]*"', '""', expr))
    return {t for t in _IDENT.findall(bare) if t.startswith("warden_") or t == "up"}


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


async def test_grafana_dashboard_uses_only_defined_metrics_and_covers_them(every_metric: Metrics) -> None:
    defined = _defined(every_metric)
    dash = json.loads((ROOT / "deploy/grafana/warden.json").read_text())
    panels = _panels(dash)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    used: set[str] = set()
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for cx in range(g["x"], g["x"] + g["w"]):
            for cy in range(g["y"], g["y"] + g["h"]):
                assert (cx, cy) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((cx, cy))
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            refs = _metric_refs(t["expr"])
            assert refs, t["expr"]
            unknown = refs - defined
            assert not unknown, f"{p['title']}: {unknown} are not Warden metrics"
            assert 'job=~"$job"' in t["expr"], f"{p['title']}: every query follows the job/instance variables"
            used |= refs
    families = {f.name for f in every_metric.registry.collect()}
    covered = {n for n in families if any(u == n or u.startswith(n + "_") for u in used)}
    assert covered == families, f"metrics without a panel: {sorted(families - covered)}"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance"}


EXPECTED_ALERTS = {
    "WardenDown",
    "WardenUpstreamErrorRatioHigh",
    "WardenOverheadP99High",
    "WardenAuditWriteFailures",
    "WardenAuditQueueBacklog",
    "WardenAuditWriterRestarted",
    "WardenAuditCommitSlow",
    "WardenLimitsBackendDown",
    "WardenRetrievalIndexStale",
    "WardenRetrievalIngestFreshnessSlow",
    "WardenRetrievalSourceFreshnessSlow",
    "WardenRetrievalPermissionViolation",
    "WardenRetrievalCitationCoverageLow",
    "WardenRetrievalInvalidCitationsHigh",
}
RETRIEVAL_SLO_ALERTS = {n for n in EXPECTED_ALERTS if n.startswith("WardenRetrieval") and n != "WardenRetrievalIndexStale"}


def _alert_rules() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    assert isinstance(data, dict) and set(data) == {"groups"}
    return data


async def test_alert_rules_structure_and_metric_names(every_metric: Metrics) -> None:
    defined = _defined(every_metric)
    data = _alert_rules()
    names = []
    for g in data["groups"]:
        assert set(g) == {"name", "rules"} and g["name"].startswith("warden-")
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            names.append(r["alert"])
            assert r["labels"]["severity"] in {"critical", "warning"}
            assert r["annotations"]["summary"] and r["annotations"]["description"]
            refs = _metric_refs(r["expr"])
            assert refs and not refs - defined, f"{r['alert']}: {refs - defined}"
            if "for" in r:
                assert re.fullmatch(r"\d+[smh]", r["for"])
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    ls = ",".join(f'{k}="{v}"' for k, v in {"job": "warden", "instance": "a", **labels}.items())
    return {"series": f"{name}{{{ls}}}", "values": values}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt install prometheus)")
def test_alert_rules_fire_when_they_should_with_promtool(tmp_path: Path) -> None:
    data = _alert_rules()
    for g in data["groups"]:
        for r in g["rules"]:
            r.pop("annotations")  # templates are checked by `promtool check rules`; here: when alerts fire
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(data))
    check = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy/prometheus/alerts.yaml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    def fires(name: str, severity: str, **extra: str) -> dict[str, Any]:
        return {"eval_time": "20m", "alertname": name, "exp_alerts": [{"exp_labels": {"severity": severity, **extra}}]}

    def quiet(name: str) -> dict[str, Any]:
        return {"eval_time": "20m", "alertname": name, "exp_alerts": []}

    bucket = "warden_overhead_seconds_bucket"
    failing = [
        _series("warden_upstream_errors_total", "0+6x30", kind="connection"),
        _series("warden_upstream_errors_total", "0+50x30", kind="status_4xx"),
        _series("warden_upstream_duration_seconds_count", "0+60x30"),
        _series(bucket, "0+0x30", le="0.005"),
        _series(bucket, "0+60x30", le="0.05"),
        _series(bucket, "0+60x30", le="+Inf"),
        _series("warden_overhead_seconds_count", "0+60x30"),
        _series("warden_audit_write_failures_total", "0x15 1x15"),
        _series("warden_audit_writer_restarts_total", "0x15 1x15"),
        _series("warden_limits_backend_up", "1x10 0x20"),
        _series("warden_retrieval_index_staleness_seconds", "0x5 1000x25"),
        _series("warden_audit_queue_depth", "0x30"),
        _series("up", "1x30"),
    ]
    healthy = [
        _series("warden_upstream_errors_total", "0+50x30", kind="status_4xx"),
        _series("warden_upstream_errors_total", "0+1x30", kind="timeout"),
        _series("warden_upstream_duration_seconds_count", "0+60x30"),
        _series(bucket, "0+60x30", le="0.001"),
        _series(bucket, "0+60x30", le="+Inf"),
        _series("warden_overhead_seconds_count", "0+60x30"),
        _series("warden_audit_write_failures_total", "0x30"),
        _series("warden_audit_writer_restarts_total", "0x30"),
        _series("warden_limits_backend_up", "1x30"),
        _series("warden_retrieval_index_staleness_seconds", "30x30"),
        _series("up", "1x30"),
    ]
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": failing,
                "alert_rule_test": [
                    fires("WardenUpstreamErrorRatioHigh", "warning", job="warden", instance="a"),
                    fires("WardenOverheadP99High", "warning", job="warden", instance="a"),
                    fires("WardenAuditWriteFailures", "critical", job="warden", instance="a"),
                    fires("WardenAuditWriterRestarted", "warning", job="warden", instance="a"),
                    fires("WardenLimitsBackendDown", "critical", job="warden", instance="a"),
                    fires("WardenRetrievalIndexStale", "warning", job="warden", instance="a"),
                    quiet("WardenDown"),
                    quiet("WardenAuditQueueBacklog"),
                ],
            },
            {
                "interval": "1m",
                "input_series": healthy,
                "alert_rule_test": [quiet(n) for n in sorted(EXPECTED_ALERTS)],
            },
            *_retrieval_slo_rule_tests(),
        ],
    }
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(tests))
    r = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _retrieval_slo_rule_tests() -> list[dict[str, Any]]:
    """The retrieval SLO alerts against the targets a Warden exports from [retrieval.slo]: missed, then met."""
    targets = [_series("warden_retrieval_slo_target", f"{v}x120", objective=o) for o, v in (
        ("ingest_to_servable_p95_seconds", 30), ("source_to_servable_p95_seconds", 86400), ("permission_correctness", 1),
        ("citation_coverage", 0.9), ("invalid_citation_rate", 0.02))]
    fresh = "warden_retrieval_freshness_seconds_bucket"

    def buckets(stage: str, counts: dict[str, str]) -> list[dict[str, str]]:
        return [_series(fresh, v, stage=stage, le=le) for le, v in counts.items()]

    def inputs(ingest: str, source: str, violation: str, cited: tuple[str, str], valid: tuple[str, str]) -> list[dict[str, str]]:
        """Ten observations a minute, ``ingest`` of them within 10 s and ``source`` within an hour; checks, answers and citations."""
        return [
            *targets,
            *buckets("ingest_to_servable", {"10.0": ingest, "60.0": "0+10x120", "+Inf": "0+10x120"}),
            *buckets("source_to_servable", {"3600.0": source, "86400.0": source, "604800.0": "0+10x120", "+Inf": "0+10x120"}),
            _series("warden_retrieval_permission_checks_total", "0+10x120", result="ok"),
            _series("warden_retrieval_permission_checks_total", violation, result="violation"),
            _series("warden_retrieval_answers_total", cited[0], cited="yes"),
            _series("warden_retrieval_answers_total", cited[1], cited="no"),
            _series("warden_citations_total", valid[0], valid="true"),
            _series("warden_citations_total", valid[1], valid="false"),
        ]

    missed = inputs("0+0x120", "0+0x120", "0x50 1+0x70", ("0+1x120", "0+9x120"), ("0+5x120", "0+5x120"))
    met = inputs("0+10x120", "0+10x120", "0x120", ("0+9x120", "0+1x120"), ("0+100x120", "0+1x120"))
    severity = {"WardenRetrievalPermissionViolation": "critical"}

    def at(name: str, when: str, fires: bool) -> dict[str, Any]:
        alerts = [{"exp_labels": {"severity": severity.get(name, "warning"), "job": "warden"}}] if fires else []
        return {"eval_time": when, "alertname": name, "exp_alerts": alerts}

    return [
        {"interval": "1m", "input_series": missed,
         "alert_rule_test": [at(n, "100m", True) for n in sorted(RETRIEVAL_SLO_ALERTS - {"WardenRetrievalPermissionViolation"})]
         + [at("WardenRetrievalPermissionViolation", "45m", False), at("WardenRetrievalPermissionViolation", "55m", True),
            at("WardenRetrievalPermissionViolation", "70m", False)]},
        {"interval": "1m", "input_series": met, "alert_rule_test": [at(n, "100m", False) for n in sorted(RETRIEVAL_SLO_ALERTS)]},
    ]


def test_documented_config_sections_are_the_defaults() -> None:
    import tomllib

    from llm_warden.proxy.config import LoggingConfig, TracingConfig, load_config
    from llm_warden.proxy.plugin import available_plugins

    data = tomllib.loads((ROOT / "docs/observability.config.toml").read_text())
    assert set(data) == {"metrics", "tracing", "logging"}
    cfg = load_config({**data, "auth": {"mode": "none"}}, available_plugins())
    assert (cfg.metrics, cfg.tracing, cfg.logging) == (MetricsConfig(), TracingConfig(), LoggingConfig())
    for section, cls in (("metrics", MetricsConfig), ("tracing", TracingConfig), ("logging", LoggingConfig)):
        assert set(data[section]) == set(cls.__dataclass_fields__), f"[{section}] documents every key"
