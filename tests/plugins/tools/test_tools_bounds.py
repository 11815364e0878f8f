"""Hostile tool-call arguments at the judge: too deep, too long, not objects, odd numbers.

Every case ends in a decision the corrective turn can explain to the model,
never in an exception (which the server would turn into a 500, or a stream
ending with ``internal_error``).  Calls are built with ``proxy.tooling.parse_call``,
as the core builds them from a provider's answer.
"""

from __future__ import annotations

import asyncio
import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.judge import ExchangeState, ToolJudge
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.plugins.tools.request import scan_history
from llm_warden.plugins.tools.schemas import validator_failure as _validator_failure
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, ToolCall
from llm_warden.proxy.tooling import parse_call
from tests.plugins.tools.helpers import OUTSIDER, TOOLS, build_config, exchange

APPROVE_BIG: dict[str, Any] = {
    "name": "grant",
    "effect": "read",
    "approval": "required",
    "approval_if": {"properties": {"n": {"minimum": 5}}},
    "schema": {"type": "object"},
}


def make_judge(tools: list[dict[str, Any]] | None = None, **policy: Any) -> ToolJudge:
    pol = PolicyConfig(read_only=False, **policy)
    pol.validate("policy")
    specs = [ToolSpec(**copy.deepcopy(t)) for t in (TOOLS + [APPROVE_BIG] if tools is None else tools)]
    return ToolJudge(ToolRegistry(specs), pol, ModeState(False), None)


async def verdict(judge: ToolJudge, name: str, arguments: str, parsed: Any = None) -> Decision:
    call = parse_call("call_1", name, arguments, 0)
    if parsed is not None:
        call.parsed = parsed
    return await judge.judge(exchange(), call, ExchangeState())


def nested(depth: int, inner: str = "1", key: str | None = None) -> str:
    """``depth`` levels of arrays (or of ``{key: ...}`` objects) around ``inner``."""
    if key is None:
        return "[" * depth + inner + "]" * depth
    return f'{{"{key}":' * depth + inner + "}" * depth


@pytest.mark.parametrize("depth", [33, 500, 1000, 1023, 1024, 4000])
@pytest.mark.parametrize(("tool", "field"), [("note", "text"), ("wire", "x"), ("lookup", "invoice_id")])
async def test_deep_arguments_are_a_repair_naming_the_limit(tool: str, field: str, depth: int) -> None:
    judge = make_judge()
    for args in (f'{{"{field}": {nested(depth - 1)}}}', nested(depth, key=field)):
        d = await verdict(judge, tool, args)
        assert (d.kind, d.rule) == ("repair", "tools.argument_depth"), (depth, d)
        assert f"nested {depth} levels deep and at most 32 levels" in d.reason
        assert f"Call '{tool}' again with flatter arguments" in d.reason
        assert d.details == {"limit": 32, "found": depth}


async def test_depth_at_the_limit_reaches_the_schema() -> None:
    judge = make_judge()
    at_limit = f'{{"text": {nested(31)}}}'
    d = await verdict(judge, "note", at_limit)
    assert (d.kind, d.rule) == ("repair", "tools[2].schema"), d
    assert "/text" in d.reason
    d = await verdict(judge, "wire", f'{{"x": {nested(31)}}}')
    assert d.kind == "deny" and d.rule == "tools[4].approval", d  # no approval store in this judge: refused, not raised


async def test_brackets_inside_strings_do_not_count() -> None:
    judge = make_judge()
    text = orjson.dumps({"text": "[" * 5000 + '{"\\' + "}" * 100}).decode()
    assert (await verdict(judge, "note", text)).kind == "allow"


async def test_configured_depth_applies() -> None:
    judge = make_judge(max_argument_depth=2)
    assert (await verdict(judge, "wire", '{"a": [1]}')).kind == "deny"  # past the bound: approval (no store)
    d = await verdict(judge, "wire", '{"a": [[1]]}')
    assert (d.rule, d.details) == ("tools.argument_depth", {"limit": 2, "found": 3})


async def test_long_arguments_are_a_repair_naming_the_limit() -> None:
    judge = make_judge()
    pad = 65536 - len('{"text": ""}')
    assert (await verdict(judge, "note", f'{{"text": "{"x" * pad}"}}')).kind == "allow"
    d = await verdict(judge, "note", f'{{"text": "{"x" * (pad + 1)}"}}')
    assert (d.kind, d.rule) == ("repair", "tools.argument_bytes")
    assert "at least 65537 bytes long and at most 65536 are accepted" in d.reason
    assert "shorter arguments" in d.reason
    # Bytes, not characters: 3-byte characters reach the limit at a third of the length.
    euros = (pad // 3) + 1
    d = await verdict(judge, "note", f'{{"text": "{"€" * euros}"}}')
    assert d.rule == "tools.argument_bytes" and d.details == {"limit": 65536, "found": len('{"text": ""}') + 3 * euros}


async def test_huge_arguments_refused_before_any_parse_of_the_judge() -> None:
    judge = make_judge()
    text = '{"text": "' + "x" * (8 << 20) + '"}'
    call = ToolCall(id="c", name="note", arguments=text)  # not parsed: the judge would parse it
    loop = asyncio.get_running_loop()
    started = loop.time()
    d = await judge.judge(exchange(), call, ExchangeState())
    assert d.rule == "tools.argument_bytes"
    assert loop.time() - started < 0.05, "the size check must not parse or encode megabytes"


async def test_lone_surrogates_are_counted_not_raised() -> None:
    judge = make_judge(max_argument_bytes=16)
    d = await verdict(judge, "note", '{"text": "\ud800\ud800"}')
    assert d.rule == "tools.argument_bytes" and d.details == {"limit": 16, "found": 18}


async def test_configured_size_applies() -> None:
    judge = make_judge(max_argument_bytes=32)
    assert (await verdict(judge, "lookup", '{"invoice_id": "inv_12345678"}')).kind == "allow"
    d = await verdict(judge, "lookup", '{"invoice_id": "inv_123456789012345"}')
    assert d.details == {"limit": 32, "found": 37}


async def test_bounds_come_after_permission_and_read_only() -> None:
    """A refused call is refused (final), not sent back for a repair that could not help."""
    judge = make_judge()
    deep = nested(100, key="invoice_id")
    d = await judge.judge(exchange(OUTSIDER), parse_call("c", "refund", deep, 0), ExchangeState())
    assert d.rule == "tools[1].allow_groups"
    d = await verdict(judge, "nope", deep)
    assert d.rule == "policy.unknown_tools"
    judge.mode.config_default = True
    assert (await verdict(judge, "note", deep)).rule == "policy.read_only"


async def test_undeclared_tools_are_bounded_too() -> None:
    judge = make_judge(unknown_tools="allow")
    assert (await verdict(judge, "anything", nested(600, key="a"))).rule == "tools.argument_depth"
    assert (await verdict(judge, "anything", nested(6, key="a"))).kind == "allow"


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "null", "3", "true", "[]", '[{"text": "x"}]'])
async def test_valid_json_that_is_not_an_object(text: str) -> None:
    d = await verdict(make_judge(), "note", text)
    assert (d.kind, d.rule) == ("repair", "tool_call.json")
    assert "must be a JSON object" in d.reason and "call 'note' again with a single JSON object" in d.reason


async def test_parsed_value_that_is_not_an_object_is_not_trusted() -> None:
    """A core that hands over a list as ``parsed`` still gets the object check."""
    call = ToolCall(id="c", name="note", arguments='[{"text": "x"}]', parsed=[{"text": "x"}])  # type: ignore[arg-type]
    d = await make_judge().judge(exchange(), call, ExchangeState())
    assert (d.kind, d.rule) == ("repair", "tool_call.json")


@pytest.mark.parametrize(
    ("text", "rule", "fragment"),
    [
        ('{"text": NaN}', "tool_call.json", "not a valid JSON object"),
        ('{"text": Infinity}', "tool_call.json", "not a valid JSON object"),
        ('{"x": 1e400}', "tool_call.json", "infinity"),
        ('{"x": -1' + "0" * 400 + "}", "tool_call.json", "infinity"),
        # Beyond 64 bits orjson (what Warden judges) and the application's json would read different numbers.
        ('{"invoice_id": 123456789012345678901234567890}', "tool_call.json", "integer beyond 64 bits"),
        ('{"invoice_id": 1e-400}', "tools[0].schema", "is not of type"),
    ],
)
async def test_odd_numbers_in_the_text(text: str, rule: str, fragment: str) -> None:
    name = "wire" if text.startswith('{"x"') else "lookup" if "invoice_id" in text else "note"
    d = await verdict(make_judge(), name, text)
    assert (d.kind, d.rule) == ("repair", rule), d
    assert fragment in d.reason


async def test_big_numbers_that_parse_are_judged_normally() -> None:
    judge = make_judge()
    assert (await verdict(judge, "note", '{"text": "a"}')).kind == "allow"
    d = await verdict(judge, "grant", '{"n": 18446744073709551615}')  # the largest integer both parsers read alike
    assert (d.kind, d.rule) == ("deny", "tools[5].approval_if")  # approval needed (no store here)
    d = await verdict(judge, "grant", '{"n": 123456789012345678901234567890}')
    assert (d.kind, d.rule) == ("repair", "tool_call.json")
    assert (await verdict(judge, "grant", '{"n": 1.7976931348623157e308, "m": -5e-324}')).rule == "tools[5].approval_if"
    assert (await verdict(judge, "grant", '{"n": 1}')).kind == "allow"


@pytest.mark.parametrize(
    ("tool", "value", "rule", "fragment"),
    [
        ("note", 10**5000, "tools[2].schema", 'null is not of type "string"'),  # jsonschema-rs reads it as null
        ("lookup", 10**5000, "tools[0].schema", 'null is not of type "string"'),
        ("wire", 10**5000, "tool_call.json", "are not plain JSON (Exceeds the limit (4300 digits) for integer string conversion)"),
        ("wire", math.nan, "tool_call.json", "are not plain JSON (NaN and infinite numbers are not JSON)"),  # the schema accepts it
        ("wire", math.inf, "tool_call.json", "are not plain JSON (NaN and infinite numbers are not JSON)"),
        ("wire", -math.inf, "tool_call.json", "are not plain JSON (NaN and infinite numbers are not JSON)"),
        ("wire", orjson.loads(nested(200)), "tool_call.json", "are not plain JSON (nested deeper than 128 levels)"),
        ("wire", 10**400, "tools[4].approval", "needs a human approval"),  # beyond 64 bits but writable: judged normally
    ],
    ids=["note-5000-digits", "lookup-5000-digits", "wire-5000-digits", "wire-nan", "wire-inf", "wire-minus-inf", "wire-200-deep", "wire-401-digits"],
)
async def test_values_from_a_lenient_parser(tool: str, value: Any, rule: str, fragment: str) -> None:
    """Values orjson never produces (a different parser upstream of the judge) still end in a decision."""
    key = {"note": "text", "lookup": "invoice_id"}.get(tool, "x")
    d = await verdict(make_judge(), tool, f'{{"{key}": 0}}', parsed={key: value})
    assert d.rule == rule and fragment in d.reason, d
    assert d.kind == ("deny" if rule.endswith("approval") else "repair")  # wire needs approval (no store here)
    if rule == "tool_call.json":
        assert f"Call '{tool}' again with plain JSON arguments that follow its schema" in d.reason
        assert d.details == {"error": "NotCanonical"}


async def test_nan_against_a_typed_schema_is_a_schema_error() -> None:
    d = await verdict(make_judge(), "note", '{"text": 0}', parsed={"text": math.nan})
    assert (d.kind, d.rule) == ("repair", "tools[2].schema") and "null is not of type" in d.reason


class _Panicking:
    """Stands in for a compiled validator that panics inside Rust (pyo3 raises ``PanicException``, a ``BaseException``)."""

    def __init__(self) -> None:
        self.panic = type("PanicException", (BaseException,), {})

    def iter_errors(self, instance: Any) -> Any:
        raise self.panic("called `Option::unwrap()` on a `None` value")

    def is_valid(self, instance: Any) -> bool:
        raise self.panic("called `Option::unwrap()` on a `None` value")


async def test_a_panicking_schema_validator_is_a_repair() -> None:
    judge = make_judge()
    tool = judge.registry.tools["note"]
    judge.registry.tools["note"] = replace(tool, validator=_Panicking())
    d = await verdict(judge, "note", '{"text": "x"}')
    assert (d.kind, d.rule) == ("repair", "tools[2].schema")
    assert "could not be checked (PanicException)" in d.reason


async def test_a_failing_approval_if_requires_approval() -> None:
    """Whether approval_if matches is unknown: the call waits for a human (here: refused, no store)."""
    judge = make_judge()
    tool = judge.registry.tools["grant"]
    judge.registry.tools["grant"] = replace(tool, approval_validator=_Panicking())
    d = await verdict(judge, "grant", '{"n": 1}')
    assert (d.kind, d.rule) == ("deny", "tools[5].approval_if")
    assert "needs a human approval" in d.reason


def test_only_check_failures_become_decisions() -> None:
    assert _validator_failure(ValueError("x"))
    assert _validator_failure(RecursionError())
    assert _validator_failure(type("PanicException", (BaseException,), {})())
    assert not _validator_failure(asyncio.CancelledError())
    assert not _validator_failure(KeyboardInterrupt())
    assert not _validator_failure(SystemExit(1))


def test_history_with_deep_or_odd_arguments_is_scanned_not_fatal() -> None:
    """The request side reads the same kind of arguments from the application's history."""
    deep = nested(1000, key="a")
    msgs: list[Any] = [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "note", "arguments": deep}}]},
        {"role": "tool", "tool_call_id": "c1", "content": orjson.loads(nested(300, inner="[]"))},
        {"role": "assistant", "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "note", "arguments": '{"text": "x"}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "done"},
    ]
    hist = scan_history(msgs, lambda name: True, 1000)
    assert [v["call_id"] for v in hist.executed.values()] == ["c2"], "only the representable call is linked for duplicates"
    assert [r["content"] for r in hist.results] == ["done"]
    msgs = msgs[:2]
    hist = scan_history(msgs, lambda name: True, 1000)
    assert hist.results[0]["content"] == "(content nested too deeply to record)"
    assert hist.results[0]["linked"] is True
    # The audit record reads a result's tool by ``name`` (as Exchange.tool_results documents).
    assert hist.results[0]["name"] == "note"


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"max_argument_depth": 0}, "policy.max_argument_depth"),
        ({"max_argument_depth": 129}, "policy.max_argument_depth"),
        ({"max_argument_bytes": 15}, "policy.max_argument_bytes"),
        ({"max_argument_bytes": 16 * 1024 * 1024 + 1}, "policy.max_argument_bytes"),
        ({"max_argument_depth": "32"}, "policy.max_argument_depth"),
        ({"max_argument_bytes": 1.5}, "policy.max_argument_bytes"),
    ],
)
def test_bounds_config_is_validated(tmp_path: Path, policy: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path, policy)
    assert err.value.key == key


def test_bounds_config_loads(tmp_path: Path) -> None:
    cfg = build_config(tmp_path, {"max_argument_depth": 128, "max_argument_bytes": 16})
    section = cfg.plugin_sections["policy"]
    assert (section.max_argument_depth, section.max_argument_bytes) == (128, 16)
    defaults = build_config(tmp_path).plugin_sections["policy"]
    assert (defaults.max_argument_depth, defaults.max_argument_bytes) == (32, 65536)
