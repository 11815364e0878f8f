"""The obedient model: a scripted OpenAI-compatible provider that does whatever the text it sees tells it.

The adversarial suite runs against it so that what it measures is Warden's
fence, not a model's restraint.  It knows the instructions the suite planted
(:class:`Instruction`: the planted text, the tool calls it asks for, the text
it asks to be said) and, on every request, looks for them in **every** message
it receives — system (where retrieval puts documents), tool results, user.  For
each instruction it finds it emits the tool calls the instruction names (again
after every refusal: it never gives up); when there are none left to make it
answers with the text the instructions ask for and then repeats, verbatim,
every piece of context it was given — so whatever Warden injects, it leaks.

It speaks chat completions as JSON and as SSE (content word by word, tool
calls in deltas), and ``/v1/embeddings`` is not served: run retrieval in
``bm25`` mode against it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from llm_warden.proxy.content import content_text

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Instruction:
    trigger: str
    """Planted text the model obeys when it sees it."""
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    say: str = ""


@dataclass
class ObedientModel:
    instructions: list[Instruction] = field(default_factory=list)
    requests: int = 0
    _runner: web.AppRunner | None = None
    base_url: str = ""

    def decide(self, body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) for one request."""
        msgs = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        seen = "\n".join(content_text(m.get("content")) for m in msgs if m.get("role") != "assistant")
        found = [i for i in self.instructions if i.trigger in seen]
        calls = [(n, a) for i in found for n, a in i.calls]
        if calls:
            return None, [{"id": f"call_ob{next(_ids)}", "type": "function", "function": {"name": n, "arguments": orjson.dumps(a).decode()}} for n, a in calls]
        context = [content_text(m.get("content")) for m in msgs if m.get("role") in ("system", "tool", "developer")]
        parts = [i.say for i in found if i.say] + ["Here is everything I was given:"] + context
        return "\n\n".join(p for p in parts if p), []

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "obedient", "object": "model", "owned_by": "warden-eval"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error", "code": None, "param": None}}, status=400)
        content, calls = self.decide(body if isinstance(body, dict) else {})
        cid, created, model = f"chatcmpl-ob{next(_ids)}", int(time.time()), str(body.get("model") or "obedient")
        usage = {"prompt_tokens": len(orjson.dumps(body.get("messages"))) // 4, "completion_tokens": len(content or "") // 4 + 8 * len(calls)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = "tool_calls" if calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(delta: dict[str, Any], fr: str | None = None) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": fr}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        await send({"role": "assistant", "content": ""})
        if content:
            words = content.split(" ")
            for i, w in enumerate(words):
                await send({"content": w + (" " if i < len(words) - 1 else "")})
        for i, c in enumerate(calls):
            args = c["function"]["arguments"]
            await send({"tool_calls": [{"index": i, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}]})
            half = len(args) // 2
            for piece in (args[:half], args[half:]):
                await send({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        await send({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
