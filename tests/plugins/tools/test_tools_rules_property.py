"""Property: argument rules decide exactly as an independent reading of them says (first match wins,
default deny), and no argument value, however odd, makes the judge raise."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_warden.plugins.tools import PolicyConfig, ToolsPlugin
from llm_warden.plugins.tools.config import ToolSpec
from llm_warden.plugins.tools.rules import ArgumentRule
from llm_warden.proxy.exchange import Exchange, Principal, ToolCall
from tests.plugins.tools.test_tools_property import json_scalars, json_values, run

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["amount", "currency"],
    "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}, "reason": {"type": "string"}},
}
RULES = [
    ArgumentRule(name="over_limit", decision="deny", when={"properties": {"amount": {"exclusiveMinimum": 1000}}}),
    ArgumentRule(name="fraud_team", decision="allow", groups=["fraud"], when={"required": ["reason"], "properties": {"reason": {"const": "fraud"}}}),
    ArgumentRule(name="fraud_others", decision="deny", when={"required": ["reason"], "properties": {"reason": {"const": "fraud"}}}),
    ArgumentRule(name="house", decision="allow", when={"properties": {"currency": {"enum": ["EUR", "USD"]}}}),
]


def plugin() -> ToolsPlugin:
    return ToolsPlugin(PolicyConfig(read_only=False), [ToolSpec(name="pay", effect="write", schema=SCHEMA, rules=RULES)])


PLUGIN = plugin()
PEOPLE = [Principal(tenant="acme", subject="a"), Principal(tenant="acme", subject="f", groups=frozenset({"fraud"}))]


def oracle(args: dict[str, Any], fraud_team: bool) -> str:
    """The rules read by hand, in order."""
    amount = args["amount"]
    if amount > 1000:
        return "over_limit"
    if args.get("reason") == "fraud":
        return "fraud_team" if fraud_team else "fraud_others"
    if args["currency"] in ("EUR", "USD"):
        return "house"
    return "rules_default"


valid_args = st.fixed_dictionaries(
    {
        "amount": st.one_of(st.integers(-10, 2000), st.floats(-10, 2000, allow_nan=False), st.sampled_from([1000, 1000.0, 1000.0001, 1e300, -1e300])),
        "currency": st.one_of(st.sampled_from(["EUR", "USD", "GBP", "eur", ""]), st.text(max_size=5)),
    },
    optional={"reason": st.one_of(st.sampled_from(["fraud", "Fraud", "other"]), st.text(max_size=5)), "extra": json_values},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=valid_args, who=st.sampled_from(PEOPLE))
def test_the_first_matching_rule_decides(args: dict[str, Any], who: Principal) -> None:
    ex = Exchange(request_id="req_rules", route="chat", method="POST", path="/v1/chat/completions", principal=who)
    d = run(PLUGIN.on_tool_call(ex, ToolCall(id="c", name="pay", arguments=orjson.dumps(args).decode())))
    expected = oracle(args, "fraud" in who.groups)
    rule = "tools[0].rules_default" if expected == "rules_default" else f"tools[0].rules.{expected}"
    assert d.rule == rule, (args, d)
    assert d.kind == ("allow" if expected in ("fraud_team", "house") else "deny"), (args, d)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.one_of(json_values, st.dictionaries(st.sampled_from(["amount", "currency", "reason", "x"]), json_values, max_size=4)))
def test_no_argument_value_makes_the_judge_raise(args: Any) -> None:
    ex = Exchange(request_id="req_rules2", route="chat", method="POST", path="/v1/chat/completions", principal=PEOPLE[0])
    parsed = args if isinstance(args, dict) else None
    d = run(PLUGIN.on_tool_call(ex, ToolCall(id="c", name="pay", arguments=orjson.dumps(args).decode(), parsed=parsed)))
    assert d.kind in ("allow", "deny", "repair")
    if d.kind == "allow":
        assert isinstance(args, dict) and isinstance(args.get("currency"), str) and args["currency"] in ("EUR", "USD")
        amount = args["amount"]
        assert isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount) and amount <= 1000


@settings(max_examples=100, deadline=None)
@given(value=json_scalars)
def test_scalars_are_repaired_not_judged(value: Any) -> None:
    ex = Exchange(request_id="req_rules3", route="chat", method="POST", path="/v1/chat/completions", principal=PEOPLE[0])
    d = run(PLUGIN.on_tool_call(ex, ToolCall(id="c", name="pay", arguments=orjson.dumps(value).decode())))
    assert (d.kind, d.rule) == ("repair", "tool_call.json")
