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
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import MetricsConfig
from proxy.exchange import Decision, Exchange, ToolCall
from proxy.metrics import Metrics
from proxy.plugin import Plugin
from tests.fakeprovider import FakeProvider, Reply

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
    assert val(after, "warden_requests_total", route="chat", model="none", status_class="4xx") == 2
    assert total(after, "warden_refusals_total", status="401") == 1
    assert total(after, "warden_refusals_total", rule="request.json", status="400") == 1

    labels = {"route": "chat", "model": "m", "stream": "false"}
    assert val(after, "warden_request_duration_seconds_count", **labels) == 2
    assert val(after, "warden_request_duration_seconds_bucket", le="+Inf", **labels) == 2
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in after.items() if n == "warden_request_duration_seconds_bucket" and set(labels.items()) <= ls)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"
    assert 0 < val(after, "warden_request_duration_seconds_sum", **labels) < 10
    assert val(after, "warden_upstream_duration_seconds_count", route="chat", model="m") == 2
    assert val(after, "warden_overhead_seconds_count", route="chat") == 4
    # Warden's own time on a loopback fake provider stays far below a second.
    assert val(after, "warden_overhead_seconds_bucket", route="chat", le="0.1") == 4
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
    if stream:
        async for _ in await c.chat.completions.create(**BODY, stream=True):
            pass
    else:
        await c.chat.completions.create(**BODY)
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
        ex.retrieval = {"mode": "hybrid", "top_k": 5, "injected": 3, "excluded": {"acl": 2, "rank": 4}, "timings_ms": {"bm25": 1.5, "vector": 2.0, "total": 4.0}}
        ex.timings["retrieval_s"] = 0.005

    async def on_response(self, ex: Exchange) -> None:
        ex.citations = [{"n": 1, "valid": True}, {"n": 2, "valid": True}, {"n": 9, "valid": False}]


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


async def test_plugin_state_through_callbacks_and_a_failing_callback(warden: Any) -> None:
    m: Metrics = warden.warden.metrics
    pending = {"n": 2}
    read_only = {"*": True, "acme": False}
    m.register_gauge_callback("approvals_pending", lambda: pending["n"])
    m.register_gauge_callback("warden_read_only", lambda: read_only)
    m.register_counter_callback("ratelimit_decisions", lambda: {("tenant-rpm", "allow"): 7, ("tenant-rpm", "deny"): 1})
    m.register_gauge_callback("limits_backend_up", lambda: 1 / 0)
    m.retrieval_index_documents.set(42)
    s = await scrape(warden.admin_url)
    assert val(s, "warden_approvals_pending") == 2
    assert val(s, "warden_read_only", tenant="*") == 1
    assert val(s, "warden_read_only", tenant="acme") == 0
    assert val(s, "warden_ratelimit_decisions_total", rule="tenant-rpm", decision="deny") == 1
    assert val(s, "warden_retrieval_index_documents") == 42
    assert ("warden_limits_backend_up", frozenset()) not in s, "a failing callback drops its metric, not the scrape"
    pending["n"] = 0
    read_only["acme"] = True
    s = await scrape(warden.admin_url)
    assert val(s, "warden_approvals_pending") == 0
    assert val(s, "warden_read_only", tenant="acme") == 1
    with pytest.raises(KeyError):
        m.register_gauge_callback("requests", lambda: 1)
    with pytest.raises(KeyError):
        m.register_counter_callback("approvals_pending", lambda: 1)


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
# Warden's own sample names, plus the scrape health series Prometheus adds to every target.
_DEFINED = Metrics(MetricsConfig(tenant_label=True)).metric_names() | {"up"}


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


def test_grafana_dashboard_uses_only_defined_metrics_and_covers_them() -> None:
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
            unknown = refs - _DEFINED
            assert not unknown, f"{p['title']}: {unknown} are not Warden metrics"
            assert 'job=~"$job"' in t["expr"], f"{p['title']}: every query follows the job/instance variables"
            used |= refs
    families = {f.name for f in Metrics(MetricsConfig()).registry.collect()}
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
}


def _alert_rules() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    assert isinstance(data, dict) and set(data) == {"groups"}
    return data


def test_alert_rules_structure_and_metric_names() -> None:
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
            assert refs and not refs - _DEFINED, f"{r['alert']}: {refs - _DEFINED}"
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
        ],
    }
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(tests))
    r = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_documented_config_sections_are_the_defaults() -> None:
    import tomllib

    from proxy.config import LoggingConfig, TracingConfig, load_config
    from proxy.plugin import available_plugins

    data = tomllib.loads((ROOT / "docs/observability.config.toml").read_text())
    assert set(data) == {"metrics", "tracing", "logging"}
    cfg = load_config({**data, "auth": {"mode": "none"}}, available_plugins())
    assert (cfg.metrics, cfg.tracing, cfg.logging) == (MetricsConfig(), TracingConfig(), LoggingConfig())
    for section, cls in (("metrics", MetricsConfig), ("tracing", TracingConfig), ("logging", LoggingConfig)):
        assert set(data[section]) == set(cls.__dataclass_fields__), f"[{section}] documents every key"
