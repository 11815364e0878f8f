"""Properties of the argument bounds (plugins/tools/bounds.py) and of the judge on hostile arguments.

- the depth scan agrees with a character-by-character reference on any text,
  and with the real nesting of any JSON value however it is written;
- sizes are UTF-8 bytes, lone surrogates included;
- nesting of any depth (far past every parser's limit) is measured exactly;
- the judge turns any argument text into a decision, never an exception, and
  allows nothing out of bounds.

The suite runs a few hundred examples per property.  For a longer run set
``WARDEN_PROPERTY_EXAMPLES``, e.g.::

    WARDEN_PROPERTY_EXAMPLES=20000 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/plugins/tools/test_tools_bounds_property.py
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Coroutine
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_warden.plugins.tools.bounds import MAX_DEPTH_LIMIT, bounds_failure, nesting_depth, utf8_size
from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.judge import ExchangeState, ToolJudge
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.proxy.exchange import Decision, Exchange, Principal
from llm_warden.proxy.tooling import parse_call
from tests.plugins.tools.helpers import TOOLS


def examples(default: int) -> int:
    """``default`` in the suite; ``WARDEN_PROPERTY_EXAMPLES`` for longer runs."""
    return int(os.environ.get("WARDEN_PROPERTY_EXAMPLES", default))


def reference_depth(text: str) -> int:
    """The deepest bracket nesting outside strings, one character at a time (the oracle)."""
    depth = best = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def value_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((value_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((value_depth(v) for v in value), default=0)
    return 0


# Strings full of what could confuse a scanner: brackets, quotes, backslashes, multi-byte and lone surrogates.
tricky_chars = st.sampled_from(list('[]{}"\\/,:u') + ["é", "€", "𝄞", "\x00", "\n", "\ud800", "\udfff"]) | st.characters()
tricky_text = st.text(tricky_chars, max_size=30)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | tricky_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4), max_leaves=25)


def write(value: Any, style: int) -> str:
    """The same value in several textual forms (compact, spaced, indented, ASCII-escaped)."""
    if style == 0:
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            return json.dumps(value)  # orjson refuses lone surrogates; the stdlib escapes them
    if style == 1:
        return json.dumps(value, ensure_ascii=True)
    if style == 2:
        return json.dumps(value, ensure_ascii=False, indent=2)
    return json.dumps(value, ensure_ascii=False, separators=(" , ", " : "))


@settings(max_examples=examples(300), deadline=None)
@given(value=json_values, style=st.integers(0, 3))
def test_depth_of_any_json_value_however_written(value: Any, style: int) -> None:
    text = write(value, style)
    assert nesting_depth(text) == value_depth(value) == reference_depth(text)


@settings(max_examples=examples(400), deadline=None)
@given(text=st.text(tricky_chars, max_size=300))
def test_depth_of_any_text_matches_the_reference(text: str) -> None:
    assert nesting_depth(text) == reference_depth(text)


@settings(max_examples=examples(300), deadline=None)
@given(text=st.text(tricky_chars, max_size=300), limit=st.integers(0, 2000))
def test_size_is_utf8_bytes_or_a_lower_bound_past_the_limit(text: str, limit: int) -> None:
    exact = len(text.encode("utf-8", "surrogatepass"))
    size = utf8_size(text, limit)
    assert (size > limit) == (exact > limit)
    # Past the limit by characters alone, the character count is reported (no copy made).
    assert size == (exact if len(text) <= limit else len(text))


@settings(max_examples=examples(150), deadline=None)
@given(
    depth=st.integers(0, 5000),
    pattern=st.lists(st.sampled_from(["[", '{"k":', '{"a": 1, "b":', "[0, ", '[" ]", ', '{"{": "}", "[":']), min_size=1, max_size=6),
    padding=st.sampled_from(["", " ", "\n\t"]),
)
def test_deep_nesting_measured_exactly(depth: int, pattern: list[str], padding: str) -> None:
    """Any depth, far past orjson's 1024 and Python's recursion limit, costs one linear scan."""
    closing = {"[": "]", '{"k":': "}", '{"a": 1, "b":': "}", "[0, ": "]", '[" ]", ': "]", '{"{": "}", "[":': "}"}
    wrappers = [pattern[i % len(pattern)] for i in range(depth)]
    text = padding.join(wrappers) + "1" + padding.join(closing[w] for w in reversed(wrappers))
    assert nesting_depth(text) == depth
    failure = bounds_failure(text, 32, 1 << 20)
    if depth > 32:
        assert failure is not None and (failure.rule, failure.actual) == ("tools.argument_depth", depth)
    else:
        assert failure is None


@settings(max_examples=examples(40), deadline=None)
@given(
    chunk=st.text(tricky_chars, min_size=1, max_size=8),
    repeat=st.integers(1, 60_000),
    limit=st.integers(16, 200_000),
)
def test_huge_strings(chunk: str, repeat: int, limit: int) -> None:
    """A string value of up to ~2 MB of brackets and quotes: depth 1, size exact."""
    text = json.dumps({"s": chunk * repeat}, ensure_ascii=False)
    assert nesting_depth(text) == 1
    failure = bounds_failure(text, 1, limit)
    if len(text.encode("utf-8", "surrogatepass")) > limit:
        assert failure is not None and failure.rule == "tools.argument_bytes"
    else:
        assert failure is None


# -- the judge ------------------------------------------------------------------

WHO = Principal(tenant="acme", subject="alice", groups=frozenset({"billing"}))
SPECS = [ToolSpec(**copy.deepcopy(t)) for t in TOOLS]


def judge_with(max_depth: int, max_bytes: int) -> ToolJudge:
    pol = PolicyConfig(read_only=False, unknown_tools="allow", max_argument_depth=max_depth, max_argument_bytes=max_bytes)
    pol.validate("policy")
    return ToolJudge(ToolRegistry(SPECS), pol, ModeState(False), None)


def run(coro: Coroutine[Any, Any, Decision]) -> Decision:
    """Drive a judgement that needs no I/O (no approval store here) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the judge suspended; these calls need no I/O")


hostile_text = st.one_of(
    st.text(tricky_chars, max_size=200),
    st.builds(write, json_values, st.integers(0, 3)),
    st.builds(lambda n, inner: "[" * n + inner + "]" * n, st.integers(0, 3000), st.sampled_from(["", "1", "{}", '"x"', "NaN"])),
    st.builds(lambda n, key: f'{{"{key}":' * n + "1" + "}" * n, st.integers(0, 2000), st.sampled_from(["text", "x", "invoice_id"])),
    st.builds(lambda n: '{"text": "' + "x" * n + '"}', st.integers(0, 100_000)),
    st.builds(lambda digits: '{"x": 1' + "0" * digits + "}", st.integers(0, 5000)),
)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    text=hostile_text,
    tool=st.sampled_from(["note", "lookup", "wire", "audit_export", "undeclared"]),
    max_depth=st.integers(1, MAX_DEPTH_LIMIT),
    max_bytes=st.integers(16, 70_000),
)
def test_the_judge_decides_every_argument_text(text: str, tool: str, max_depth: int, max_bytes: int) -> None:
    judge = judge_with(max_depth, max_bytes)
    ex = Exchange(request_id="req_bounds", route="chat", method="POST", path="/v1/chat/completions", principal=WHO)
    d = run(judge.judge(ex, parse_call("call_1", tool, text, 0), ExchangeState()))
    assert d.kind in ("allow", "deny", "repair", "hold")
    assert d.rule and (d.kind == "allow" or d.reason)
    # nesting_depth is the reference's equal (see above) and linear: texts here reach 100 kB.
    in_bounds = len(text.encode("utf-8", "surrogatepass")) <= max_bytes and nesting_depth(text) <= max_depth
    if not in_bounds:
        assert d.kind != "allow"
        if tool != "audit_export":  # refused for its scopes before the bounds are checked
            assert d.rule in ("tools.argument_bytes", "tools.argument_depth"), d
