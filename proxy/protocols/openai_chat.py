"""The OpenAI formats: chat completions (the internal representation itself) and the relayed routes.

:class:`OpenAIChat` is the identity adapter: the client's body is already
the internal chat body (sent upstream as the client's bytes unless a hook
changed it), answers and stream events are relayed as the provider sent
them, and errors are ``{"error": {"message", "type", "code", "param"}}``.
:class:`OpenAIRelay` serves every other route (embeddings, models,
feedback, pass-through): the same error format, a body checked only for its
``model``.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_warden.proxy import sse
from llm_warden.proxy.errors import BadRequest, WardenError, error_body
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.protocols.base import Bounds, Protocol, StreamRenderer

MAX_MODEL_CHARS = 256


def check_model(model: Any) -> str:
    """A request's ``model``: a non-empty string of at most 256 printable characters (it becomes a header and a label)."""
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model", rule="request.schema")
    if len(model) > MAX_MODEL_CHARS or not model.isprintable():
        raise BadRequest(f"'model' must be at most {MAX_MODEL_CHARS} printable characters", param="model", rule="request.model")
    return model


def check_chat(ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
    """The chat body's shape as far as the flow relies on it: messages, stream, tools (bounded)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a non-empty list of message objects", param="messages", rule="request.schema")
    if len(messages) > bounds.max_messages:
        raise BadRequest(f"'messages' has more than {bounds.max_messages} entries", param="messages", rule="request.max_messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream", rule="request.schema")
    for key in ("tools", "functions"):
        tools = body.get(key)
        if tools is not None:
            if not isinstance(tools, list):
                raise BadRequest(f"'{key}' must be a list", param=key, rule="request.schema")
            if len(tools) > bounds.max_tools:
                raise BadRequest(f"'{key}' has more than {bounds.max_tools} entries", param=key, rule="request.max_tools")
    ex.stream = bool(stream)


class OpenAIStream(StreamRenderer):
    """Chat-completions SSE: events relayed byte for byte unless changed, ``[DONE]`` at the end."""

    __slots__ = ()

    def event(self, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        return raw if raw is not None else sse.encode_json(chunk)

    def keepalive(self, raw: bytes) -> bytes | None:
        return raw

    def end(self, usage_chunk: dict[str, Any] | None, usage: dict[str, int] | None) -> list[bytes]:
        if usage_chunk is None:
            return [sse.DONE_EVENT]
        out = dict(usage_chunk)
        if usage is not None:
            out["usage"] = usage
        return [sse.encode_json(out), sse.DONE_EVENT]

    def error(self, err: WardenError) -> bytes:
        return b"data: " + error_body(err) + b"\n\n"


_STREAM = OpenAIStream()


class OpenAIRelay(Protocol):
    """Routes Warden relays without interpreting (embeddings, models, feedback, pass-through)."""

    name = "openai"

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        ex.client_body = ex.body = body
        if "model" in body:
            ex.model = check_model(body.get("model"))

    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        if ex.response_modified and ex.response_body is not None:
            return orjson.dumps(ex.response_body)
        return body

    def error_body(self, ex: Exchange, err: WardenError) -> bytes:
        return error_body(err)

    def stream(self, ex: Exchange) -> StreamRenderer:
        return _STREAM


class OpenAIChat(OpenAIRelay):
    """``POST /v1/chat/completions``: the internal representation, so translation is the identity."""

    name = "openai.chat"

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        ex.client_body = ex.body = body
        ex.model = check_model(body.get("model"))
        check_chat(ex, body, bounds)
