"""Property-based fuzzing of the wire-format checks (:mod:`proxy.wire`).

Properties:

- any JSON value (integers of any size included): ``check_completion`` and
  ``check_chunk`` return ``None`` or a short string, never raise;
- answers and chunks built to the format (any number of choices, tool calls,
  content parts, legacy calls, finish reasons including the tolerated vendor
  values, usage with extra entries) are accepted;
- such an answer with any one node replaced by any JSON value: never raises;
- a tool call's ``id``, ``function.name`` or ``function.arguments`` replaced by
  a non-string (or ``type`` by anything but ``"function"``) is always refused,
  with a reason naming that field.

The in-suite run is short (300 examples per property, a few seconds).  To
fuzz longer set ``WARDEN_FUZZ_EXAMPLES``; fix a seed with ``WARDEN_FUZZ_SEED``::

    WARDEN_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q -p no:cacheprovider -o timeout=0 tests/proxy/test_wire_fuzz.py

A failing example is printed by Hypothesis; add it to ``tests/proxy/test_wire.py``
as a regression test.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from llm_warden.proxy.wire import FINISH_REASONS, VENDOR_FINISH_REASONS, check_chunk, check_completion

EXAMPLES = int(os.environ.get("WARDEN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_SEED = os.environ.get("WARDEN_FUZZ_SEED")


def _seeded(f: Any) -> Any:
    return seed(int(_SEED))(f) if _SEED else f


leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
json_values = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
keys = st.sampled_from(["choices", "error", "usage", "model", "object", "index", "message", "delta", "tool_calls", "function", "finish_reason", "content", "id"])
# JSON values that use the format's own key names, so the checks go deep.
shaped_values = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.one_of(keys, st.text(max_size=4)), c, max_size=4)), max_leaves=16)


def _check(fn: Any, value: Any) -> None:
    reason = fn(value)
    assert reason is None or (isinstance(reason, str) and 0 < len(reason) < 160)


@_seeded
@SETTINGS
@given(st.one_of(json_values, shaped_values))
def test_any_json_value_gives_none_or_a_reason(value: Any) -> None:
    _check(check_completion, value)
    _check(check_chunk, value)


extra = st.dictionaries(st.sampled_from(["x_vendor", "logprobs", "annotations", "stop_reason", "reasoning_content"]), json_values, max_size=2)
text = st.text(max_size=12)
finish = st.sampled_from(sorted(FINISH_REASONS | VENDOR_FINISH_REASONS) + [None])
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda k, v: {"type": k, k: v}, st.sampled_from(["thinking", "refusal", "image_url"]), json_values),
)
content = st.one_of(st.none(), text, st.lists(part, max_size=3))
function = st.fixed_dictionaries({"name": text, "arguments": text})
tool_call = st.builds(lambda i, f, x: {**x, "id": i, "type": "function", "function": f}, text, function, extra)
message = st.builds(
    lambda m, x: {**x, **m},
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.just("assistant"),
            "content": content,
            "refusal": st.one_of(st.none(), text),
            "tool_calls": st.one_of(st.none(), st.lists(tool_call, max_size=4, unique_by=lambda tc: tc["id"])),
            "function_call": st.one_of(st.none(), function),
        },
    ),
    extra,
)
counts = st.integers(0, 2**53 - 1)
usage = st.one_of(
    st.none(),
    st.builds(
        lambda c, x: {**c, **x},
        st.fixed_dictionaries({}, optional={"prompt_tokens": counts, "completion_tokens": counts, "total_tokens": counts}),
        st.dictionaries(st.sampled_from(["queue_time", "prompt_tokens_details", "cost"]), st.one_of(st.floats(0, 10), counts, st.none()), max_size=2),
    ),
)


@st.composite
def completions(draw: st.DrawFn) -> dict[str, Any]:
    messages = draw(st.lists(message, min_size=1, max_size=3))
    choices = [{"index": i, "message": m, "finish_reason": draw(finish), **draw(extra)} for i, m in enumerate(messages)]
    out: dict[str, Any] = {"choices": choices, **draw(st.fixed_dictionaries({}, optional={"id": text, "object": st.just("chat.completion"), "model": text, "created": st.integers(0)}))}
    u = draw(usage)
    if u is not None or draw(st.booleans()):
        out["usage"] = u
    return out


def _delta_id(d: dict[str, Any]) -> str | int:
    call_id = d.get("id")
    return call_id if isinstance(call_id, str) and call_id else id(d)


tool_delta = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(0, 2**63),
        "id": st.one_of(st.none(), text),
        "type": st.one_of(st.none(), st.just("function")),
        "function": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"name": st.one_of(st.none(), text), "arguments": st.one_of(st.none(), text)})),
    },
)
delta = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.none(), st.just("assistant")),
        "content": content,
        "refusal": st.one_of(st.none(), text),
        # one delta per index: the same id on two indexes of one chunk is refused
        "tool_calls": st.one_of(st.none(), st.lists(tool_delta, max_size=3, unique_by=_delta_id)),
        "function_call": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"name": st.one_of(st.none(), text), "arguments": st.one_of(st.none(), text)})),
    },
)


@st.composite
def chunks(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 3))
    choices = []
    for i in range(n):
        ch: dict[str, Any] = {"index": i, "finish_reason": draw(finish)}
        d = draw(st.one_of(st.none(), delta, st.just("absent")))
        if d != "absent":
            ch["delta"] = d
        choices.append(ch)
    return {"choices": choices, "usage": draw(usage), **draw(st.fixed_dictionaries({}, optional={"id": text, "object": st.sampled_from(["chat.completion.chunk", ""]), "model": text}))}


@_seeded
@SETTINGS
@given(completions())
def test_answers_built_to_the_format_are_accepted(answer: dict[str, Any]) -> None:
    assert check_completion(answer) is None


@_seeded
@SETTINGS
@given(chunks())
def test_chunks_built_to_the_format_are_accepted(chunk: dict[str, Any]) -> None:
    assert check_chunk(chunk) is None


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    obj = copy.deepcopy(obj)
    node = obj
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return obj


@_seeded
@SETTINGS
@given(st.one_of(completions(), chunks()), st.data())
def test_any_node_replaced_never_raises(obj: dict[str, Any], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_paths(obj)))
    mutated = _replace(obj, path, data.draw(json_values))
    _check(check_completion, mutated)
    _check(check_chunk, mutated)


@_seeded
@SETTINGS
@given(completions(), st.data())
def test_a_tool_call_field_of_the_wrong_type_is_always_refused(answer: dict[str, Any], data: st.DataObject) -> None:
    calls = [(i, j) for i, ch in enumerate(answer["choices"]) for j, _ in enumerate(ch["message"].get("tool_calls") or [])]
    if not calls:
        answer["choices"][0]["message"]["tool_calls"] = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        calls = [(0, 0)]
    i, j = data.draw(st.sampled_from(calls))
    field = data.draw(st.sampled_from([("id",), ("type",), ("function", "name"), ("function", "arguments")]))
    bad = data.draw(json_values.filter(lambda v: v != "function" if field == ("type",) else not isinstance(v, str)))
    mutated = _replace(answer, ("choices", i, "message", "tool_calls", j, *field), bad)
    reason = check_completion(mutated)
    assert reason is not None
    # The first defect found is named: this call's field, or an earlier choice's (none here: the rest is valid).
    assert f"choices[{i}].message.tool_calls[{j}].{'.'.join(field)}" in reason
