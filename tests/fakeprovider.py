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
    stop_sequence: str | None = None

    def __post_init__(self) -> None:
        if self.malformed is not None and self.malformed not in MALFORMED and self.malformed not in ANTHROPIC_MALFORMED:
            known = sorted({*MALFORMED, *ANTHROPIC_MALFORMED})
            raise ValueError(f"unknown malformed answer {self.malformed!r} (known: {', '.join(known)})")


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
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self._anthropic_count_tokens)
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

    def anthropic_requests(self) -> list[Received]:
        """Requests to the native Anthropic Messages endpoint (``POST /v1/messages``)."""
        return [r for r in self.requests if r.path == "/v1/messages"]

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await anthropic_messages(self, request)

    async def _anthropic_count_tokens(self, request: web.Request) -> web.Response:
        return await anthropic_count_tokens(self, request)

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

    async def next_reply(self, request: web.Request) -> tuple[Any, Reply]:
        """Record the request, take the next scripted answer and wait as it says (``hang``, ``delay_s``)."""
        body = await self._record(request)
        reply = self.script.popleft() if self.script else Reply()
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return body, reply

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, reply = await self.next_reply(request)
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
        return await self.send_events(request, resp, reply, [b"data: " + payload + b"\n\n" for payload in events])

    async def send_events(self, request: web.Request, resp: web.StreamResponse, reply: Reply, events: list[bytes]) -> web.StreamResponse:
        """Write whole SSE events as ``reply`` says (``cut_after``, ``chunk_delay_s``); a client that leaves is counted."""
        try:
            for n, event in enumerate(events):
                if reply.cut_after is not None and n >= reply.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if reply.chunk_delay_s:
                    await asyncio.sleep(reply.chunk_delay_s)
                await resp.write(event)
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


# -- the native Anthropic Messages API ------------------------------------------------------------
#
# ``POST /v1/messages`` (JSON and SSE) and ``POST /v1/messages/count_tokens``, answering the same
# scripted :class:`Reply` values as chat completions: ``content`` is one ``text`` block, each of
# ``tool_calls`` a ``tool_use`` block (``arguments`` parsed as its ``input``), ``finish_reason`` an
# Anthropic ``stop_reason`` when given (``end_turn`` / ``tool_use`` otherwise), ``usage`` in the
# chat names (``prompt_tokens`` → ``input_tokens``).  A ``status`` other than 200 answers Anthropic's
# error body (529 ``overloaded_error``...).  Requests without a key (``x-api-key`` or, as the SDK
# now sends it, ``Authorization: Bearer``: 401) or
# ``anthropic-version`` (400) are refused as Anthropic refuses them.  A stream is ``message_start``,
# ``ping``, a text block (one ``text_delta`` per word), one ``tool_use`` block per call (its input in
# three ``input_json_delta`` fragments), ``message_delta`` (stop reason, usage), ``message_stop``;
# ``comment`` adds a ``ping`` first, ``raw_events`` are whole SSE events sent as they are.
# ``malformed`` names one of :data:`ANTHROPIC_MALFORMED`.

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}

ANTHROPIC_MALFORMED = {
    "no_message_stop": "the stream ends after message_delta (no message_stop)",
    "error_event": "an error event (overloaded) after the first text delta",
    "truncated_json": "the body / one event's data cut in the middle",
    "delta_to_closed_block": "a text_delta to a block index that was never opened",
    "tool_input_not_object": "a tool_use input that is a list (streamed: partial_json fragments making a list)",
    "thinking_block": "a thinking block, which Warden never asks for",
    "negative_usage": "usage.output_tokens is -1",
    "unknown_stop_reason": "stop_reason 'xyz'",
    "pause_turn": "stop_reason 'pause_turn' (a server-tool turn paused)",
    "second_message_start": "message_start sent twice",
    "event_name_mismatch": "an event named content_block_delta whose data is a message_delta",
    "before_message_start": "a content_block_start before message_start",
    "unknown_event": "an event type this API version does not define (must be ignored)",
}
"""Named Anthropic answers that break (or, ``unknown_event``, stretch) the Messages wire format."""


def _anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"), "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers={"request-id": "req_fake", **(headers or {})})


def _anthropic_refusal(request: web.Request, body: Any, *, need_max_tokens: bool = True) -> web.Response | None:
    """What Anthropic answers a request without its key, its version header or the required fields."""
    if not request.headers.get("x-api-key") and not request.headers.get("Authorization", "").startswith("Bearer "):
        return _anthropic_error(401, "x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        return _anthropic_error(400, "anthropic-version: header is required")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
        return _anthropic_error(400, "model and messages are required")
    if need_max_tokens and not isinstance(body.get("max_tokens"), int):
        return _anthropic_error(400, "max_tokens: Field required")
    return None


def _anthropic_usage(body: dict[str, Any], reply: Reply, calls: list[tuple[str, str, Any]]) -> tuple[int, int]:
    if reply.usage is not None:
        return reply.usage.get("prompt_tokens", 0), reply.usage.get("completion_tokens", 0)
    prompt = _tokens(orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")]).decode())
    return prompt, _tokens((reply.content or "") + "".join(orjson.dumps(c[2]).decode() for c in calls))


async def anthropic_count_tokens(fp: FakeProvider, request: web.Request) -> web.Response:
    body = await fp._record(request)
    refused = _anthropic_refusal(request, body, need_max_tokens=False)
    if refused is not None:
        return refused
    reply = fp.script.popleft() if fp.script else None
    if reply is not None and reply.status != 200:
        return _anthropic_error(reply.status, reply.error or f"fake error {reply.status}", reply.headers)
    if reply is not None and reply.body is not None:
        return web.Response(body=reply.body, content_type="application/json")
    return web.json_response({"input_tokens": _tokens(orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")]).decode())})


async def anthropic_messages(fp: FakeProvider, request: web.Request) -> web.StreamResponse:
    body, reply = await fp.next_reply(request)
    if reply.status != 200:
        if reply.body is not None:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        return _anthropic_error(reply.status, reply.error or f"fake error {reply.status}", reply.headers)
    refused = _anthropic_refusal(request, body)
    if refused is not None:
        return refused
    if reply.malformed is not None and reply.malformed not in ANTHROPIC_MALFORMED:
        return _anthropic_error(500, f"the fake has no Anthropic form of {reply.malformed!r}")
    model = reply.model or body["model"]
    mid = f"msg_fake{next(_ids)}"
    calls: list[tuple[str, str, Any]] = []
    for i, tc in enumerate(reply.tool_calls or []):
        args = tc.get("arguments", "{}")
        try:
            parsed = orjson.loads(args)
        except orjson.JSONDecodeError:
            parsed = {"unparsed": args}
        calls.append((tc.get("id") or f"toolu_{mid[-6:]}_{i}", tc["name"], parsed))
    stop = reply.finish_reason or ("tool_use" if calls else "end_turn")
    prompt, completion = _anthropic_usage(body, reply, calls)
    defect = reply.malformed
    if body.get("stream"):
        return await _anthropic_stream(fp, request, reply, mid, model, calls, stop, prompt, completion)
    content: list[dict[str, Any]] = []
    if reply.content:
        content.append({"type": "text", "text": reply.content})
    for call_id, name, parsed in calls:
        content.append({"type": "tool_use", "id": call_id, "name": name, "input": parsed})
    usage: dict[str, Any] = {"input_tokens": prompt, "output_tokens": completion, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    out: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content, "stop_reason": stop, "stop_sequence": reply.stop_sequence, "usage": usage}
    if defect == "tool_input_not_object":
        out["content"].append({"type": "tool_use", "id": "toolu_bad", "name": "lookup", "input": [1]})
    elif defect == "thinking_block":
        out["content"].insert(0, {"type": "thinking", "thinking": "hmm", "signature": "sig"})
    elif defect == "negative_usage":
        usage["output_tokens"] = -1
    elif defect in ("unknown_stop_reason", "pause_turn"):
        out["stop_reason"] = "xyz" if defect == "unknown_stop_reason" else "pause_turn"
    raw = orjson.dumps(out)
    if defect == "truncated_json":
        raw = raw[: len(raw) // 2]
    if reply.body is not None:
        raw = reply.body
    return web.Response(body=raw, content_type="application/json", headers={"request-id": "req_" + mid, **reply.headers})


def _sse(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _anthropic_events(reply: Reply, mid: str, model: str, calls: list[tuple[str, str, Any]], stop: str, prompt: int, completion: int) -> list[bytes]:
    defect = reply.malformed
    start = {"type": "message_start", "message": {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}
    events = [_sse("message_start", start), _sse("ping", {"type": "ping"})]
    index = 0
    if reply.content:
        events.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}))
        for i, word in enumerate(reply.content.split(" ")):
            events.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}))
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    if defect == "tool_input_not_object":
        calls = [*calls, ("toolu_bad", "lookup", None)]
    for call_id, name, parsed in calls:
        events.append(_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}}))
        args = "[1, 2]" if parsed is None else orjson.dumps(parsed).decode()
        step = max(1, len(args) // 3)
        for j in range(0, len(args), step):
            events.append(_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": args[j : j + step]}}))
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    usage: dict[str, Any] = {"output_tokens": completion}
    if defect == "negative_usage":
        usage["output_tokens"] = -1
    reason = {"unknown_stop_reason": "xyz", "pause_turn": "pause_turn"}.get(defect or "", stop)
    events.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": reply.stop_sequence}, "usage": usage}))
    if defect != "no_message_stop":
        events.append(_sse("message_stop", {"type": "message_stop"}))
    at = min(reply.malformed_after, len(events) - 1)
    if defect == "error_event":
        events.insert(at, _sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    elif defect == "truncated_json":
        events[at] = events[at][: len(events[at]) // 2] + b"\n\n"
    elif defect == "delta_to_closed_block":
        events.insert(at, _sse("content_block_delta", {"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta", "text": "x"}}))
    elif defect == "thinking_block":
        events.insert(2, _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}))
    elif defect == "second_message_start":
        events.insert(at, events[0])
    elif defect == "event_name_mismatch":
        events.insert(at, _sse("content_block_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}))
    elif defect == "before_message_start":
        events.insert(0, _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
    elif defect == "unknown_event":
        events.insert(at, _sse("content_block_hint", {"type": "content_block_hint", "index": 0, "text": "never relayed"}))
    return events


async def _anthropic_stream(
    fp: FakeProvider, request: web.Request, reply: Reply, mid: str, model: str, calls: list[tuple[str, str, Any]], stop: str, prompt: int, completion: int
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "request-id": "req_" + mid, **reply.headers})
    await resp.prepare(request)
    if reply.raw_events is not None:
        events = [e if e.endswith(b"\n\n") else e + b"\n\n" for e in reply.raw_events]
    else:
        events = _anthropic_events(reply, mid, model, calls, stop, prompt, completion)
    if reply.comment is not None:
        events.insert(0, _sse("ping", {"type": "ping"}))
    return await fp.send_events(request, resp, reply, events)
