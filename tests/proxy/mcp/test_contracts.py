"""The tool contract through the MCP gateway, with the official SDK's client: one ``[[tools]]`` policy file
(``server = "crm"`` entries) judges MCP calls the way ``warden policy test`` says it does.

- an argument rule refuses a call, its name visible to the client;
- a deprecated version is offered with its note and relayed with ``_meta["warden/deprecation"]``,
  then hidden and refused from its sunset on (the judge's clock is injected), and counted;
- ``warden policy test`` on the same file, with MCP cases, gives the verdicts the gateway gave.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.proxy.cli import main
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import TokenFactory, Upstream, mcp_client, mcp_config

SUNSET = dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()
V2 = "orders/lookup.v2"
"""Version 2 of ``lookup``: an MCP tool name with "/" and "." (allowed for MCP tools, SEP-986)."""

LOOKUP = 'effect = "read"\nschema = { type = "object", required = ["order_id"], additionalProperties = false, properties = { order_id = { type = "string" } } }'
"""The two versions of lookup take the same arguments."""

POLICY = f"""
[policy]
read_only = false

[[tools]]
server = "crm"
name = "lookup"
version = 1
function_name = "lookup"
deprecated = "2027-01-31"
replacement = "lookup@2"
{LOOKUP}

[[tools]]
server = "crm"
name = "lookup"
version = 2
function_name = "{V2}"
{LOOKUP}

[[tools]]
server = "crm"
name = "refund"
effect = "write"
allow_groups = ["support"]
rules_default = "allow"
schema = {{ type = "object", required = ["order_id", "amount"], additionalProperties = false, properties = {{ order_id = {{ type = "string" }}, amount = {{ type = "integer", minimum = 1 }} }} }}

[[tools.rules]]
name = "over_limit"
decision = "deny"
when = {{ properties = {{ amount = {{ exclusiveMinimum = 500 }} }} }}
message = "refunds above 500 are made by the finance team"

[[tools]]
name = "refund"
effect = "write"
approval = "required"
schema = {{ type = "object" }}
"""

CASES = """
policy: policy.toml
principals:
  sam: {tenant: acme, user: sam, groups: [support]}
cases:
  - name: a small MCP refund is allowed by the default
    principal: sam
    server: crm
    tool: refund
    arguments: {order_id: o-1, amount: 5}
    expect: {decision: allow, rule: "tools[2].rules_default"}
  - name: a large MCP refund is denied by its rule
    principal: sam
    server: crm
    tool: refund
    arguments: {order_id: o-1, amount: 900}
    expect: {decision: deny, rule: "tools[2].rules.over_limit"}
  - name: the chat function of the same name is another entry
    principal: sam
    tool: refund
    arguments: {order_id: o-1, amount: 900}
    expect: {decision: hold, rule: "tools[3].approval"}
  - name: version 1 is deprecated before its sunset
    principal: sam
    server: crm
    tool: lookup
    now: "2027-01-30"
    arguments: {order_id: o-1}
    expect: {decision: allow, rule: "tools[0]", deprecated: true}
  - name: version 1 is refused from its sunset on
    principal: sam
    server: crm
    tool: lookup
    now: "2027-01-31"
    arguments: {order_id: o-1}
    expect: {decision: deny, rule: "tools[0].deprecated"}
  - name: an undeclared tool of the server is refused
    principal: sam
    server: crm
    tool: delete_everything
    arguments: {}
    expect: {decision: deny, rule: policy.unknown_tools}
"""


@pytest.fixture
async def upstream_v2() -> Any:
    """The test server, plus version 2 of lookup under a name with "/" and "."."""
    up = Upstream()

    def lookup_v2(order_id: str) -> str:
        up.effects.record(V2, {"order_id": order_id})
        return f"order {order_id}: shipped (v2)"

    up.server.add_tool(lookup_v2, name=V2, description="Look up an order by id (v2).")
    await up.start()
    yield up
    await up.http.stop()


@pytest.fixture
async def rw(warden_factory: WardenFactory, upstream_v2: Upstream, tmp_path: Path) -> RunningWarden:
    cfg = mcp_config(tmp_path, [{"name": "crm", "url": upstream_v2.http.url}])
    cfg["tools"] = tomllib.loads(POLICY)["tools"]
    return await warden_factory(cfg)


def tools_plugin(rw: RunningWarden) -> ToolsPlugin:
    plugin = rw.warden.chain.get("tools")
    assert isinstance(plugin, ToolsPlugin)
    return plugin


async def deprecated_calls(rw: RunningWarden, status: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{rw.admin_url}/metrics") as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith("warden_tool_deprecated_calls_total{") and 'tool="crm/lookup"' in line and 'version="1"' in line and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_an_argument_rule_refuses_an_mcp_call_by_name(rw: RunningWarden, upstream_v2: Upstream, token: TokenFactory) -> None:
    async with mcp_client(rw, token(groups=["support"])) as c:
        denied = await c.call_tool("refund", {"order_id": "o-1", "amount": 900})
        allowed = await c.call_tool("refund", {"order_id": "o-1", "amount": 5})
    assert denied.is_error
    text = denied.content[0].text  # type: ignore[union-attr]
    assert "rule: tools[2].rules.over_limit" in text and "refunds above 500 are made by the finance team" in text
    assert denied.meta is not None and denied.meta["warden/decision"]["rule"] == "tools[2].rules.over_limit"
    assert not allowed.is_error, "a chat function named refund (approval required) does not govern the MCP tool"
    assert upstream_v2.effects.calls == [("refund", {"order_id": "o-1", "amount": 5})]


async def test_a_deprecated_mcp_version_is_warned_then_refused_after_its_sunset(rw: RunningWarden, upstream_v2: Upstream, token: TokenFactory) -> None:
    tools = tools_plugin(rw)
    tools.judge.clock = lambda: SUNSET - 3600
    async with mcp_client(rw, token()) as c:
        shown = {t.name: t for t in (await c.list_tools()).tools}
        r = await c.call_tool("lookup", {"order_id": "o-1"})
    assert sorted(shown) == ["lookup", V2]
    assert (shown["lookup"].description or "").startswith(
        "DEPRECATED: this tool (lookup@1) stops working at 2027-01-31 UTC; use 'orders/lookup.v2' (lookup@2) instead. Look up an order by id."
    ), "the caller's model reads the note before the upstream's description"
    assert shown["lookup"].meta is not None and shown["lookup"].meta["warden/deprecation"]["replacement"] == "lookup@2"
    assert not r.is_error and "order o-1: shipped" in r.content[0].text  # type: ignore[union-attr]
    assert r.meta is not None
    warning = r.meta["warden/deprecation"]
    assert warning["sunset"] == "2027-01-31" and warning["retired"] is False and warning["replacement_function"] == V2
    assert await deprecated_calls(rw, "warned") == 1.0

    tools.judge.clock = lambda: SUNSET
    async with mcp_client(rw, token()) as c:
        shown_after = sorted(t.name for t in (await c.list_tools()).tools)
        refused = await c.call_tool("lookup", {"order_id": "o-2"})
        v2 = await c.call_tool(V2, {"order_id": "o-2"})
    assert shown_after == [V2], "a retired version is no longer listed"
    assert refused.is_error
    text = refused.content[0].text  # type: ignore[union-attr]
    assert "rule: tools[0].deprecated" in text and "retired at 2027-01-31 UTC" in text and "'orders/lookup.v2' (lookup@2)" in text
    assert refused.meta is not None and refused.meta["warden/decision"]["deprecation"]["retired"] is True
    assert not v2.is_error and "(v2)" in v2.content[0].text  # type: ignore[union-attr]
    assert upstream_v2.effects.calls == [("lookup", {"order_id": "o-1"}), (V2, {"order_id": "o-2"})]
    assert await deprecated_calls(rw, "retired") == 1.0
    assert await deprecated_calls(rw, "warned") == 1.0


async def test_policy_test_gives_the_gateways_verdicts(
    rw: RunningWarden, upstream_v2: Upstream, token: TokenFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    (tmp_path / "cases.yaml").write_text(textwrap.dedent(CASES))
    rc = main(["policy", "test", str(tmp_path / "cases.yaml")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "6 cases: 6 passed, 0 failed"
    # The gateway, on the same file, decides the same calls the same way.
    async with mcp_client(rw, token(sub="sam", groups=["support"])) as c:
        small = await c.call_tool("refund", {"order_id": "o-1", "amount": 5})
        large = await c.call_tool("refund", {"order_id": "o-1", "amount": 900})
        undeclared = await c.call_tool("delete_everything", {})
    assert not small.is_error
    assert [r.meta["warden/decision"]["rule"] for r in (large, undeclared) if r.meta is not None] == ["tools[2].rules.over_limit", "policy.unknown_tools"]
    assert upstream_v2.effects.calls == [("refund", {"order_id": "o-1", "amount": 5})]


async def test_entries_of_a_server_that_is_not_configured_are_reported(
    warden_factory: WardenFactory, upstream_v2: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = mcp_config(tmp_path, [{"name": "crm", "url": upstream_v2.http.url}])
    cfg["tools"] = [*tomllib.loads(POLICY)["tools"], {"server": "CRM", "name": "lookup", "effect": "read", "schema": {"type": "object"}}]
    with caplog.at_level("WARNING", logger="warden.tools"):
        await warden_factory(cfg)
    assert [r.getMessage() for r in caplog.records if r.name == "warden.tools"] == [
        "[[tools]] entries name server 'CRM', which is not in [[mcp.servers]]: they govern nothing"
    ]
