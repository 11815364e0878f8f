"""A scriptable fake OpenAI-compatible provider that speaks the real wire format.

It is the one stand-in the tests use: chat completions as JSON and as SSE
(role chunk, content deltas, tool-call deltas split across events, finish
chunk, ``stream_options.include_usage`` usage chunk, ``data: [DONE]``),
embeddings and the model list, exactly as the official ``openai`` SDK expects.

Script answers with :meth:`FakeProvider.push` (chat) and :meth:`FakeProvider.push_embedding`; with nothing scripted it
answers ``"Hello from the fake provider."``.  Every request it receives is kept
in :attr:`FakeProvider.requests` (path, headers, parsed body).

Answers that break the wire format (for ``proxy.wire`` and the
``upstream.protocol`` refusals): ``Reply(malformed=NAME)`` with NAME one of
:data:`MALFORMED`.  A non-streamed request gets the normal answer with that one
defect (status 201 for ``error_beside_tool_calls``, else 200); a streamed
request gets ``malformed_after`` good events (role chunk, content words), then
one chunk with the defect, then the rest of the normal stream and
``[DONE]``, so a test sees what was relayed before the stream went bad.

- ``error_beside_tool_calls``: an ``error`` object next to valid tool calls;
- ``error_only``: a 2xx body (or stream event) that is only an ``error`` object;
- ``not_an_object``: the answer/chunk is a JSON array;
- ``choices_object`` / ``choices_missing``: ``choices`` an object / absent;
- ``choices_empty``: ``choices: []`` (malformed non-streamed; legal in a chunk,
  so the stream just never finishes);
- ``choice_index_string``: ``choices[0].index`` is ``"0"``;
- ``message_missing``: no ``message`` (non-streamed) / ``delta`` a string (streamed);
- ``role_not_assistant``: ``role`` is ``"system"``;
- ``content_number``: ``content`` is ``42``;
- ``tool_calls_object``: ``tool_calls`` an object, not a list;
- ``tool_call_id_number``: a tool call's ``id`` is ``42``;
- ``tool_call_type_custom``: a tool call's ``type`` is ``"custom"``;
- ``arguments_not_string``: ``function.arguments`` is a JSON object;
- ``duplicate_tool_call_ids``: two calls with the same ``id`` (streamed: two
  deltas of one chunk, indexes 0 and 1, with the same ``id``);
- ``tool_call_index_negative``: a tool call with ``index`` -1 (a delta's index;
  in a non-streamed message the extra key is harmless, so that answer is valid);
- ``unknown_finish_reason``: ``finish_reason`` is ``"xyz"``;
- ``abort_finish_reason``: ``finish_reason`` is ``"abort"`` (vLLM's aborted request);
- ``negative_usage``: ``usage.prompt_tokens`` is ``-5``;
- ``truncated_json``: the body / one event's data cut in the middle of the JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

_ids = itertools.count(1)


@dataclass
class Reply:
    """One scripted answer.

    - ``content`` / ``tool_calls`` (``[{"name", "arguments", "id"?}]``, arguments as raw text);
    - ``status`` with ``error`` (an OpenAI error body is built) or ``body`` (raw bytes);
    - ``delay_s`` before the headers, ``chunk_delay_s`` between SSE events, ``hang`` never answers;
    - ``raw_events``: SSE data payloads sent as they are (for malformed streams);
    - ``comment``: an SSE comment line (``: ...``) sent first, as keep-alive providers do;
    - ``cut_after``: close the connection after that many events (a stream cut mid-way);
    - ``usage``: override the reported usage; ``model``: the reported model;
    - ``malformed``: one of :data:`MALFORMED`, an answer that breaks the wire format
      (see the module docstring); ``malformed_after``: good events before the bad one.
    """

    content: str | None = "Hello from the fake provider."
    tool_calls: list[dict[str, Any]] | None = None
    status: int = 200
    error: str | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    hang: bool = False
    raw_events: list[bytes] | None = None
    comment: bytes | None = None
    cut_after: int | None = None
    usage: dict[str, int] | None = None
    model: str | None = None
    finish_reason: str | None = None
    malformed: str | None = None
    malformed_after: int = 2

    def __post_init__(self) -> None:
        if self.malformed is not None and self.malformed not in MALFORMED:
            raise ValueError(f"unknown malformed answer {self.malformed!r} (known: {', '.join(sorted(MALFORMED))})")


@dataclass
class Received:
    path: str
    method: str
    headers: CIMultiDict[str]
    body: Any
    raw_path: str = ""


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeProvider:
    def __init__(self, embedding_dim: int = 384) -> None:
        self.script: deque[Reply] = deque()
        self.embedding_script: deque[Reply] = deque()
        self.requests: list[Received] = []
        self.embedding_dim = embedding_dim
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.disconnects = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *replies: Reply) -> None:
        """Script the next chat completion answers, in order."""
        self.script.extend(replies)

    def push_embedding(self, *replies: Reply) -> None:
        """Script the next embeddings answers (only ``status``/``error``/``body`` are used)."""
        self.embedding_script.extend(replies)

    def chat_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def start(self, port: int = 0) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/v1/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.base_url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        self.requests.append(Received(request.path, request.method, CIMultiDict(request.headers), body, request.raw_path))
        return body

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})

    async def _echo(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.json_response({"object": "echo", "path": request.path, "method": request.method, "body": body if not isinstance(body, bytes) else None})

    def embed(self, text: str) -> list[float]:
        """Deterministic unit vector for ``text`` (bag of hashed words, so similar texts are close)."""
        v = [0.0] * self.embedding_dim
        for word in text.lower().split():
            h = hashlib.sha256(word.encode()).digest()
            for i in range(4):
                idx = int.from_bytes(h[i * 4 : i * 4 + 4], "little") % self.embedding_dim
                v[idx] += 1.0 if h[16 + i] & 1 else -1.0
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / norm for x in v]

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        reply = self.embedding_script.popleft() if self.embedding_script else None
        if reply is not None and reply.status != 200:
            return self._error(reply)
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            return web.json_response({"error": {"message": "input required", "type": "invalid_request_error", "code": None, "param": "input"}}, status=400)
        data = [{"object": "embedding", "index": i, "embedding": self.embed(str(t))} for i, t in enumerate(inputs)]
        tokens = sum(_tokens(str(t)) for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": body.get("model", "fake-embed"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _error(self, reply: Reply) -> web.Response:
        if reply.body is not None:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        err = {"error": {"message": reply.error or f"fake error {reply.status}", "type": "api_error", "code": None, "param": None}}
        return web.Response(status=reply.status, body=orjson.dumps(err), content_type="application/json", headers=reply.headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        reply = self.script.popleft() if self.script else Reply()
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return self._error(reply)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error", "code": None, "param": None}}, status=400)
        model = reply.model or body.get("model", "fake-model")
        prompt_tokens = _tokens(orjson.dumps(body.get("messages", [])).decode())
        completion_tokens = _tokens((reply.content or "") + "".join(tc.get("arguments", "") for tc in reply.tool_calls or []))
        usage = reply.usage or {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        cid = f"chatcmpl-fake{next(_ids)}"
        created = int(time.time())
        calls = [
            {"id": tc.get("id") or f"call_{cid[-6:]}_{i}", "type": "function", "function": {"name": tc["name"], "arguments": tc.get("arguments", "{}")}}
            for i, tc in enumerate(reply.tool_calls or [])
        ]
        finish = reply.finish_reason or ("tool_calls" if calls else "stop")
        if body.get("stream"):
            return await self._stream(request, body, reply, cid, created, model, calls, finish, usage)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content if not calls or reply.content else None}
        if calls:
            message["tool_calls"] = calls
        if reply.body is not None:
            return web.Response(body=reply.body, content_type="application/json")
        out = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
        if reply.malformed is not None:
            status = 201 if reply.malformed == "error_beside_tool_calls" else 200
            return web.Response(status=status, body=malformed_payload(reply.malformed, out, "message"), content_type="application/json", headers=reply.headers)
        return web.Response(body=orjson.dumps(out), content_type="application/json", headers=reply.headers)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply, cid: str, created: int, model: str, calls: list[dict[str, Any]], finish: str, usage: dict[str, int]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **reply.headers})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return orjson.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                }
            )

        if reply.comment is not None:
            await resp.write(b": " + reply.comment + b"\n\n")
        if reply.raw_events is not None:
            events = list(reply.raw_events)
        else:
            events = [chunk({"role": "assistant", "content": ""})]
            if reply.content:
                words = reply.content.split(" ")
                for i, w in enumerate(words):
                    events.append(chunk({"content": w if i == 0 else " " + w}))
            for i, c in enumerate(calls):
                events.append(chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}]}))
                args = c["function"]["arguments"]
                step = max(1, len(args) // 3)
                for j in range(0, len(args), step):
                    events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j : j + step]}}]}))
            events.append(chunk({}, finish))
            opts = body.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                events.append(orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}))
            events.append(b"[DONE]")
            if reply.malformed is not None:
                base = orjson.loads(chunk({"content": " more"}))
                events.insert(min(reply.malformed_after, len(events) - 1), malformed_payload(reply.malformed, base, "delta"))
        try:
            for n, payload in enumerate(events):
                if reply.cut_after is not None and n >= reply.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
                await resp.write(b"data: " + payload + b"\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        return resp


def _first(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The message (``where="message"``) or delta (``"delta"``) of choice 0."""
    part: dict[str, Any] = obj["choices"][0][where]
    return part


def _call(where: str, **overrides: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"id": "call_bad", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    if where == "delta":
        call["index"] = 0
    call.update(overrides)
    return call


def _error_beside_tool_calls(obj: dict[str, Any], where: str) -> Any:
    _first(obj, where)["tool_calls"] = [_call(where)]
    obj["error"] = {"message": "the model failed half-way", "type": "server_error", "code": None, "param": None}
    return obj


def _error_only(obj: dict[str, Any], where: str) -> Any:
    return {"error": {"message": "overloaded", "type": "server_error", "code": None, "param": None}}


def _choices_missing(obj: dict[str, Any], where: str) -> Any:
    del obj["choices"]
    return obj


def _message_missing(obj: dict[str, Any], where: str) -> Any:
    if where == "message":
        del obj["choices"][0]["message"]
    else:
        obj["choices"][0]["delta"] = "more"
    return obj


def _set_first(key: str, value: Any) -> Callable[[dict[str, Any], str], Any]:
    def mutate(obj: dict[str, Any], where: str) -> Any:
        _first(obj, where)[key] = value
        return obj

    return mutate


def _set_choice(key: str, value: Any) -> Callable[[dict[str, Any], str], Any]:
    def mutate(obj: dict[str, Any], where: str) -> Any:
        obj["choices"][0][key] = value
        return obj

    return mutate


def _set_top(key: str, value: Any) -> Callable[[dict[str, Any], str], Any]:
    def mutate(obj: dict[str, Any], where: str) -> Any:
        obj[key] = value
        return obj

    return mutate


def _with_call(**overrides: Any) -> Callable[[dict[str, Any], str], Any]:
    def mutate(obj: dict[str, Any], where: str) -> Any:
        _first(obj, where)["tool_calls"] = [_call(where, **overrides)]
        return obj

    return mutate


def _duplicate_tool_call_ids(obj: dict[str, Any], where: str) -> Any:
    if where == "message":
        _first(obj, where)["tool_calls"] = [_call(where), _call(where)]
    else:
        _first(obj, where)["tool_calls"] = [_call(where, index=0), _call(where, index=1)]
    return obj


def _negative_usage(obj: dict[str, Any], where: str) -> Any:
    obj["usage"] = {"prompt_tokens": -5, "completion_tokens": 1, "total_tokens": -4}
    return obj


MALFORMED: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "error_beside_tool_calls": _error_beside_tool_calls,
    "error_only": _error_only,
    "not_an_object": lambda obj, where: [obj],
    "choices_object": lambda obj, where: {**obj, "choices": {"0": obj["choices"][0]}},
    "choices_missing": _choices_missing,
    "choices_empty": _set_top("choices", []),
    "choice_index_string": _set_choice("index", "0"),
    "message_missing": _message_missing,
    "role_not_assistant": _set_first("role", "system"),
    "content_number": _set_first("content", 42),
    "tool_calls_object": _set_first("tool_calls", {"0": {"id": "call_bad"}}),
    "tool_call_id_number": _with_call(id=42),
    "tool_call_type_custom": _with_call(type="custom"),
    "arguments_not_string": _with_call(function={"name": "lookup", "arguments": {"q": 1}}),
    "duplicate_tool_call_ids": _duplicate_tool_call_ids,
    "tool_call_index_negative": _with_call(index=-1),
    "unknown_finish_reason": _set_choice("finish_reason", "xyz"),
    "abort_finish_reason": _set_choice("finish_reason", "abort"),
    "negative_usage": _negative_usage,
    "truncated_json": lambda obj, where: obj,  # cut after serialization, in malformed_payload
}
"""Named answers that break the chat-completions wire format (``Reply(malformed=NAME)``)."""


def malformed_payload(name: str, obj: dict[str, Any], where: str) -> bytes:
    """The bytes of ``obj`` (a completion, ``where="message"``, or a chunk, ``"delta"``) with the defect ``name``."""
    raw = orjson.dumps(MALFORMED[name](obj, where))
    if name == "truncated_json":
        return raw[: len(raw) // 2]
    return raw
