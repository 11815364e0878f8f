"""Argument-aware rules ([[tools.rules]]): first match wins, fail closed, validated at load, hostile arguments."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.judge import ExchangeState, ToolJudge
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.plugins.tools.rules import ArgumentRule
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, Principal, ToolCall
from llm_warden.proxy.tooling import parse_call
from tests.plugins.tools.helpers import build_config, exchange

PAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["amount", "currency", "memo"],
    "additionalProperties": False,
    "properties": {
        "amount": {"type": "integer", "minimum": 1},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "memo": {"type": "string"},
        "tags": {"type": "array"},
        "meta": {"type": "object"},
    },
}

PAY: dict[str, Any] = {
    "name": "pay",
    "effect": "write",
    "schema": PAY_SCHEMA,
    "rules": [
        {"name": "over_limit", "decision": "deny", "when": {"properties": {"amount": {"exclusiveMinimum": 1000}}}, "message": "payments above 1000 go through finance"},
        {"name": "leads_any_currency", "decision": "allow", "groups": ["leads"], "when": {}},
        {"name": "house_currency", "decision": "allow", "when": {"properties": {"currency": {"enum": ["EUR", "USD"]}}}},
        {"name": "scoped_gbp", "decision": "allow", "scopes": ["pay:gbp"], "when": {"properties": {"currency": {"const": "GBP"}}}},
    ],
}

CLERK = Principal(tenant="acme", subject="carl", groups=frozenset({"clerks"}), scopes=frozenset({"chat"}))
LEAD = Principal(tenant="acme", subject="lena", groups=frozenset({"leads"}), scopes=frozenset())
GBP = Principal(tenant="acme", subject="gus", groups=frozenset(), scopes=frozenset({"pay:gbp"}))


def judge_for(tools: list[dict[str, Any]], tmp_path: Path, **policy: Any) -> ToolJudge:
    cfg = build_config(tmp_path, policy, tools)
    return ToolJudge(ToolRegistry(cfg.plugin_sections["tools"]), cfg.plugin_sections["policy"], ModeState(False), None)


async def verdict(judge: ToolJudge, principal: Principal | None, name: str, arguments: str) -> Decision:
    ex = exchange(principal)
    return await judge.judge(ex, parse_call("c1", name, arguments, 0), ExchangeState())


def args(**kw: Any) -> str:
    base = {"amount": 10, "currency": "EUR", "memo": "m"}
    base.update(kw)
    return json.dumps(base)


@pytest.mark.parametrize(
    ("principal", "arguments", "kind", "rule"),
    [
        (CLERK, args(), "allow", "tools[0].rules.house_currency"),
        (CLERK, args(amount=1000), "allow", "tools[0].rules.house_currency"),
        (CLERK, args(amount=1001), "deny", "tools[0].rules.over_limit"),
        (LEAD, args(amount=5000, currency="GBP"), "deny", "tools[0].rules.over_limit"),
        (LEAD, args(currency="GBP"), "allow", "tools[0].rules.leads_any_currency"),
        (CLERK, args(currency="GBP"), "deny", "tools[0].rules_default"),
        (GBP, args(currency="GBP"), "allow", "tools[0].rules.scoped_gbp"),
        (None, args(currency="GBP"), "deny", "tools[0].rules_default"),
        (None, args(), "allow", "tools[0].rules.house_currency"),
    ],
)
async def test_rules_are_read_in_order_and_the_first_match_decides(
    tmp_path: Path, principal: Principal | None, arguments: str, kind: str, rule: str
) -> None:
    d = await verdict(judge_for([PAY], tmp_path), principal, "pay", arguments)
    assert (d.kind, d.rule) == (kind, rule)


async def test_a_denial_names_the_rule_and_tells_the_model_why(tmp_path: Path) -> None:
    judge = judge_for([PAY], tmp_path)
    d = await verdict(judge, CLERK, "pay", args(amount=2000))
    assert d.reason.startswith("payments above 1000 go through finance. It was NOT executed")
    d = await verdict(judge, CLERK, "pay", args(currency="GBP"))
    assert "no policy rule allows this call to 'pay'" in d.reason and "'house_currency'" in d.reason and "'over_limit'" not in d.reason


async def test_rules_run_after_the_schema_and_before_duplicates_limits_and_approval(tmp_path: Path) -> None:
    tool = copy.deepcopy(PAY) | {"approval": "required", "approval_if": {"properties": {"amount": {"minimum": 500}}}, "rate_limit": "2/hour"}
    judge = judge_for([tool], tmp_path)
    d = await verdict(judge, CLERK, "pay", '{"amount": "lots", "currency": "EUR", "memo": "m"}')
    assert (d.kind, d.rule) == ("repair", "tools[0].schema"), "a rule never sees arguments that break the schema"
    assert (await verdict(judge, CLERK, "pay", args(amount=5000))).rule == "tools[0].rules.over_limit"
    assert (await verdict(judge, CLERK, "pay", args(amount=5001))).rule == "tools[0].rules.over_limit", "a denied call does not charge the rate limit"
    d = await verdict(judge, CLERK, "pay", args(amount=600))
    assert (d.kind, d.rule) == ("deny", "tools[0].approval_if"), "allowed by a rule, the call still needs its approval (no store here: refused)"
    assert d.details is not None and d.details["argument_rule"] == "tools[0].rules.house_currency"
    assert (await verdict(judge, CLERK, "pay", args(amount=20))).kind == "allow"
    assert (await verdict(judge, CLERK, "pay", args(amount=21))).rule == "tools[0].rate_limit"


async def test_a_deny_list_needs_rules_default_allow(tmp_path: Path) -> None:
    tool = {**PAY, "rules": [PAY["rules"][0]], "rules_default": "allow"}
    judge = judge_for([tool], tmp_path)
    d = await verdict(judge, CLERK, "pay", args(currency="GBP"))
    assert (d.kind, d.rule) == ("allow", "tools[0].rules_default")
    assert (await verdict(judge, CLERK, "pay", args(amount=1001))).rule == "tools[0].rules.over_limit"


class _Failing:
    def is_valid(self, instance: Any) -> bool:
        raise ValueError("the validator broke")


class PanicException(BaseException):
    """Stands for the exception pyo3 raises when Rust code panics (it derives from BaseException)."""


class _Panicking:
    def is_valid(self, instance: Any) -> bool:
        raise PanicException("panicked at src/lib.rs")


@pytest.mark.parametrize(("broken", "error"), [(_Failing(), "ValueError"), (_Panicking(), "PanicException")])
async def test_a_rule_that_cannot_be_evaluated_denies(tmp_path: Path, broken: Any, error: str) -> None:
    judge = judge_for([PAY], tmp_path)
    rules = judge.registry.tools["pay"].rules
    assert rules is not None
    first = rules.rules[0]
    object.__setattr__(first, "validator", broken)
    d = await verdict(judge, CLERK, "pay", args())
    assert (d.kind, d.rule) == ("deny", "tools[0].rules.over_limit")
    assert "could not be evaluated" in d.reason and d.details == {"error": error}


def deep(depth: int) -> str:
    return '{"amount": 5, "currency": "EUR", "memo": "m", "meta": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


@pytest.mark.parametrize(
    ("arguments", "kind", "rule"),
    [
        (deep(20), "allow", "tools[0].rules.house_currency"),
        (deep(500), "repair", "tools.argument_depth"),
        ('{"amount": 5, "currency": "EUR", "memo": "m", "tags": ' + "[" * 30 + "]" * 30 + "}", "allow", "tools[0].rules.house_currency"),
        (args(memo="x" * 60000), "allow", "tools[0].rules.house_currency"),
        (args(memo="x" * 70000), "repair", "tools.argument_bytes"),
        (args(memo="\u202e\x00" + "é" * 1000), "allow", "tools[0].rules.house_currency"),
        (args(memo="\ud800"), "repair", "tool_call.json"),
        (args(amount="1001"), "repair", "tools[0].schema"),
        (args(amount=10**30), "repair", "tool_call.json"),
        (args(amount=1e300), "deny", "tools[0].rules.over_limit"),
        (args(amount=1.5), "repair", "tools[0].schema"),
        (args(amount=None, currency=["EUR"]), "repair", "tools[0].schema"),
        ('{"amount": 5, "currency": "EUR", "memo": "m", "memo": "n"}', "repair", "tool_call.json"),
        ("[1, 2]", "repair", "tool_call.json"),
        ('{"amount": NaN, "currency": "EUR", "memo": "m"}', "repair", "tool_call.json"),
        ("", "repair", "tool_call.json"),
        ('"' + "\\" * 10001, "repair", "tool_call.json"),
    ],
)
async def test_hostile_arguments_never_crash_the_rules(tmp_path: Path, arguments: str, kind: str, rule: str) -> None:
    d = await verdict(judge_for([PAY], tmp_path), CLERK, "pay", arguments)
    assert (d.kind, d.rule) == (kind, rule)


async def test_hostile_parsed_values_never_crash_the_rules(tmp_path: Path) -> None:
    judge = judge_for([{**PAY, "schema": {"type": "object"}}], tmp_path)
    for parsed in ({"amount": float("nan")}, {"amount": float("inf"), "currency": "EUR"}, {"amount": 10**5000, "currency": "EUR"}):
        call = ToolCall(id="c", name="pay", arguments="{}", parsed=parsed)
        d = await judge.judge(exchange(CLERK), call, ExchangeState())
        assert d.kind in ("deny", "repair"), parsed


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"rules": [{"name": "r", "decision": "deny", "when": {"type": 12}}]}, "tools[0].rules[0].when", "rule 'r': invalid JSON Schema"),
        ({"rules": [{"name": "r", "decision": "deny", "when": {"properties": {"a": {"pattern": "("}}}}]}, "tools[0].rules[0].when", "invalid JSON Schema"),
        ({"rules": [{"name": "r", "decision": "deny", "when": {"$ref": "https://evil.test/s.json"}}]}, "tools[0].rules[0].when", "remote $ref"),
        ({"rules": [{"name": "r", "decision": "deny", "when": "amount > 5"}]}, "tools[0].rules[0].when", "expected a table"),
        ({"rules": [{"name": "r", "decision": "maybe", "when": {}}]}, "tools[0].rules[0].decision", "must be one of"),
        ({"rules": [{"name": "bad name", "decision": "deny", "when": {}}]}, "tools[0].rules[0].name", "not a valid rule name"),
        ({"rules": [{"decision": "deny", "when": {}}]}, "tools[0].rules[0].name", "is missing"),
        ({"rules": [{"name": "r", "decision": "deny"}]}, "tools[0].rules[0].when", "is missing"),
        ({"rules": [{"name": "r", "decision": "deny", "when": {}, "colour": 1}]}, "tools[0].rules[0].colour", "unknown key"),
        ({"rules": [{"name": "r", "decision": "allow", "when": {}, "groups": [""]}]}, "tools[0].rules[0].groups", "empty"),
        ({"rules": [{"name": "r", "decision": "deny", "when": {}, "message": "x" * 501}]}, "tools[0].rules[0].message", "at most 500"),
        (
            {"rules": [{"name": "r", "decision": "deny", "when": {}}, {"name": "r", "decision": "allow", "when": {}}]},
            "tools[0].rules[1].name",
            "already declared at rules[0]",
        ),
        ({"rules": [{"name": "r", "decision": "deny", "when": {}}]}, "tools[0].rules_default", "no call could ever pass"),
        ({"rules": [{"name": "r", "decision": "allow", "when": {}}], "rules_default": "allow"}, "tools[0].rules_default", "decide nothing"),
        ({"rules": [], "rules_default": "deny"}, "tools[0].rules_default", "needs [[tools.rules]]"),
        ({"rules_default": "sometimes", "rules": PAY["rules"]}, "tools[0].rules_default", "does not fit"),
    ],
)
def test_invalid_rules_fail_at_load_naming_the_key(tmp_path: Path, changes: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, tools=[{**PAY, **changes}])
    assert err.value.key == key
    assert fragment in str(err.value)


async def test_rules_built_in_code_compile_like_loaded_ones() -> None:
    rule = ArgumentRule(name="small", decision="allow", when={"properties": {"amount": {"maximum": 10}}})
    spec = ToolSpec(name="pay", effect="write", schema=PAY_SCHEMA, rules=[rule])
    judge = ToolJudge(ToolRegistry([spec]), PolicyConfig(read_only=False), ModeState(False), None)
    assert (await verdict(judge, CLERK, "pay", args(amount=10))).rule == "tools[0].rules.small"
    assert (await verdict(judge, CLERK, "pay", args(amount=11))).rule == "tools[0].rules_default"
    with pytest.raises(ConfigError) as err:
        ToolRegistry([ToolSpec(name="pay", effect="write", schema=PAY_SCHEMA, rules=[ArgumentRule(name="r", decision="allow", when={"type": 1})])])
    assert err.value.key == "tools[0].rules[0].when"
