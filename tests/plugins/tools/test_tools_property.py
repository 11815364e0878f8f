"""Property: no call whose arguments violate the registry schema is ever allowed,
and no call that satisfies it is ever sent back for repair."""

from __future__ import annotations

import math
from collections.abc import Coroutine
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_warden.plugins.tools import PolicyConfig, ToolSpec, ToolsPlugin
from llm_warden.proxy.exchange import Decision, Exchange, Principal, ToolCall

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["account", "amount", "currency"],
    "additionalProperties": False,
    "properties": {
        "account": {"type": "string", "minLength": 3, "maxLength": 12, "pattern": "^[a-z0-9]+$"},
        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
        "currency": {"enum": ["EUR", "USD"]},
        "memo": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3, "uniqueItems": True},
        "count": {"type": "integer", "minimum": 1},
    },
}


def conforms(v: Any) -> bool:
    """An independent, hand-written reading of SCHEMA (the oracle)."""
    import re

    def is_num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(v, dict) or not {"account", "amount", "currency"} <= v.keys():
        return False
    if not v.keys() <= {"account", "amount", "currency", "memo", "tags", "count"}:
        return False
    a = v["account"]
    if not (isinstance(a, str) and 3 <= len(a) <= 12 and re.fullmatch(r"[a-z0-9]+", a)):
        return False
    if not (is_num(v["amount"]) and 0 < v["amount"] <= 10000):
        return False
    if v["currency"] not in ("EUR", "USD") or isinstance(v["currency"], bool):
        return False
    if "memo" in v and not (isinstance(v["memo"], str) and len(v["memo"]) <= 20):
        return False
    if "tags" in v:
        t = v["tags"]
        if not (isinstance(t, list) and len(t) <= 3 and all(isinstance(x, str) for x in t) and len(set(t)) == len(t)):
            return False
    if "count" in v:
        c = v["count"]
        if not (is_num(c) and float(c).is_integer() and c >= 1):
            return False
    return True


def plugin() -> ToolsPlugin:
    spec = ToolSpec(name="transfer", effect="write", schema=SCHEMA)
    spec.validate("tools[0]")
    p = ToolsPlugin(PolicyConfig(read_only=False), [spec])
    return p


PLUGIN = plugin()
WHO = Principal(tenant="acme", subject="alice")


def run(coro: Coroutine[Any, Any, Decision]) -> Decision:
    """Drive a coroutine that never suspends (no approval, no I/O) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the judge suspended; this tool should need no I/O")


json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=15)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

near_valid = st.fixed_dictionaries(
    {
        "account": st.one_of(st.from_regex(r"^[a-z0-9]{1,14}$", fullmatch=True), json_scalars),
        "amount": st.one_of(st.floats(-5, 10005, allow_nan=False), st.integers(-5, 10005), json_scalars),
        "currency": st.sampled_from(["EUR", "USD", "eur", "GBP", True, None]),
    },
    optional={
        "memo": st.one_of(st.text(max_size=25), json_scalars),
        "tags": st.lists(st.sampled_from(["a", "b", "c", "d", 1]), max_size=5),
        "count": st.one_of(st.integers(-2, 5), st.floats(-2, 5, allow_nan=False), json_scalars),
        "extra": json_scalars,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.one_of(near_valid, json_values))
def test_schema_violations_never_allowed(args: Any) -> None:
    ex = Exchange(request_id="req_prop", route="chat", method="POST", path="/v1/chat/completions", principal=WHO)
    text = orjson.dumps(args).decode()
    d = run(PLUGIN.on_tool_call(ex, ToolCall(id="c", name="transfer", arguments=text)))
    if conforms(args):
        assert d.kind == "allow", (args, d)
    else:
        assert d.kind == "repair", (args, d)


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=40))
def test_arbitrary_argument_text_never_allowed_unless_valid(raw: str) -> None:
    ex = Exchange(request_id="req_prop2", route="chat", method="POST", path="/v1/chat/completions", principal=WHO)
    d = run(PLUGIN.on_tool_call(ex, ToolCall(id="c", name="transfer", arguments=raw)))
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert d.kind == "repair"
        return
    assert (d.kind == "allow") == conforms(parsed)
