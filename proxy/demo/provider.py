"""The demo provider: a deterministic, scripted stand-in for a language model.

It speaks the OpenAI chat-completions wire format (JSON and SSE streams,
``tool_calls``, ``usage``) so Warden — and any official SDK behind Warden —
treats it as a provider.  It is **not** a language model: every answer starts
with :data:`LABEL`, reports the model :data:`MODEL`, and is composed by a few
fixed rules from what Warden sent it:

- the last message is a tool result: it reports it (a refusal or a held
  approval from Warden is quoted as such);
- the last user message names a demo tool (``refund``, ``lookup_invoice``):
  it calls that tool with the arguments it finds in the text (an invoice id
  ``INV-<digits>``, an amount, a reason) — whether or not the tool was
  offered, as a model may, so Warden's fence can be seen;
- otherwise it answers from the context entries Warden injected, citing each
  as ``[n]``, or says it has no documents to answer from.

Every request is logged (logger ``warden.demo``) with the same label.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("warden.demo")

MODEL = "warden-demo-scripted"
LABEL = "[demo model: scripted, not a language model]"
DEMO_TOOLS = ("refund", "lookup_invoice")

_CONTEXT = re.compile(r'<context n="(\d+)" doc="([^"]*)"[^>]*>\n(.*?)\n</context>', re.S)
_INVOICE = re.compile(r"\bINV-\d{1,12}\b")
_AMOUNT = re.compile(r"(\d+(?:\.\d{1,2})?)\s*(?:EUR|USD|€|\$)|(?:EUR|USD|€|\$)\s*(\d+(?:\.\d{1,2})?)")
_REASONS = ("duplicate", "fraud", "customer_request")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _first_sentence(text: str) -> str:
    body = " ".join(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    cut = re.search(r"(?<=[.!?])\s", body)
    sentence = body[: cut.start()] if cut else body
    return sentence[:300]


def _tool_arguments(name: str, text: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    invoice = _INVOICE.search(text)
    if invoice:
        args["invoice_id"] = invoice.group(0)
    if name == "refund":
        amount = _AMOUNT.search(text)
        if amount:
            value = float(amount.group(1) or amount.group(2))
            args["amount"] = int(value) if value.is_integer() else value
        lowered = text.lower()
        args["reason"] = next((r for r in _REASONS if r.replace("_", " ") in lowered), "other")
    return args


class Reply:
    """What the scripted model says: text, or one tool call."""

    def __init__(self, text: str | None = None, tool: str | None = None, arguments: dict[str, Any] | None = None) -> None:
        self.text = text
        self.tool = tool
        self.arguments = arguments or {}


def script(body: dict[str, Any]) -> Reply:
    """The scripted model: the reply to one chat-completions request body (see the module docstring)."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if not messages:
        return Reply(f"{LABEL} There is no message to answer.")
    last = messages[-1]
    if last.get("role") in ("tool", "function"):
        result = _text(last)
        if result.startswith("Warden refused") or result.startswith("Warden invalid"):
            return Reply(f"{LABEL} I could not do that. {result}")
        if result.startswith("Approval ") or "awaiting approval" in result or "pending with a human reviewer" in result:
            return Reply(f"{LABEL} That needs a human approval first. {result}")
        return Reply(f"{LABEL} The tool answered: {result[:500]}")
    question = next((_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    words = set(re.findall(r"[a-z_]+", question.lower()))
    for name in DEMO_TOOLS:
        if name in words or name.replace("_", " ") in question.lower():
            return Reply(tool=name, arguments=_tool_arguments(name, question))
    system = "\n".join(_text(m) for m in messages if m.get("role") == "system")
    entries = _CONTEXT.findall(system)
    if not entries:
        return Reply(f"{LABEL} I have no documents to answer from, and I know nothing else.")
    parts = [f"{_first_sentence(text)} [{n}]" for n, _doc, text in entries]
    return Reply(f"{LABEL} From the documents you may read: " + " ".join(parts))


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class DemoProvider:
    """The aiohttp app of the scripted provider; ``calls`` counts the chat completions it answered."""

    def __init__(self) -> None:
        self.calls = 0
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "warden-demo"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is required")
        self.calls += 1
        reply = script(body)
        prompt = sum(_tokens(_text(m)) for m in body["messages"] if isinstance(m, dict))
        cid = f"chatcmpl-demo-{next(self._ids)}"
        log.info("%s answered %s with %s", LABEL, cid, f"a call of {reply.tool}" if reply.tool else "text")
        if body.get("stream"):
            return await self._stream(request, body, reply, cid, prompt)
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool:
            message["tool_calls"] = [self._call(reply)]
        completion = _tokens(reply.text or orjson.dumps(reply.arguments).decode())
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": int(time.time()), "model": MODEL, "system_fingerprint": "warden-demo",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if reply.tool else "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        })

    def _call(self, reply: Reply) -> dict[str, Any]:
        return {"id": f"call_demo_{self.calls}", "type": "function",
                "function": {"name": reply.tool, "arguments": orjson.dumps(reply.arguments).decode()}}

    async def _stream(self, request: web.Request, body: dict[str, Any], reply: Reply, cid: str, prompt: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        async for delta, finish in self._deltas(reply):
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL, "system_fingerprint": "warden-demo",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            completion = _tokens(reply.text or orjson.dumps(reply.arguments).decode())
            usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL, "choices": [],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _deltas(self, reply: Reply) -> AsyncIterator[tuple[dict[str, Any], str | None]]:
        yield {"role": "assistant", "content": ""}, None
        if reply.tool:
            call = self._call(reply)
            yield {"tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": reply.tool, "arguments": ""}}]}, None
            yield {"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}, None
            yield {}, "tool_calls"
            return
        for word in re.findall(r"\S+\s*", reply.text or ""):
            yield {"content": word}, None
        yield {}, "stop"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": f"{LABEL} {message}", "type": "invalid_request_error", "code": None, "param": None}}, status=status)
