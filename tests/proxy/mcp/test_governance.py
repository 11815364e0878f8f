"""Approvals, pinned tool descriptions, resources and prompts, and the audit record of MCP exchanges."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llm_warden.proxy.audit.verify import verify_db
from llm_warden.proxy.mcp.pins import tool_digest
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import TokenFactory, Upstream, admin, mcp_client, mcp_config
from tests.proxy.mcp.upstream_server import LOOKUP_DESCRIPTION, rug_pull


def lookup_pin() -> str:
    """The digest of the upstream's lookup tool, computed as an operator would from its listing."""
    schema = {"properties": {"order_id": {"title": "Order Id", "type": "string"}}, "required": ["order_id"], "title": "lookupArguments", "type": "object"}
    return tool_digest({"description": LOOKUP_DESCRIPTION, "inputSchema": schema})


async def _records(rw: RunningWarden) -> list[dict[str, Any]]:
    assert rw.warden.audit is not None
    return [r["record"] async for r in rw.warden.audit.iter_records()]


async def test_approval_is_held_then_granted(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token(groups=["support"])) as c:
        held = await c.call_tool("refund", {"order_id": "o-9", "amount": 250})
        assert held.is_error
        text = held.content[0].text  # type: ignore[union-attr]
        m = re.search(r"approval id: (\S+?)\)", text)
        assert m is not None, text
        approval_id = m.group(1)
        assert upstream.effects.calls == []
        # Still pending: asking again does not execute it or open a second approval.
        again = await c.call_tool("refund", {"order_id": "o-9", "amount": 250})
        assert again.is_error and approval_id in again.content[0].text  # type: ignore[union-attr]
        r = await admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve", {"comment": "ok"})
        assert r.status_code == 200, r.text
        # Approval is bound to the exact call: other arguments are a new approval.
        other = await c.call_tool("refund", {"order_id": "o-9", "amount": 251})
        assert other.is_error and approval_id not in other.content[0].text  # type: ignore[union-attr]
        done = await c.call_tool("refund", {"order_id": "o-9", "amount": 250})
        assert not done.is_error, done
    assert upstream.effects.calls == [("refund", {"order_id": "o-9", "amount": 250})]


async def test_changed_description_is_caught_until_accepted(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    rw = await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url}], unpinned="refuse"))
    tok = token()
    async with mcp_client(rw, tok) as c:
        assert (await c.list_tools()).tools == []  # nothing accepted yet
        refused = await c.call_tool("lookup", {"order_id": "o-1"})
        assert refused.is_error and "mcp.pin.unaccepted" in refused.content[0].text  # type: ignore[union-attr]
    table = (await admin(rw, "GET", "/admin/mcp/pins")).json()["servers"]["crm"]
    seen = table["lookup"]["seen"]
    assert table["lookup"]["status"] == "unpinned" and seen.startswith("sha256:")
    r = await admin(rw, "POST", "/admin/mcp/pins", {"server": "crm", "tool": "lookup", "digest": seen})
    assert r.status_code == 200, r.text
    async with mcp_client(rw, tok) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["lookup"]
        rug_pull(upstream.server, upstream.effects)
        assert (await c.list_tools()).tools == []  # the planted instruction never reaches the agent
        refused = await c.call_tool("lookup", {"order_id": "o-1"})
        assert refused.is_error and "rule: mcp.pin)" in refused.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == []
    table = (await admin(rw, "GET", "/admin/mcp/pins")).json()["servers"]["crm"]
    assert table["lookup"]["status"] == "changed" and table["lookup"]["seen"] != seen
    r = await admin(rw, "POST", "/admin/mcp/pins", {"server": "crm", "tool": "lookup", "digest": table["lookup"]["seen"]})
    assert r.status_code == 200 and r.json()["previous"] == seen
    async with mcp_client(rw, tok) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["lookup"]
    kinds = [r["kind"] for r in await _records(rw)]
    assert kinds.count("mcp_pin_accepted") == 2 and "mcp_pin_changed" in kinds
    # Bad acceptances are refused, naming the rule.
    r = await admin(rw, "POST", "/admin/mcp/pins", {"server": "crm", "tool": "lookup", "digest": "md5:x"})
    assert r.status_code == 400 and "admin.mcp.pins" in r.text


async def test_config_pin(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    pin = lookup_pin()
    rw = await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url, "pins": {"lookup": pin}}], unpinned="refuse"))
    async with mcp_client(rw, token()) as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["lookup"]


async def test_resources_and_prompts_are_relayed(gateway: RunningWarden, token: TokenFactory) -> None:
    async with mcp_client(gateway, token()) as c:
        resources = await c.list_resources()
        assert [str(r.uri) for r in resources.resources] == ["crm://policies/refunds"]
        read = await c.read_resource("crm://policies/refunds")
        assert "no approval" in read.contents[0].text  # type: ignore[union-attr]
        prompts = await c.list_prompts()
        assert [p.name for p in prompts.prompts] == ["apologise"]
        got = await c.get_prompt("apologise", {"customer": "Bob"})
        assert "Bob" in got.messages[0].content.text  # type: ignore[union-attr]


async def test_every_exchange_is_audited_and_the_chain_verifies(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token(groups=["support"])) as c:
        await c.list_tools()
        await c.call_tool("lookup", {"order_id": "o-1"})
        await c.call_tool("refund", {"order_id": "o-2", "amount": 5000})
    records = [r for r in await _records(gateway) if r.get("mcp")]
    methods = [r["mcp"].get("method") for r in records]
    assert methods[:2] == ["initialize", "notifications/initialized"] and "tools/list" in methods
    listing = next(r for r in records if r["mcp"].get("method") == "tools/list")
    assert listing["mcp"]["tools_shown"] == ["lookup", "refund"]
    assert listing["mcp"]["tools_hidden"] == {"delete_everything": "policy.unknown_tools", "confirm": "tools[2].allow_groups"}
    calls = [r for r in records if r["mcp"].get("method") == "tools/call"]
    ok, bad = calls
    assert ok["principal"]["subject"] == "alice" and ok["mcp"]["server"] == "crm" and ok["mcp"]["tool"] == "lookup"
    assert ok["mcp"]["decision"] == "allow" and ok["mcp"]["result"]["bytes"] > 0 and len(ok["mcp"]["result"]["sha256"]) == 64
    assert (ok["tool_calls"][0]["name"], ok["tool_calls"][0]["server"]) == ("lookup", "crm") and ok["tool_calls"][0]["decision"] == "allow"
    assert bad["mcp"]["decision"] == "repair" and bad["mcp"]["rule"] == "tools[1].schema"
    assert bad["tool_calls"][0]["arguments"]  # the arguments are recorded (redacted like any content)
    assert all(r["principal"]["tenant"] == "acme" for r in records)
    report = await verify_db(Path(gateway.warden.config.resolve_path(gateway.warden.config.audit.path)))
    assert report.records >= len(records) and not report.faults, [f.code for f in report.faults]


async def test_metrics_by_server_and_tool(gateway: RunningWarden, token: TokenFactory) -> None:
    async with mcp_client(gateway, token()) as c:
        await c.call_tool("lookup", {"order_id": "o-1"})
        await c.call_tool("delete_everything", {})
    text = gateway.warden.metrics.exposition().decode()
    assert 'warden_mcp_tool_calls_total{decision="allow",server="crm",tool="lookup"} 1.0' in text
    assert 'warden_mcp_tool_calls_total{decision="deny",server="crm",tool="(undeclared)"} 1.0' in text
    assert 'warden_mcp_requests_total{method="tools/call",outcome="allow",server="crm"}' in text


async def test_spans_follow_the_mcp_conventions(gateway: RunningWarden, token: TokenFactory) -> None:
    import asyncio

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from llm_warden.proxy.tracing import Tracing

    exporter = InMemorySpanExporter()
    gateway.warden.tracing = Tracing(gateway.warden.config, exporter=exporter)
    async with mcp_client(gateway, token()) as c:
        await c.call_tool("lookup", {"order_id": "o-1"})
        await c.get_prompt("apologise", {"customer": "Bob"})
    for _ in range(100):
        servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
        if any(s.name == "prompts/get" for s in servers):
            break
        await asyncio.sleep(0.02)
    by_name = {s.name: s for s in servers}
    call = by_name["tools/call lookup"]
    attrs = dict(call.attributes or {})
    assert attrs["mcp.method.name"] == "tools/call" and attrs["gen_ai.tool.name"] == "lookup"
    assert attrs["gen_ai.operation.name"] == "execute_tool" and attrs["network.transport"] == "tcp"
    assert len(attrs["mcp.session.id"]) == 16 and attrs["mcp.protocol.version"] == "2025-11-25"
    assert attrs["warden.decision"] == "allow" and "jsonrpc.request.id" in attrs
    assert dict(by_name["prompts/get"].attributes or {})["gen_ai.prompt.name"] == "apologise"
    assert "initialize" in by_name


async def test_a_call_before_any_list_checks_the_pin_itself(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    """Another replica listed the tools (or none did): Warden lists them in the caller's session before judging the call."""
    pin = lookup_pin()
    rw = await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url, "pins": {"lookup": pin}}], unpinned="refuse"))
    gw = rw.warden.mcp
    assert gw is not None
    async with mcp_client(rw, token()) as c:
        assert gw.pins.seen == {}
        ok = await c.call_tool("lookup", {"order_id": "o-1"})
        assert not ok.is_error
        rug_pull(upstream.server, upstream.effects)
        gw.pins.seen.clear()
        refused = await c.call_tool("lookup", {"order_id": "o-2"})
        assert refused.is_error and "rule: mcp.pin)" in refused.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == [("lookup", {"order_id": "o-1"})]
