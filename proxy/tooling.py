"""Tool calls on the response side: assemble, judge, and build corrective turns.

The core owns the mechanism; plugins own the verdicts (``on_tool_call``).
A turn whose calls are all allowed is relayed intact.  Otherwise Warden
appends the model's calls and one ``tool`` message per call saying why it was
refused, and asks the provider again (a corrective turn), up to
``max_corrections`` times; after that the client gets a 422 (invalid) or a
403 (forbidden) naming the tool and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import Forbidden, ToolCallInvalid, WardenError
from proxy.exchange import Decision, Exchange, ToolCall, ToolDecisionRecord
from proxy.plugin import PluginChain

DEFAULT_MAX_CORRECTIONS = 2
NOT_EXECUTED = "Not executed: another tool call in the same turn was refused. Issue it again if it is still needed."


def parse_call(call_id: str, name: str, arguments: str, index: int) -> ToolCall:
    """A ToolCall with its arguments parsed (or the reason they did not parse)."""
    call = ToolCall(id=call_id, name=name, arguments=arguments, index=index)
    try:
        parsed = orjson.loads(arguments) if arguments else None
    except orjson.JSONDecodeError as e:
        call.parse_error = f"arguments are not valid JSON: {e}"
        return call
    if not isinstance(parsed, dict):
        call.parse_error = "arguments must be a JSON object"
    else:
        call.parsed = parsed
    return call


def calls_from_message(message: dict[str, Any]) -> list[ToolCall]:
    """Tool calls of a non-streamed assistant message (malformed entries become invalid calls)."""
    out: list[ToolCall] = []
    raw = message.get("tool_calls")
    if not isinstance(raw, list):
        return out
    for i, tc in enumerate(raw):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            call = ToolCall(id=str(tc.get("id", f"call_{i}")) if isinstance(tc, dict) else f"call_{i}", name="", arguments="", index=i)
            call.parse_error = "tool call has no function"
            out.append(call)
            continue
        args = fn.get("arguments")
        out.append(parse_call(str(tc.get("id") or f"call_{i}"), str(fn.get("name") or ""), args if isinstance(args, str) else orjson.dumps(args).decode(), i))
    return out


@dataclass(slots=True)
class _Partial:
    id: str = ""
    name: str = ""
    args: list[str] = field(default_factory=list)
    type: str = "function"


class StreamedCalls:
    """Assembles streamed tool-call deltas (choice 0) until each call is complete."""

    __slots__ = ("parts", "_last")

    def __init__(self) -> None:
        self.parts: dict[int, _Partial] = {}
        self._last: int | None = None

    def _index_of(self, d: dict[str, Any]) -> int:
        """The call a delta continues.  Without an ``index``: the call with the
        same ``id``, a new call for a new ``id``, else the call being streamed."""
        idx = d.get("index")
        if isinstance(idx, int) and not isinstance(idx, bool):
            return idx
        call_id = d.get("id")
        if isinstance(call_id, str) and call_id:
            for i, p in self.parts.items():
                if p.id == call_id:
                    return i
            return max(self.parts, default=-1) + 1
        if self._last is not None:
            return self._last
        return max(self.parts, default=-1) + 1

    def add(self, deltas: list[Any]) -> None:
        for d in deltas:
            if not isinstance(d, dict):
                continue
            idx = self._index_of(d)
            self._last = idx
            p = self.parts.get(idx)
            if p is None:
                p = self.parts[idx] = _Partial()
            if isinstance(d.get("id"), str):
                p.id = d["id"]
            if isinstance(d.get("type"), str):
                p.type = d["type"]
            fn = d.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    p.name += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    p.args.append(fn["arguments"])

    def __bool__(self) -> bool:
        return bool(self.parts)

    def calls(self) -> list[ToolCall]:
        return [parse_call(p.id or f"call_{i}", p.name, "".join(p.args), i) for i, p in sorted(self.parts.items())]


def assistant_message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls],
    }


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The whole calls as one streamed delta list (ids, indexes, order preserved)."""
    return [{"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


async def judge(chain: PluginChain, ex: Exchange, calls: list[ToolCall], turn: int) -> list[Decision]:
    decisions = []
    for call in calls:
        d = await chain.judge_tool_call(ex, call)
        ex.tool_decisions.append(ToolDecisionRecord(turn=turn, call=call, decision=d))
        decisions.append(d)
    return decisions


def refusal_text(d: Decision) -> str:
    if d.kind == "hold":
        return d.reason or f"Approval {d.approval_id} was requested from a human reviewer; tell the user it is pending."
    verb = "invalid" if d.kind == "repair" else "refused"
    return f"Warden {verb} this call (rule {d.rule}): {d.reason}"


def corrective_body(body: dict[str, Any], content: str | None, calls: list[ToolCall], decisions: list[Decision]) -> dict[str, Any]:
    """The next upstream body: the conversation plus the refused turn and its refusals."""
    messages = list(body.get("messages") or [])
    messages.append(assistant_message(content, calls))
    for call, d in zip(calls, decisions, strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": NOT_EXECUTED if d.kind == "allow" else refusal_text(d)})
    new = dict(body)
    new["messages"] = messages
    return new


def exhausted_error(calls: list[ToolCall], decisions: list[Decision], corrections: int) -> WardenError:
    refused = [(c, d) for c, d in zip(calls, decisions, strict=True) if d.kind != "allow"]
    call, d = next(((c, d) for c, d in refused if d.kind == "repair"), refused[0])
    msg = f"tool call '{call.name or '?'}' still refused after {corrections} corrective turn(s): {d.reason or d.kind}"
    if d.kind == "repair":
        return ToolCallInvalid(msg, rule=d.rule, param="tool_calls")
    return Forbidden(msg, rule=d.rule, param="tool_calls", code="tool_call_forbidden")


def max_corrections(ex: Exchange) -> int:
    value = ex.annotations.get("max_corrections", DEFAULT_MAX_CORRECTIONS)
    return value if isinstance(value, int) and value >= 0 else DEFAULT_MAX_CORRECTIONS
