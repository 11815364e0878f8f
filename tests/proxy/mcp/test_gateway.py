"""The MCP gateway end to end: the official SDK's client → Warden → a real MCP server (official SDK)."""

from __future__ import annotations

from pathlib import Path

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import UPSTREAM_TOKEN, TokenFactory, Upstream, mcp_client


async def test_tools_list_is_filtered_per_principal(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token(groups=["staff"])) as c:
        names = sorted(t.name for t in (await c.list_tools()).tools)
    assert names == ["lookup"]  # refund needs group support; delete_everything has no [[tools]] entry
    async with mcp_client(gateway, token(groups=["support"])) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    assert sorted(tools) == ["lookup", "refund"]
    # The policy's schema (what is enforced) is what the caller sees.
    assert tools["refund"].input_schema["properties"]["amount"]["maximum"] == 1000
    # Only the name, the pinned description and the policy schema: no upstream title, annotations or output schema.
    assert tools["lookup"].title is None and tools["lookup"].output_schema is None and tools["lookup"].annotations is None
    # Warden's own credential went upstream, never the caller's token.
    assert upstream.headers is not None
    assert set(upstream.headers.authorization) == {UPSTREAM_TOKEN}


async def test_read_call_is_relayed(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token()) as c:
        r = await c.call_tool("lookup", {"order_id": "o-1"})
    assert not r.is_error
    assert "order o-1: shipped" in r.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == [("lookup", {"order_id": "o-1"})]


async def test_invalid_call_is_refused_with_a_useful_error(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token()) as c:
        r = await c.call_tool("lookup", {"order_id": "../etc/passwd"})
    assert r.is_error
    text = r.content[0].text  # type: ignore[union-attr]
    assert "/order_id" in text and "tools[0].schema" in text
    assert upstream.effects.calls == []


async def test_ungoverned_and_forbidden_tools_are_refused(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token(groups=["staff"])) as c:
        r1 = await c.call_tool("delete_everything", {})
        r2 = await c.call_tool("refund", {"order_id": "o-1", "amount": 5})
    assert r1.is_error and "policy.unknown_tools" in r1.content[0].text  # type: ignore[union-attr]
    assert r2.is_error and "tools[1].allow_groups" in r2.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == []


async def test_write_tool_hidden_and_refused_in_read_only_mode(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    from tests.proxy.mcp.conftest import mcp_config

    rw = await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url}], read_only=True))
    async with mcp_client(rw, token(groups=["support"])) as c:
        names = sorted(t.name for t in (await c.list_tools()).tools)
        r = await c.call_tool("refund", {"order_id": "o-1", "amount": 5})
    assert names == ["lookup"]
    assert r.is_error and "policy.read_only" in r.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == []


async def test_duplicate_write_in_a_session_is_refused(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    async with mcp_client(gateway, token(groups=["support"])) as c:
        first = await c.call_tool("refund", {"order_id": "o-7", "amount": 5})
        again = await c.call_tool("refund", {"amount": 5, "order_id": "o-7"})
        other = await c.call_tool("refund", {"order_id": "o-7", "amount": 6})
    assert not first.is_error and not other.is_error
    assert again.is_error and "tools.duplicate" in again.content[0].text  # type: ignore[union-attr]
    assert upstream.effects.calls == [("refund", {"order_id": "o-7", "amount": 5}), ("refund", {"order_id": "o-7", "amount": 6})]


async def test_auto_mode_falls_back_to_the_handshake(gateway: RunningWarden, token: TokenFactory) -> None:
    # mode="auto" probes server/discover (the 2026-07-28 envelope) first: Warden refuses it
    # (not on the allow-list) and the SDK falls back to initialize.
    async with mcp_client(gateway, token(), mode="auto") as c:
        assert [t.name for t in (await c.list_tools()).tools] == ["lookup"]


async def test_server_initiated_requests_and_notifications_are_relayed(gateway: RunningWarden, upstream: Upstream, token: TokenFactory) -> None:
    """A tool that reports progress and asks the user (elicitation) mid-call: both travel on the call's SSE stream,
    the caller's answer comes back as a JSON-RPC response message, and the call completes."""
    import mcp_types as types

    asked: list[str] = []
    progress: list[float] = []

    async def on_elicit(context: object, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from tests.proxy.mcp.conftest import mcp_url

    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token(groups=['ops'])}"}) as hc:
        async with Client(streamable_http_client(mcp_url(gateway), http_client=hc), mode="legacy", elicitation_callback=on_elicit) as c:  # type: ignore[arg-type]
            r = await c.call_tool("confirm", {"order_id": "o-5"}, progress_callback=on_progress)
    assert not r.is_error and r.content[0].text == "accept: True"  # type: ignore[union-attr]
    assert asked == ["Really close o-5?"] and progress == [0.5]
    assert upstream.effects.calls == [("confirm", {"order_id": "o-5", "action": "accept"})]
    # The caller's answer to the server's request was a message of its own, recorded like any other.
    assert gateway.warden.audit is not None
    kinds = [r["record"].get("mcp", {}).get("kind") async for r in gateway.warden.audit.iter_records()]
    assert "response" in kinds


async def test_tool_rate_limit(warden_factory: WardenFactory, upstream: Upstream, token: TokenFactory, tmp_path: Path) -> None:
    from tests.proxy.mcp.conftest import TOOLS, mcp_config

    cfg = mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url}])
    cfg["tools"] = [{**TOOLS[0], "rate_limit": "2/minute"}, *TOOLS[1:]]
    rw = await warden_factory(cfg)
    async with mcp_client(rw, token()) as c:
        results = [await c.call_tool("lookup", {"order_id": f"o-{i}"}) for i in range(3)]
    assert [r.is_error for r in results] == [False, False, True]
    assert "tools[0].rate_limit" in results[2].content[0].text  # type: ignore[union-attr]
    assert len(upstream.effects.calls) == 2
