"""Tool calls on the response side: assemble, judge, and build corrective turns.

The core owns the mechanism; plugins own the verdicts (``on_tool_call``).
A turn whose calls are all allowed is relayed intact.  Otherwise Warden
appends the model's calls and one ``tool`` message per call saying why it was
refused, and asks the provider again (a corrective turn), up to
``max_corrections`` times; after that the client gets a 422 (invalid) or a
403 (forbidden) naming the tool and the rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from llm_warden.proxy.errors import Forbidden, ToolCallInvalid, WardenError
from llm_warden.proxy.exchange import Decision, Exchange, ToolCall, ToolDecisionRecord
from llm_warden.proxy.plugin import PluginChain
from llm_warden.proxy.sse import SSEError

MAX_STREAMED_CALLS = 128
MAX_STREAMED_ARGS_BYTES = 16 * 1024 * 1024
NOT_EXECUTED = "Not executed: another tool call in the same turn was refused. Issue it again if it is still needed."


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def duplicate_key(arguments: str) -> str | None:
    """The first key that occurs twice in one JSON object of ``arguments``, else ``None``.

    Parsers disagree on duplicates (most keep the last, some the first, some
    refuse), so the value Warden validates might not be the one the
    application executes: such arguments are refused as malformed.
    """
    if arguments.count('"') < 4 and not _LONG_DIGITS.search(arguments):
        return None
    try:
        json.loads(arguments, object_pairs_hook=_reject_duplicates, parse_int=_int64)
    except _DuplicateKey as e:
        return e.key
    return None


_LONG_DIGITS = re.compile(r"\d{19}")


def _int64(text: str) -> int:
    """An integer as orjson reads it exactly; beyond 64 bits orjson makes a lossy float of it, so refuse."""
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError("integer beyond 64 bits")
    return value


def loads_arguments(arguments: str) -> tuple[dict[str, Any] | None, str | None]:
    """Tool-call arguments as a JSON object, or why they are not one (invalid JSON, not an object, a duplicate key)."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as e:
        return None, f"arguments are not valid JSON: {e}"
    if not isinstance(parsed, dict):
        return None, "arguments must be a JSON object"
    try:
        dup = duplicate_key(arguments)
    except (ValueError, RecursionError):
        # Python's json (what the application likely runs) cannot read exactly what orjson read:
        # nested deeper than its recursion limit, or an integer orjson rounded.  Fail closed.
        return None, "arguments cannot be checked: nested too deeply or an integer beyond 64 bits"
    if dup is not None:
        return None, f"arguments contain the duplicate key {dup[:64]!r}; every key may appear only once"
    return parsed, None


def parse_call(call_id: str, name: str, arguments: str, index: int, legacy: bool = False) -> ToolCall:
    """A ToolCall with its arguments parsed (or the reason they did not parse)."""
    call = ToolCall(id=call_id, name=name, arguments=arguments, index=index, legacy=legacy)
    if not arguments:
        call.parse_error = "arguments must be a JSON object"
        return call
    call.parsed, call.parse_error = loads_arguments(arguments)
    return call


def _arguments_text(args: Any) -> str:
    """``function.arguments`` as text.  A non-string value (against the format) is written back as JSON;
    one orjson cannot write (nested deeper than 255) becomes ``""``, which parse_call refuses."""
    if isinstance(args, str):
        return args
    try:
        return orjson.dumps(args).decode()
    except orjson.JSONEncodeError:
        return ""


def calls_from_message(message: dict[str, Any]) -> list[ToolCall]:
    """Tool calls of a non-streamed assistant message (malformed entries become invalid calls).

    A legacy ``function_call`` is a call too (judged like any other).
    """
    out: list[ToolCall] = []
    raw = message.get("tool_calls")
    fc = message.get("function_call")
    if fc is not None:
        name = fc.get("name") if isinstance(fc, dict) else None
        args = fc.get("arguments") if isinstance(fc, dict) else None
        out.append(parse_call("function_call", str(name or ""), _arguments_text(args), 0, legacy=True))
    if raw is None:
        return out
    if not isinstance(raw, list):
        call = ToolCall(id="call_0", name="", arguments="", index=len(out))
        call.parse_error = "tool_calls must be a list"
        return [*out, call]
    for i, tc in enumerate(raw, start=len(out)):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            call = ToolCall(id=str(tc.get("id", f"call_{i}")) if isinstance(tc, dict) else f"call_{i}", name="", arguments="", index=i)
            call.parse_error = "tool call has no function"
            out.append(call)
            continue
        args = fn.get("arguments")
        out.append(parse_call(str(tc.get("id") or f"call_{i}"), str(fn.get("name") or ""), _arguments_text(args), i))
    return out


def has_calls(message: Any) -> bool:
    """Whether a message or a delta carries tool calls (``tool_calls`` or legacy ``function_call``)."""
    return isinstance(message, dict) and (message.get("tool_calls") is not None or message.get("function_call") is not None)


@dataclass(slots=True)
class _Partial:
    id: str = ""
    name: str = ""
    args: list[str] = field(default_factory=list)
    type: str = "function"


class StreamedCalls:
    """Assembles streamed tool-call deltas (choice 0) until each call is complete.

    A legacy ``function_call`` delta is assembled as one call marked ``legacy``.
    Held calls are bounded (``MAX_STREAMED_CALLS`` calls, ``MAX_STREAMED_ARGS_BYTES``
    of arguments): a provider cannot make Warden hold an unbounded answer.
    """

    __slots__ = ("parts", "legacy", "_last", "_size")

    def __init__(self) -> None:
        self.parts: dict[int, _Partial] = {}
        self.legacy: _Partial | None = None
        self._last: int | None = None
        self._size = 0

    def _grow(self, n: int) -> None:
        self._size += n
        if self._size > MAX_STREAMED_ARGS_BYTES:
            raise SSEError(f"streamed tool-call names and arguments exceed {MAX_STREAMED_ARGS_BYTES} bytes")
        if len(self.parts) > MAX_STREAMED_CALLS:
            raise SSEError(f"more than {MAX_STREAMED_CALLS} streamed tool calls in one turn")

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
                    self._grow(len(fn["name"]))
                if isinstance(fn.get("arguments"), str):
                    p.args.append(fn["arguments"])
                    self._grow(len(fn["arguments"]))
            self._grow(0)

    def add_legacy(self, fc: Any) -> None:
        """One ``delta.function_call`` fragment."""
        if self.legacy is None:
            self.legacy = _Partial(id="function_call")
        if isinstance(fc, dict):
            if isinstance(fc.get("name"), str):
                self.legacy.name += fc["name"]
                self._grow(len(fc["name"]))
            if isinstance(fc.get("arguments"), str):
                self.legacy.args.append(fc["arguments"])
                self._grow(len(fc["arguments"]))

    def __bool__(self) -> bool:
        return bool(self.parts) or self.legacy is not None

    def calls(self) -> list[ToolCall]:
        out = []
        if self.legacy is not None:
            out.append(parse_call(self.legacy.id, self.legacy.name, "".join(self.legacy.args), 0, legacy=True))
        base = len(out)
        out.extend(parse_call(p.id or f"call_{i}", p.name, "".join(p.args), base + i) for i, p in sorted(self.parts.items()))
        return out


def assistant_message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content or None}
    legacy = [c for c in calls if c.legacy]
    current = [c for c in calls if not c.legacy]
    if legacy:
        msg["function_call"] = {"name": legacy[0].name, "arguments": legacy[0].arguments}
    if current or not legacy:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in current]
    return msg


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The whole calls as one streamed delta list (ids, indexes, order preserved)."""
    return [{"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls if not c.legacy]


def call_delta(calls: list[ToolCall]) -> dict[str, Any]:
    """The delta that relays judged calls: ``tool_calls`` and/or a legacy ``function_call``."""
    delta: dict[str, Any] = {}
    tcs = tool_call_deltas(calls)
    if tcs:
        delta["tool_calls"] = tcs
    for c in calls:
        if c.legacy:
            delta["function_call"] = {"name": c.name, "arguments": c.arguments}
    return delta


def offer_check(ex: Exchange, call: ToolCall) -> Decision | None:
    """The core's own rule: a call is judged further only if its tool was offered to the model in this request.

    "Offered" is what went upstream after every request hook ran (a tool
    Warden removed was not offered), so a model cannot reach a declared tool
    the application did not offer, or any tool when none was offered.
    """
    withheld = ex.tools_withheld.get(call.name)
    if withheld is not None:
        rule, reason = withheld
        return Decision.deny(rule, f"the tool {call.name[:64]!r} is not available to this request: {reason}")
    offered = ex.tools_offered
    if offered is None:
        return Decision.deny("tools.offered", "no tools were offered to the model in this request")
    if call.name not in offered:
        return Decision.deny("tools.offered", f"the tool {call.name[:64]!r} was not offered to the model in this request")
    return None


async def judge(chain: PluginChain, ex: Exchange, calls: list[ToolCall], turn: int, *, object_arguments: bool = False) -> list[Decision]:
    """Judge each call: the offer first, then the plugins (the first non-allow verdict wins).

    With ``object_arguments`` (the client's API gives the application parsed
    arguments, as Anthropic's ``tool_use.input``), a call the plugins allowed
    whose arguments are not a JSON object is sent back for repair (rule
    ``protocol.tool_input``): it could not be rendered at all.
    """
    decisions = []
    for call in calls:
        d = offer_check(ex, call) or await chain.judge_tool_call(ex, call)
        if object_arguments and d.kind == "allow" and call.parsed is None:
            d = Decision.repair("protocol.tool_input", f"the arguments must be a JSON object ({call.parse_error or 'they are not'})")
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
        text = NOT_EXECUTED if d.kind == "allow" else refusal_text(d)
        if call.legacy:
            messages.append({"role": "function", "name": call.name, "content": text})
        else:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
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


