"""Versioned tool contracts: names, sunsets, deprecation warnings and retirement, MCP namespaces."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.tools.check import ToolPolicy
from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry
from llm_warden.plugins.tools.judge import ExchangeState
from llm_warden.plugins.tools.versions import parse_sunset
from llm_warden.proxy.errors import ConfigError, Forbidden
from llm_warden.proxy.exchange import Decision, ToolDecisionRecord
from llm_warden.proxy.tooling import offer_check, parse_call
from tests.plugins.tools.helpers import BILLING, REFUND_SCHEMA, REFUND_V1, build_config, exchange

SUNSET = dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()
BEFORE = SUNSET - 1
AT = SUNSET

V2_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["invoice_id", "amount_cents"],
    "additionalProperties": False,
    "properties": {"invoice_id": {"type": "string"}, "amount_cents": {"type": "integer", "minimum": 1}},
}

VERSIONED: list[dict[str, Any]] = [
    {**REFUND_V1, "description": "Refund an invoice."},
    {"name": "refund", "version": 2, "effect": "write", "allow_groups": ["billing"], "schema": V2_SCHEMA},
    {"name": "lookup", "effect": "read", "schema": {"type": "object"}},
    {"name": "export", "version": 3, "effect": "read", "deprecated": "2027-01-31T12:00:00+01:00", "schema": {"type": "object"}},
]
V1_ARGS = '{"invoice_id": "inv_1", "amount": 5, "reason": "duplicate"}'
V2_ARGS = '{"invoice_id": "inv_1", "amount_cents": 500}'


def fn(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "from the app", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("value", "at", "text"),
    [
        ("2027-01-31", SUNSET, "2027-01-31"),
        (dt.date(2027, 1, 31), SUNSET, "2027-01-31"),
        ("2027-01-31T00:00:00Z", SUNSET, "2027-01-31T00:00:00Z"),
        ("2027-01-31T01:00:00+01:00", SUNSET, "2027-01-31T00:00:00Z"),
        (dt.datetime(2027, 1, 30, 19, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))), SUNSET, "2027-01-31T00:00:00Z"),
    ],
)
def test_a_sunset_is_a_utc_moment(value: Any, at: float, text: str) -> None:
    s = parse_sunset(value)
    assert (s.at, s.text) == (at, text)


@pytest.mark.parametrize("value", ["2027-02-30", "31/01/2027", "2027-01-31T00:00:00", dt.datetime(2027, 1, 31), "", 20270131, None, "soon"])
def test_a_sunset_without_a_utc_meaning_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_sunset(value)


def test_function_names_contracts_and_deprecations_resolve(tmp_path: Path) -> None:
    cfg = build_config(tmp_path, tools=VERSIONED)
    reg = ToolRegistry(cfg.plugin_sections["tools"])
    assert sorted(reg.tools) == ["export_v3", "lookup", "refund", "refund_v2"]
    assert reg.contract("refund@1") is reg.tools["refund"] and reg.contract("refund@2") is reg.tools["refund_v2"]
    assert reg.contract("lookup") is reg.tools["lookup"] and reg.contract("refund") is None
    dep = reg.tools["refund"].deprecation
    assert dep is not None and (dep.contract, dep.replacement, dep.replacement_function, dep.sunset.at) == ("refund@1", "refund@2", "refund_v2", SUNSET)
    export = reg.tools["export_v3"].deprecation
    assert export is not None and export.replacement is None and export.sunset.text == "2027-01-31T11:00:00Z"
    assert reg.tools["refund_v2"].deprecation is None


def test_toml_dates_are_accepted(tmp_path: Path) -> None:
    data = tomllib.loads('[[tools]]\nname = "x"\nversion = 1\neffect = "read"\ndeprecated = 2027-01-31\nschema = { type = "object" }\n')
    cfg = build_config(tmp_path, tools=data["tools"])
    dep = ToolRegistry(cfg.plugin_sections["tools"]).tools["x_v1"].deprecation
    assert dep is not None and dep.sunset.at == SUNSET


@pytest.mark.parametrize(
    ("tools", "key", "fragment"),
    [
        ([{**VERSIONED[1], "version": 0}], "tools[0].version", "from 1"),
        ([{**VERSIONED[1], "version": "2"}], "tools[0].version", "does not fit"),
        ([{**VERSIONED[1], "function_name": "refund@2"}], "tools[0].function_name", "not a valid function name"),
        ([{**VERSIONED[1], "name": "r" * 63}], "tools[0].version", "set function_name"),
        ([{**VERSIONED[1], "deprecated": "next year"}], "tools[0].deprecated", "not a date"),
        ([{**VERSIONED[1], "deprecated": "2027-01-31T00:00:00"}], "tools[0].deprecated", "no UTC offset"),
        ([{**VERSIONED[1], "replacement": "refund@1"}], "tools[0].replacement", "needs deprecated"),
        ([{**VERSIONED[1], "deprecated": "2027-01-31", "replacement": "refund v1"}], "tools[0].replacement", "not a contract"),
        ([VERSIONED[0]], "tools[0].replacement", "no [[tools]] entry is the contract 'refund@2'"),
        ([{**VERSIONED[0], "replacement": "refund@1"}], "tools[0].replacement", "cannot replace itself"),
        (
            [VERSIONED[0], {**VERSIONED[1], "deprecated": "2027-01-30"}],
            "tools[0].replacement",
            "the replacement refund@2 is retired at 2027-01-30, not after this version (2027-01-31)",
        ),
        ([VERSIONED[1], {**VERSIONED[1], "schema": {"type": "object"}}], "tools[1].version", "'refund_v2' is already declared at tools[0]"),
        ([VERSIONED[1], {"name": "refund_v2", "effect": "read", "schema": {"type": "object"}}], "tools[1].name", "already declared at tools[0] (refund@2)"),
        ([VERSIONED[1], {**VERSIONED[1], "function_name": "refund_two"}], "tools[1].version", "contract 'refund@2' is already declared"),
        ([{**VERSIONED[2], "server": "bad server"}], "tools[0].server", "not a valid server name"),
    ],
)
def test_invalid_versions_fail_at_load_naming_the_key(tmp_path: Path, tools: list[dict[str, Any]], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg = build_config(tmp_path, tools=tools)
        ToolRegistry(cfg.plugin_sections["tools"])
    assert err.value.key == key
    assert fragment in str(err.value)


async def test_a_deprecated_version_is_allowed_with_a_warning_until_its_sunset(make_plugin: Any) -> None:
    plugin, _ = await make_plugin(tools=VERSIONED)
    plugin.judge.clock = lambda: BEFORE
    d = await plugin.judge.judge(exchange(), parse_call("c1", "refund", V1_ARGS, 0), ExchangeState())
    assert (d.kind, d.rule) == ("allow", "tools[0]")
    assert d.details is not None and d.details["contract"] == "refund@1"
    assert d.details["deprecation"] == {
        "contract": "refund@1", "sunset": "2027-01-31", "retired": False, "replacement": "refund@2", "replacement_function": "refund_v2"
    }
    d2 = await plugin.judge.judge(exchange(), parse_call("c1", "refund_v2", V2_ARGS, 0), ExchangeState())
    assert (d2.kind, d2.details) == ("allow", {"contract": "refund@2"})
    plugin.judge.clock = lambda: AT
    d = await plugin.judge.judge(exchange(), parse_call("c1", "refund", V1_ARGS, 0), ExchangeState())
    assert (d.kind, d.rule) == ("deny", "tools[0].deprecated")
    assert "retired at 2027-01-31 UTC" in d.reason and "use 'refund_v2' (refund@2) instead" in d.reason
    assert d.details is not None and d.details["deprecation"]["retired"] is True


async def test_retirement_comes_before_permission_and_arguments(make_plugin: Any) -> None:
    plugin, _ = await make_plugin(tools=VERSIONED)
    plugin.judge.clock = lambda: AT
    outsider = exchange(principal=None)
    d = await plugin.judge.judge(outsider, parse_call("c1", "refund", "{not json", 0), ExchangeState())
    assert d.rule == "tools[0].deprecated"


async def test_the_request_offers_a_deprecated_version_with_a_note_and_a_header(make_plugin: Any) -> None:
    plugin, _ = await make_plugin(tools=VERSIONED)
    plugin.judge.clock = lambda: BEFORE
    ex = exchange(body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [fn("refund"), fn("refund_v2"), fn("export_v3")]})
    await plugin.on_request(ex)
    assert ex.body is not None
    sent = {t["function"]["name"]: t["function"] for t in ex.body["tools"]}
    assert sent["refund"]["description"] == (
        "DEPRECATED: this tool (refund@1) stops working at 2027-01-31 UTC; use 'refund_v2' (refund@2) instead. Refund an invoice."
    )
    assert sent["refund"]["parameters"] == REFUND_SCHEMA
    assert sent["export_v3"]["description"].startswith("DEPRECATED: this tool (export@3) stops working at 2027-01-31T11:00:00Z UTC; it has no replacement.")
    assert sent["export_v3"]["description"].endswith(" from the app"), "the application's description follows the note"
    assert sent["refund_v2"]["description"] == "from the app"
    assert ex.response_headers["x-warden-deprecation"] == (
        'refund; contract="refund@1"; sunset="2027-01-31"; replacement="refund_v2", export_v3; contract="export@3"; sunset="2027-01-31T11:00:00Z"'
    )
    assert plugin.audit_fields(ex) == {"deprecated_offered": ex.response_headers["x-warden-deprecation"].split(", ")}


async def test_after_the_sunset_the_request_withholds_the_version_and_the_core_refuses_it(make_plugin: Any) -> None:
    plugin, _ = await make_plugin(tools=VERSIONED)
    plugin.judge.clock = lambda: AT
    ex = exchange(body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [fn("refund"), fn("refund_v2")]})
    await plugin.on_request(ex)
    assert ex.body is not None and [t["function"]["name"] for t in ex.body["tools"]] == ["refund_v2"]
    assert ex.response_headers["x-warden-deprecation"] == 'refund; contract="refund@1"; sunset="2027-01-31"; replacement="refund_v2"; retired'
    refused = offer_check(ex, parse_call("c1", "refund", V1_ARGS, 0))
    assert refused is not None and refused.rule == "tools[0].deprecated" and "use 'refund_v2' (refund@2) instead" in refused.reason
    forced = exchange(body={"model": "m", "messages": [], "tools": [fn("refund")], "tool_choice": {"type": "function", "function": {"name": "refund"}}})
    with pytest.raises(Forbidden) as err:
        await plugin.on_request(forced)
    assert err.value.rule == "tools[0].deprecated"


async def test_calls_of_deprecated_versions_are_counted_warned_then_retired(make_plugin: Any) -> None:
    plugin, _ = await make_plugin(tools=VERSIONED)
    ex = exchange()
    call = parse_call("c1", "refund", V1_ARGS, 0)
    ex.tool_decisions = [
        ToolDecisionRecord(0, call, Decision.allow("tools[0]")),
        ToolDecisionRecord(1, call, Decision.repair("tools[0].schema", "r")),
        ToolDecisionRecord(1, parse_call("c2", "refund_v2", V2_ARGS, 1), Decision.allow("tools[1]")),
        ToolDecisionRecord(2, call, Decision.deny("tools[0].deprecated", "r")),
    ]
    await plugin.on_complete(ex)
    assert dict(plugin.deprecated_calls) == {("refund", "1", "warned"): 2, ("refund", "1", "retired"): 1}


def test_mcp_tools_live_in_their_server_namespace(tmp_path: Path) -> None:
    tools = [
        {"name": "refund", "effect": "write", "schema": {"type": "object"}},
        {"server": "crm", "name": "refund", "effect": "read", "schema": {"type": "object"}},
        {"server": "crm", "name": "contacts/update.v2", "effect": "write", "schema": {"type": "object"}},
        {"server": "erp", "name": "refund", "version": 2, "effect": "write", "deprecated": "2027-01-31", "replacement": "refund", "schema": {"type": "object"}},
        {"server": "erp", "name": "refund", "effect": "write", "schema": {"type": "object"}},
    ]
    cfg = build_config(tmp_path, tools=tools)
    policy = ToolPolicy(ToolRegistry(cfg.plugin_sections["tools"]), PolicyConfig(read_only=False), clock=lambda: BEFORE)
    chat, crm = policy.resolve("refund"), policy.resolve("refund", "crm")
    assert chat is not None and crm is not None and (chat.index, crm.index) == (0, 1)
    assert crm.ref == "crm/refund" and policy.resolve("contacts/update.v2") is None
    assert policy.resolve("refund", "nowhere") is None
    erp = policy.resolve("refund_v2", "erp")
    assert erp is not None and erp.deprecation is not None and erp.deprecation.replacement_function == "refund"
    d = policy.verdict(BILLING, parse_call("c", "contacts/update.v2", "{}", 0), lambda _t: (False, ""), "crm")
    assert (d.kind, d.rule) == ("allow", "tools[2]")
    d = policy.verdict(BILLING, parse_call("c", "contacts/update.v2", "{}", 0), lambda _t: (False, ""))
    assert d.rule == "policy.unknown_tools", "a chat call never reaches an MCP server's entry"
    assert policy.offer_failure("refund", BILLING, (True, "globally"), "crm") is None, "a read tool stays offered in read-only mode"
    assert policy.offer_failure("contacts/update.v2", BILLING, (True, "globally"), "crm") == ("policy.read_only", "it is a write tool and read-only mode is on globally")
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, tools=[{"name": "a.b", "effect": "read", "schema": {"type": "object"}}])
    assert err.value.key == "tools[0].name", "a chat function name cannot hold a dot"


async def test_the_plugin_judges_an_mcp_call_under_its_server(make_plugin: Any) -> None:
    tools = [
        {"name": "wire", "effect": "write", "approval": "required", "schema": {"type": "object"}},
        {"server": "bank", "name": "wire", "effect": "write", "approval": "required", "schema": {"type": "object"}},
        {"server": "bank", "name": "balance", "effect": "read", "allow_groups": ["billing"], "schema": {"type": "object"}},
    ]
    plugin, _ = await make_plugin(tools=tools)
    chat = await plugin.judge_call(exchange(), parse_call("c1", "wire", '{"to": "x"}', 0))
    assert chat.kind == "hold" and chat.rule == "tools[0].approval" and chat.approval_id is not None
    await plugin.store_required().decide(chat.approval_id, "approved", {"subject": "rita"}, "", 3600)
    mcp = await plugin.judge_call(exchange(), parse_call("c1", "wire", '{"to": "x"}', 0), server="bank")
    assert mcp.kind == "hold" and mcp.rule == "tools[1].approval" and mcp.approval_id != chat.approval_id, (
        "an approval of the chat tool does not approve the MCP server's tool of the same name"
    )
    held = await plugin.store_required().get(mcp.approval_id or "")
    assert held is not None and held.tool == "bank/wire"
    allowed = await plugin.judge_call(exchange(), parse_call("c1", "wire", '{"to": "x"}', 0))
    assert (allowed.kind, allowed.approval_id) == ("allow", chat.approval_id)
    assert plugin.offer_failure(BILLING, "balance", "bank") is None
    assert plugin.offer_failure(None, "balance", "bank") == ("tools[2].allow_groups", "it requires membership in one of the groups billing")
    assert plugin.offer_failure(BILLING, "balance") == ("policy.unknown_tools", "it is not declared in the tool registry")
    assert plugin.decision_counts[("bank/wire", "hold")] == 1 and plugin.decision_counts[("wire", "allow")] == 1
