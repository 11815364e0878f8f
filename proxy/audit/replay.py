"""``warden replay REQUEST_ID``: re-send a recorded upstream request and compare.

The request is rebuilt from the record's turn (the body exactly as Warden
sent it upstream, after injection; kept whole, tool results included).  It
needs ``store_content = "full"`` or ``"redacted"``; with ``hashes`` only
hashes were kept and nothing can be replayed.  What cannot be reproduced is
said before sending: values the redaction replaced (their placeholders are
sent), and sampling without a ``seed`` (not deterministic at the provider).
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


class ReplayError(Exception):
    """The record cannot be replayed; the message says why."""


@dataclass(slots=True)
class Answer:
    """The comparable part of a chat answer."""

    model: str | None = None
    text: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None


@dataclass(slots=True)
class ReplayPlan:
    """What will be sent, where, and what cannot be reproduced."""

    url: str
    body: dict[str, Any]
    caveats: list[str]
    old: Answer


TRANSLATED_TO_CHAT = frozenset({"openai.responses", "anthropic.messages"})
"""Client APIs whose exchanges went upstream as chat completions (the recorded turns are the translated requests)."""


def plan_replay(record: dict[str, Any], *, base_url: str, turn: int = 0, model: str | None = None) -> ReplayPlan:
    """Rebuild the upstream request of ``turn`` from an exchange record."""
    if record.get("kind") != "exchange":
        raise ReplayError(f"record is a {record.get('kind')!r}, not an exchange")
    mode = (record.get("redaction") or {}).get("mode")
    if mode == "hashes":
        raise ReplayError(
            'this exchange was recorded with store_content = "hashes": only hashes of the request were kept, so it cannot be replayed'
        )
    turns = record.get("turns") or []
    if not turns:
        raise ReplayError("the exchange never reached the provider (no upstream turn was recorded)")
    if not 0 <= turn < len(turns):
        raise ReplayError(f"the exchange has turns 0..{len(turns) - 1}, not {turn}")
    req = turns[turn].get("request")
    if not isinstance(req, dict):
        raise ReplayError("the recorded upstream request is not a JSON object; it cannot be rebuilt")
    body = dict(req)
    caveats: list[str] = []
    text = orjson.dumps(body).decode()
    placeholders = text.count("[REDACTED:")
    if placeholders:
        rules = sorted(set(part.split("]", 1)[0] for part in text.split("[REDACTED:")[1:]))
        caveats.append(
            f"{placeholders} value(s) in the request were redacted when recorded ({', '.join(rules)}); the replay sends the placeholders"
        )
    if "seed" not in body:
        caveats.append("the request has no seed: the provider's sampling is not reproducible")
    if model:
        body["model"] = model
    if record.get("protocol") in TRANSLATED_TO_CHAT:
        path = "/chat/completions"  # the recorded turn is the chat-completions request the chat flow sent, whatever API the client spoke
    else:
        path = str(record.get("path") or "/v1/chat/completions")
        path = path[len("/v1") :] if path.startswith("/v1") else path
    old = _answer(turns[turn].get("response"))
    if turn == len(turns) - 1 and not old.text and not old.tool_calls:
        final = (record.get("response") or {}).get("body")
        old = _answer(final) if isinstance(final, dict) else Answer(text=str((record.get("response") or {}).get("text") or ""))
    old.model = old.model or (record.get("model") or {}).get("reported")
    return ReplayPlan(base_url.rstrip("/") + path, body, caveats, old)


def _answer(resp: Any) -> Answer:
    if not isinstance(resp, dict):
        return Answer()
    choices = resp.get("choices") or []
    ch = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = ch.get("message") or {}
    calls = []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") or {} if isinstance(c, dict) else {}
        calls.append((str(fn.get("name")), _canon_args(fn.get("arguments"))))
    content = msg.get("content")
    return Answer(
        model=resp.get("model"), text=content if isinstance(content, str) else "", tool_calls=calls, finish_reason=ch.get("finish_reason")
    )


def _canon_args(args: Any) -> str:
    if isinstance(args, str):
        try:
            return orjson.dumps(orjson.loads(args), option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONDecodeError:
            return args
    return orjson.dumps(args, option=orjson.OPT_SORT_KEYS).decode()


async def send(plan: ReplayPlan, api_key: str | None, timeout_s: float = 120.0) -> Answer:
    """Send the rebuilt request (streamed answers are assembled)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(plan.url, data=orjson.dumps(plan.body), headers=headers) as resp:
            if resp.status != 200:
                raw = await resp.read()
                return Answer(status=resp.status, error=raw[:2000].decode("utf-8", "replace"))
            if plan.body.get("stream"):
                ans = await _read_stream(resp)
            else:
                ans = _answer(orjson.loads(await resp.read()))
            ans.status = resp.status
            return ans


async def _read_stream(resp: aiohttp.ClientResponse) -> Answer:
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    ans = Answer()
    async for raw_line in resp.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        ans.model = ans.model or chunk.get("model")
        for ch in chunk.get("choices") or []:
            delta = ch.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(int(tc.get("index", 0)), {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if ch.get("finish_reason"):
                ans.finish_reason = ch["finish_reason"]
    ans.text = "".join(text)
    ans.tool_calls = [(c["name"], _canon_args(c["arguments"])) for _, c in sorted(calls.items())]
    return ans


def tool_call_changes(old: Answer, new: Answer) -> list[str]:
    """Lines describing tool calls that were added, removed or changed."""
    out: list[str] = []
    n = max(len(old.tool_calls), len(new.tool_calls))
    for i in range(n):
        a = old.tool_calls[i] if i < len(old.tool_calls) else None
        b = new.tool_calls[i] if i < len(new.tool_calls) else None
        if a == b:
            continue
        if a is None and b is not None:
            out.append(f"+ added    {b[0]}({b[1]})")
        elif b is None and a is not None:
            out.append(f"- removed  {a[0]}({a[1]})")
        elif a is not None and b is not None:
            out.append(f"~ changed  {a[0]}({a[1]})  ->  {b[0]}({b[1]})")
    return out


def side_by_side(old: Answer, new: Answer, width: int | None = None) -> str:
    """The recorded and the new answer in two columns, then the tool-call changes."""
    total = width or shutil.get_terminal_size((160, 40)).columns
    col = max(20, (total - 3) // 2)
    left = [f"recorded ({old.model or '?'})", "-" * col] + _wrap(old, col)
    right = [f"replay ({new.model or '?'})", "-" * col] + _wrap(new, col)
    rows = [
        f"{a:<{col}} | {b}" for a, b in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right)), strict=True)
    ]
    changes = tool_call_changes(old, new)
    rows.append("")
    rows.append("tool calls: " + ("unchanged" if not changes else f"{len(changes)} changed"))
    rows.extend("  " + c for c in changes)
    rows.append("answer text: " + ("identical" if old.text == new.text else "differs"))
    return "\n".join(rows)


def _wrap(a: Answer, col: int) -> list[str]:
    if a.error is not None:
        return textwrap.wrap(f"provider error {a.status}: {a.error}", col) or [""]
    lines: list[str] = []
    for para in (a.text or "(no text)").split("\n"):
        lines.extend(textwrap.wrap(para, col) or [""])
    for name, args in a.tool_calls:
        lines.extend(textwrap.wrap(f"tool call {name}({args})", col))
    lines.append(f"finish: {a.finish_reason}")
    return lines
