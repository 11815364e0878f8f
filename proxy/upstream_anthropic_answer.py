"""An Anthropic provider's answers, checked against the Messages wire format and translated into the internal chat shape.

Like :mod:`proxy.wire` for chat completions: Warden judges tool calls,
counts tokens and relays stop reasons from the answer, so an answer that is
not what the Messages API promises is refused (502 ``upstream.protocol``)
before anything of it is relayed.  Reasons name the field, never repeat the
value (except a short identifier such as an unknown block type).

- :func:`completion_of`: a non-streamed ``message`` → a ``chat.completion``;
- :class:`MessagesStream`: the events of a streamed answer (``message_start``,
  ``content_block_start/delta/stop`` with ``text_delta`` / ``input_json_delta``,
  ``message_delta``, ``message_stop``, ``ping``, ``error``) →
  ``chat.completion.chunk`` objects, in order, checking that the events come
  in the order the API defines (one ``message_start`` first; blocks opened at
  the next index, deltas only to an open block of their kind, every block
  closed before ``message_delta``; ``message_stop`` only after it).

Strict where the judgement depends on it: content blocks are ``text`` or
``tool_use`` (Warden never enables thinking or server tools, so any other
block is refused), a ``tool_use`` has string ``id`` and ``name`` (ids
distinct) and an object ``input`` (streamed: the ``input_json_delta``
fragments join into a JSON object), token counts are integers in
``0 .. 2**53-1``, ``stop_reason`` is one the API documents.  Liberal where
the API says clients must be: unknown keys are ignored, and so are unknown
event types ("new event types may be added").  ``pause_turn`` (a server-tool
turn paused) is refused as an incomplete answer.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from llm_warden.proxy.sse import RawEvent, SSEError
from llm_warden.proxy.tooling import MAX_STREAMED_ARGS_BYTES
from llm_warden.proxy.wire import MAX_TOKEN_COUNT

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic ``stop_reason`` → chat ``finish_reason``."""

INCOMPLETE_STOP_REASONS = frozenset({"pause_turn"})
_SHORT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,40}")
KEEPALIVE = b": ping\n\n"
"""What an Anthropic ``ping`` becomes: a keep-alive comment for the renderer."""


class ProviderStreamError(Exception):
    """The provider sent an ``error`` event mid-stream (``message`` is its text, unbounded)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _short(value: object) -> str:
    return f"'{value}'" if isinstance(value, str) and _SHORT_NAME.fullmatch(value) else "(not a short identifier)"


def _count(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_TOKEN_COUNT


def check_usage(usage: object, where: str, *, required: tuple[str, ...]) -> str | None:
    if type(usage) is not dict:
        return f"{where} is not an object"
    for k in required:
        if not _count(usage.get(k)):
            return f"{where}.{k} is not a token count (an integer from 0 to 2**53-1)"
    for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        v = usage.get(k)
        if v is not None and not _count(v):
            return f"{where}.{k} is not a token count (an integer from 0 to 2**53-1)"
    return None


def chat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage as chat usage: cached prompt tokens (written and read) are prompt tokens too."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cached
    completion = usage.get("output_tokens") or 0
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _stop(reason: object, where: str) -> tuple[str | None, str | None]:
    """``(finish_reason, why)`` for a ``stop_reason``."""
    if reason is None:
        return None, None
    fr = STOP_REASONS.get(reason) if type(reason) is str else None
    if fr is not None:
        return fr, None
    if reason in INCOMPLETE_STOP_REASONS:
        return None, f"{where} '{reason}': the provider did not complete the answer"
    if type(reason) is not str:
        return None, f"{where} is not a string"
    return None, f"unknown {where} {_short(reason)}"


def _block_kind(block: object, where: str) -> tuple[str | None, str | None]:
    if type(block) is not dict:
        return None, f"{where} is not an object"
    kind = block.get("type")
    if kind == "text" or kind == "tool_use":
        return kind, None
    if type(kind) is not str:
        return None, f"{where}.type is not a string"
    return None, f"{where} is a {_short(kind)} block, which Warden never asks for (only text and tool_use)"


def completion_of(obj: object) -> tuple[dict[str, Any] | None, str | None]:
    """``(chat.completion, None)`` for a well-formed non-streamed ``message``, else ``(None, why)``."""
    if type(obj) is not dict:
        return None, "the answer is not a JSON object"
    if obj.get("type") == "error" or obj.get("error") is not None:
        return None, "an error object in a 2xx answer"
    if obj.get("type") != "message":
        return None, "type is not 'message'"
    if obj.get("role") != "assistant":
        return None, "role is not 'assistant'"
    for key in ("id", "model"):
        if type(obj.get(key)) is not str:
            return None, f"{key} is not a string"
    content = obj.get("content")
    if type(content) is not list:
        return None, "content is not a list"
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    ids: set[str] = set()
    for i, block in enumerate(content):
        where = f"content[{i}]"
        kind, why = _block_kind(block, where)
        if why is not None:
            return None, why
        assert type(block) is dict
        if kind == "text":
            if type(block.get("text")) is not str:
                return None, f"{where}.text is not a string"
            texts.append(block["text"])
            continue
        call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
        if type(call_id) is not str or type(name) is not str:
            return None, f"{where}: a tool_use needs a string id and name"
        if call_id in ids:
            return None, f"{where}.id repeats an earlier tool_use's id"
        ids.add(call_id)
        if type(arguments) is not dict:
            return None, f"{where}.input is not an object"
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}})
    finish, why = _stop(obj.get("stop_reason"), "stop_reason")
    if why is not None:
        return None, why
    seq = obj.get("stop_sequence")
    if seq is not None and type(seq) is not str:
        return None, "stop_sequence is not a string"
    why = check_usage(obj.get("usage"), "usage", required=("input_tokens", "output_tokens"))
    if why is not None:
        return None, why
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish or ("tool_calls" if calls else "stop")}
    if seq is not None:
        choice["stop_reason"] = seq
    return {
        "id": obj["id"],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": obj["model"],
        "choices": [choice],
        "usage": chat_usage(obj["usage"]),
    }, None


class MessagesStream:
    """One streamed Anthropic answer, event by event, as internal chat chunks (see the module docstring).

    :meth:`feed` returns, per event, chat chunk objects to relay and keep-alive
    comment bytes; it raises :class:`~proxy.sse.SSEError` for a malformed
    event and :class:`ProviderStreamError` for an ``error`` event.  ``done``
    is set by ``message_stop``: a stream that ends before it is incomplete.
    """

    __slots__ = ("done", "started", "stopping", "next_index", "open", "calls", "args", "id", "model", "created", "usage", "held")

    def __init__(self) -> None:
        self.done = False
        self.started = False
        self.stopping = False
        self.next_index = 0
        self.open: dict[int, str] = {}
        """Open blocks: index → ``text`` | ``tool_use``."""
        self.calls: dict[int, int] = {}
        """Block index → tool-call index."""
        self.args: dict[int, list[str]] = {}
        """Block index → the ``input_json_delta`` fragments of an open tool_use (checked when it closes)."""
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.held = 0
        """Bytes of tool-call arguments held (bounded like the chat stream's: ``MAX_STREAMED_ARGS_BYTES``)."""

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [choice]}

    def feed(self, ev: RawEvent) -> list[dict[str, Any] | bytes]:
        if ev.data is None:
            return [ev.raw] if ev.raw.startswith(b":") else []
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            raise SSEError("an upstream event is not JSON") from None
        if type(obj) is not dict:
            raise SSEError("an upstream event is not a JSON object")
        kind = obj.get("type")
        if ev.event is not None and ev.event != kind:
            raise SSEError("an upstream event's data does not have its event's type")
        if self.done:
            return []
        if kind == "error":
            err = obj.get("error")
            message = err.get("message") if isinstance(err, dict) else None
            raise ProviderStreamError(message if isinstance(message, str) else "provider error")
        if kind == "ping":
            return [KEEPALIVE]
        if kind == "message_start":
            return self._message_start(obj)
        if kind not in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"):
            return []  # unknown event types are ignored, as the API asks of its clients; nothing of them is relayed
        if not self.started:
            raise SSEError(f"event {_short(kind)} before message_start")
        if kind == "message_stop":
            if not self.stopping:
                raise SSEError("message_stop before message_delta")
            self.done = True
            return [{"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [], "usage": chat_usage(self.usage)}]
        if self.stopping:
            raise SSEError(f"event {_short(kind)} after message_delta")
        if kind == "message_delta":
            return self._message_delta(obj)
        index = obj.get("index")
        if type(index) is not int:
            raise SSEError(f"{kind}.index is not an integer")
        if kind == "content_block_start":
            return self._block_start(index, obj.get("content_block"))
        if index not in self.open:
            raise SSEError(f"{kind} for a block that is not open")
        if kind == "content_block_delta":
            return self._block_delta(index, obj.get("delta"))
        return self._block_stop(index)

    def _message_start(self, obj: dict[str, Any]) -> list[dict[str, Any] | bytes]:
        if self.started:
            raise SSEError("a second message_start")
        msg = obj.get("message")
        if type(msg) is not dict:
            raise SSEError("message_start.message is not an object")
        if msg.get("role") != "assistant":
            raise SSEError("message_start.message.role is not 'assistant'")
        if type(msg.get("id")) is not str or type(msg.get("model")) is not str:
            raise SSEError("message_start.message needs a string id and model")
        if msg.get("content") not in (None, []):
            raise SSEError("message_start.message.content is not empty")
        usage = msg.get("usage")
        why = check_usage(usage, "message_start.message.usage", required=())
        if why is not None:
            raise SSEError(why)
        assert type(usage) is dict
        self.usage = dict(usage)
        self.started = True
        self.id, self.model = msg["id"], msg["model"]
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, index: int, block: object) -> list[dict[str, Any] | bytes]:
        if index != self.next_index:
            raise SSEError("content_block_start is not at the next block index")
        kind, why = _block_kind(block, "content_block_start.content_block")
        if why is not None:
            raise SSEError(why)
        assert type(block) is dict
        self.next_index += 1
        self.open[index] = str(kind)
        if kind == "text":
            text = block.get("text")
            if type(text) is not str:
                raise SSEError("content_block_start.content_block.text is not a string")
            return [self._chunk({"content": text})] if text else []
        call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
        if type(call_id) is not str or type(name) is not str:
            raise SSEError("content_block_start: a tool_use needs a string id and name")
        if type(arguments) is not dict:
            raise SSEError("content_block_start.content_block.input is not an object")
        call = len(self.calls)
        self.calls[index] = call
        self.args[index] = [orjson.dumps(arguments).decode()] if arguments else []
        delta = {"tool_calls": [{"index": call, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}
        return [self._chunk(delta)]

    def _block_delta(self, index: int, delta: object) -> list[dict[str, Any] | bytes]:
        if type(delta) is not dict:
            raise SSEError("content_block_delta.delta is not an object")
        kind = delta.get("type")
        block = self.open[index]
        if kind == "text_delta" and block == "text":
            text = delta.get("text")
            if type(text) is not str:
                raise SSEError("content_block_delta.delta.text is not a string")
            return [self._chunk({"content": text})] if text else []
        if kind == "input_json_delta" and block == "tool_use":
            part = delta.get("partial_json")
            if type(part) is not str:
                raise SSEError("content_block_delta.delta.partial_json is not a string")
            if part:
                self.args[index].append(part)
                self.held += len(part)
                if self.held > MAX_STREAMED_ARGS_BYTES:
                    raise SSEError(f"the streamed tool-call arguments exceed {MAX_STREAMED_ARGS_BYTES} bytes")
            return []
        raise SSEError(f"a {_short(kind)} delta in a {block} block")

    def _block_stop(self, index: int) -> list[dict[str, Any] | bytes]:
        kind = self.open.pop(index)
        if kind != "tool_use":
            return []
        arguments = "".join(self.args.pop(index)) or "{}"
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            parsed = None
        if type(parsed) is not dict:
            raise SSEError("a tool_use block's input_json_delta fragments do not make a JSON object")
        return [self._chunk({"tool_calls": [{"index": self.calls[index], "function": {"arguments": arguments}}]})]

    def _message_delta(self, obj: dict[str, Any]) -> list[dict[str, Any] | bytes]:
        if self.open:
            raise SSEError("message_delta while a content block is open")
        delta = obj.get("delta")
        if type(delta) is not dict:
            raise SSEError("message_delta.delta is not an object")
        finish, why = _stop(delta.get("stop_reason"), "message_delta.delta.stop_reason")
        if why is not None:
            raise SSEError(why)
        seq = delta.get("stop_sequence")
        if seq is not None and type(seq) is not str:
            raise SSEError("message_delta.delta.stop_sequence is not a string")
        usage = obj.get("usage")
        why = check_usage(usage, "message_delta.usage", required=("output_tokens",))
        if why is not None:
            raise SSEError(why)
        assert type(usage) is dict
        # message_delta's counts are cumulative: they replace message_start's.
        self.usage.update({k: v for k, v in usage.items() if v is not None})
        self.stopping = True
        extra = {"stop_reason": seq} if seq is not None else {}
        return [self._chunk({}, finish or ("tool_calls" if self.calls else "stop"), **extra)]
