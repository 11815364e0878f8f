"""The request phase: fence the offered tools and read the conversation history.

:func:`fence_tools` removes every tool the principal may not use (and every
write tool while read-only mode is on) from ``tools`` (or legacy
``functions``), substitutes the registry's schema for whatever the
application sent, and refuses a ``tool_choice`` that names a removed tool.

:func:`scan_history` links ``role: tool`` results to the assistant calls
that produced them; it yields the results to record and the write calls
that were already executed (for the duplicate-mutation check).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from llm_warden.plugins.tools.canonical import NotCanonical, call_key, canonical_json
from llm_warden.proxy.errors import BadRequest, Forbidden

DUPLICATE_QUOTE_BYTES = 1000

# (name) -> None when the tool may be offered, else (rule, why) for the removal.
Gate = Callable[[str], "tuple[str, str] | None"]
# (name) -> the registry schema, its description and a note to put before the description
# (a deprecation), or None for an undeclared tool.
Lookup = Callable[[str], "tuple[dict[str, Any], str, str] | None"]


def _tool_name(tool: Any) -> str | None:
    """The name of an offered tool (chat ``function``, Responses-style flat, or a built-in type)."""
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function")
    if isinstance(fn, dict):
        name = fn.get("name")
        return name if isinstance(name, str) else None
    name = tool.get("name")
    if isinstance(name, str):
        return name
    kind = tool.get("type")
    return kind if isinstance(kind, str) else None


def _with_registry(tool: Any, schema: dict[str, Any], description: str, note: str = "") -> Any:
    """The tool as sent upstream: the registry's schema, its description if set, and ``note``
    (a deprecation the model must read) before the description.

    Returns the same object when nothing changes (so the body is not rewritten).
    """
    if not isinstance(tool, dict):
        return tool
    fn = tool.get("function")
    target = fn if isinstance(fn, dict) else tool if isinstance(tool.get("name"), str) else None
    if target is None:
        return tool
    if note:
        given = description or target.get("description")
        description = f"{note} {given}" if isinstance(given, str) and given else note
    if target.get("parameters") == schema and (not description or target.get("description") == description):
        return tool
    new_target = dict(target)
    new_target["parameters"] = schema
    if description:
        new_target["description"] = description
    if target is tool:
        return new_target
    out = dict(tool)
    out["function"] = new_target
    return out


def _choice_name(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    fn = choice.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return str(fn["name"])
    name = choice.get("name")
    return name if isinstance(name, str) else None


def _fence_list(
    body: dict[str, Any], list_key: str, choice_key: str, gate: Gate, lookup: Lookup
) -> tuple[dict[str, Any] | None, dict[str, tuple[str, str]]]:
    tools = body.get(list_key)
    if tools is None:
        return None, {}
    if not isinstance(tools, list):
        raise BadRequest(f"'{list_key}' must be a list", param=list_key, rule="tools.request")
    removed: dict[str, tuple[str, str]] = {}
    kept: list[Any] = []
    changed = False
    for tool in tools:
        name = _tool_name(tool)
        if name is None:
            raise BadRequest(f"every entry of '{list_key}' must name a tool", param=list_key, rule="tools.request")
        why = gate(name)
        if why is not None:
            removed[name] = why
            changed = True
            continue
        reg = lookup(name)
        if reg is not None:
            new = _with_registry(tool, reg[0], reg[1], reg[2])
            changed = changed or new is not tool
            tool = new
        kept.append(tool)
    choice = body.get(choice_key)
    forced = _choice_name(choice)
    if forced is not None:
        if forced in removed:
            rule, reason = removed[forced]
            raise Forbidden(f"{choice_key} forces tool {forced!r}, which is not available to this request: {reason}", param=choice_key, rule=rule)
        if not any(_tool_name(t) == forced for t in kept):
            raise BadRequest(f"{choice_key} forces tool {forced!r}, which is not in '{list_key}'", param=choice_key, rule="tools.request")
    if not changed:
        return None, removed
    out = dict(body)
    if kept:
        out[list_key] = kept
    else:
        if choice == "required":
            rules = ", ".join(sorted({r for r, _ in removed.values()}))
            raise Forbidden(
                f"{choice_key} is 'required' but every tool offered was removed by the tool policy", param=choice_key, rule=rules
            )
        out.pop(list_key, None)
        out.pop(choice_key, None)
        out.pop("parallel_tool_calls", None)
    return out, removed


def fence_tools(body: dict[str, Any], gate: Gate, lookup: Lookup) -> tuple[dict[str, Any] | None, dict[str, tuple[str, str]]]:
    """Fence ``tools``/``tool_choice`` and legacy ``functions``/``function_call``.

    Returns the new body (``None`` when nothing changed) and the removed tools
    with the rule that removed each.  Raises ``Forbidden`` when a forced tool
    was removed.
    """
    removed: dict[str, tuple[str, str]] = {}
    new, r1 = _fence_list(body, "tools", "tool_choice", gate, lookup)
    removed.update(r1)
    current = new if new is not None else body
    new2, r2 = _fence_list(current, "functions", "function_call", gate, lookup)
    removed.update(r2)
    return (new2 if new2 is not None else new), removed


@dataclass
class History:
    """What the application's conversation history says about tool calls."""

    executed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``call_key(tool, canonical args)`` of write calls with a result -> the call id and a result excerpt."""
    results: list[dict[str, Any]] = field(default_factory=list)
    """The newest round of tool results, linked to their calls (for the audit record)."""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if len(parts) == len(content):
            return "".join(parts)
    if content is None:
        return ""
    try:
        return orjson.dumps(content).decode()
    except orjson.JSONEncodeError:
        # Nested past orjson's 254 levels (the request's depth limit may allow 500).
        return "(content nested too deeply to record)"


def _truncate(text: str, max_bytes: int) -> tuple[str, int, bool]:
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text, len(raw), False
    return raw[:max_bytes].decode(errors="ignore"), len(raw), True


def _canonical_args(raw: Any) -> str | None:
    """The canonical form of a history call's arguments; ``None`` when they have none."""
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
    elif not isinstance(raw, dict):
        return None
    try:
        return canonical_json(raw)
    except NotCanonical:
        # Too deep or not JSON-representable: such a call cannot be repeated
        # as-is either (the judge refuses it), so it is recorded unlinked.
        return None


def scan_history(messages: Any, is_write: Callable[[str], bool], result_max_bytes: int) -> History:
    """Link tool results to calls; find executed write calls; pick results to record.

    Results recorded are those after the last assistant message that made
    tool calls (older rounds were recorded with the requests that carried
    them first).  Malformed messages are skipped, never fatal.
    """
    hist = History()
    if not isinstance(messages, list):
        return hist
    calls: dict[str, tuple[str, Any]] = {}
    last_round = -1
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and msg.get("role") == "assistant" and (msg.get("tool_calls") or msg.get("function_call")):
            last_round = i
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        if role == "assistant":
            tcs = msg.get("tool_calls")
            if isinstance(tcs, list):
                for tc in tcs:
                    if not isinstance(tc, dict) or not isinstance(tc.get("id"), str):
                        continue
                    fn = tc.get("function")
                    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                        calls[tc["id"]] = (fn["name"], fn.get("arguments"))
            fc = msg.get("function_call")
            if isinstance(fc, dict) and isinstance(fc.get("name"), str):
                calls["legacy:last"] = (fc["name"], fc.get("arguments"))
        elif role in ("tool", "function"):
            if role == "tool":
                call_id = msg.get("tool_call_id")
                linked = calls.get(call_id) if isinstance(call_id, str) else None
            else:
                call_id = None
                linked = calls.get("legacy:last")
                if linked is not None and linked[0] != msg.get("name"):
                    linked = None
            text = _content_text(msg.get("content"))
            name = linked[0] if linked else (msg.get("name") if isinstance(msg.get("name"), str) else None)
            canonical = _canonical_args(linked[1]) if linked else None
            if linked and canonical is not None and is_write(linked[0]):
                excerpt, _, cut = _truncate(text, DUPLICATE_QUOTE_BYTES)
                hist.executed[call_key(linked[0], canonical)] = {
                    "call_id": call_id,
                    "result": excerpt + (" [...]" if cut else ""),
                }
            if i > last_round:
                content, size, cut = _truncate(text, result_max_bytes)
                hist.results.append(
                    {
                        "tool_call_id": call_id,
                        "name": name,
                        "arguments": canonical if canonical is not None else (linked[1] if linked else None),
                        "linked": linked is not None,
                        "content": content,
                        "bytes": size,
                        "truncated": cut,
                    }
                )
    return hist
