"""Each plugin defines its own metrics at start and its live state shows on /metrics (read at scrape time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from llm_warden.proxy.config import MetricsConfig
from llm_warden.proxy.metrics import Metrics
from tests.conftest import ADMIN_TOKEN, deep_merge
from tests.fakeprovider import FakeProvider, Reply

PLUGIN_METRICS = {
    "warden_approvals_pending": "gauge",
    "warden_read_only": "gauge",
    "warden_tool_deprecated_calls": "counter",
    "warden_limits_backend_up": "gauge",
    "warden_ratelimit_decisions": "counter",
    "warden_retrieval_index_documents": "gauge",
    "warden_retrieval_index_staleness_seconds": "gauge",
    "warden_retrieval_freshness_seconds": "histogram",
    "warden_retrieval_permission_checks": "counter",
    "warden_retrieval_answers": "counter",
    "warden_retrieval_slo_target": "gauge",
}
"""What the tools, limits and retrieval plugins define (the dashboard and alert rules read them)."""


def all_plugins_config(tmp_path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config overrides that run every plugin with metrics (local stores under ``tmp_path``)."""
    cfg = {
        "plugins": {"enabled": ["limits", "retrieval", "tools", "headers"]},
        "limits": {"idempotency_db": str(tmp_path / "idem.db"), "rules": [{"scope": "user", "requests": "2/minute"}]},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "idx"), "mode": "bm25", "embedder": "none"},
        "policy": {"state_db": str(tmp_path / "state.db"), "read_only": True},
        "tools": [{"name": "refund", "effect": "write", "approval": "required", "schema": {"type": "object"}}],
    }
    return deep_merge(cfg, extra or {})


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in /metrics")


async def test_plugin_gauges_and_counters(warden_factory: Any, token: Any, fake: FakeProvider, tmp_path: Path) -> None:
    w = await warden_factory(all_plugins_config(tmp_path))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{w.admin_url}/admin/documents/acme/handbook?wait=true", json={"title": "Handbook", "text": "Vacation is 25 days.", "acl": {"public": True}}, headers=admin) as r:
            assert r.status in (200, 201), await r.text()
        async with s.put(f"{w.admin_url}/admin/mode", json={"read_only": False, "tenant": "acme"}, headers=admin) as r:
            assert r.status == 200, await r.text()
    c = openai.AsyncOpenAI(base_url=w.base_url, api_key=token(), max_retries=0)
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": "{}"}]), Reply(content="Pending approval."))
    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "refund please"}], tools=[{"type": "function", "function": {"name": "refund", "parameters": {}}}])
    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "vacation?"}])
    try:
        await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}])
        raise AssertionError("the third request must be limited")
    except openai.RateLimitError:
        pass
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{w.admin_url}/metrics") as r:
            text = await r.text()
    assert _value(text, "warden_approvals_pending ") == 1.0
    assert _value(text, 'warden_read_only{tenant="*"}') == 1.0
    assert _value(text, 'warden_read_only{tenant="acme"}') == 0.0
    assert _value(text, "warden_limits_backend_up ") == 1.0
    assert _value(text, 'warden_ratelimit_decisions_total{decision="deny"') == 1.0
    assert _value(text, 'warden_ratelimit_decisions_total{decision="allow"') == 2.0
    assert _value(text, "warden_retrieval_index_documents ") == 1.0
    assert _value(text, "warden_retrieval_index_staleness_seconds ") == 0.0
    assert _value(text, 'warden_tool_calls_total{decision="hold",tool="refund"}') == 1.0, "counted once, by the core"


async def test_plugins_define_their_metrics_documented(warden_factory: Any, tmp_path: Path) -> None:
    bare = await warden_factory({"plugins": {"enabled": ["headers"]}})
    w = await warden_factory(all_plugins_config(tmp_path))
    m: Metrics = w.warden.metrics
    without = {f.name for f in bare.warden.metrics.registry.collect()}
    families = {f.name: f for f in m.registry.collect()}
    assert {n: f.type for n, f in families.items() if n not in without} == PLUGIN_METRICS, "what the plugins add"
    assert not set(PLUGIN_METRICS) & {f.name for f in Metrics(MetricsConfig()).registry.collect()}, "the core declares none of them"
    assert set(PLUGIN_METRICS) <= set(m.defined), "defined through the registration API"
    for name in PLUGIN_METRICS:
        assert families[name].documentation.strip(), f"{name} has no HELP text"
