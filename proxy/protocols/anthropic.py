"""The Anthropic Messages API (``POST /v1/messages``) over an OpenAI-compatible upstream.

Requests are validated and translated into the internal chat body by
:mod:`proxy.protocols.anthropic_request`; this module renders the other
way: a ``chat.completion`` as a ``message``, ``chat.completion.chunk``
events as the Messages stream (``message_start``, ``ping``,
``content_block_start`` / ``content_block_delta`` (``text_delta``,
``input_json_delta``) / ``content_block_stop``, ``message_delta`` with the
stop reason and usage, ``message_stop``), and every refusal as
``{"type": "error", "error": {"type", "message"}, "request_id"}``.

Status mapping: Warden keeps its own status for every refusal (the rule is
in the message) and picks the error ``type`` Anthropic documents for it:
400/405/409/422 ``invalid_request_error`` (Anthropic: "we may also use this
error type for other 4XX status codes"), 401 ``authentication_error``, 403
``permission_error``, 404 ``not_found_error``, 413 ``request_too_large``,
429 ``rate_limit_error``, 529 ``overloaded_error``, every other 5xx
``api_error``.  A relayed provider error keeps the provider's status and
message in the same shape.

The application's credential may come as ``x-api-key`` (what the
``anthropic`` SDK sends for ``api_key``) or ``Authorization: Bearer``
(``auth_token``); it is the same Warden JWT either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llm_warden.proxy.errors import BadRequest, Unauthorized, WardenError
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.headers import safe_text
from llm_warden.proxy.protocols.anthropic_request import translate
from llm_warden.proxy.protocols.base import Bounds, Protocol, StreamRenderer
from llm_warden.proxy.protocols.common import MAX_TRANSLATED_DEPTH, adopt, checked_completion, first_choices, translate_body
from llm_warden.proxy.protocols.common import calls_of as _calls_of
from llm_warden.proxy.protocols.common import text_of as _text_of

NAME = "anthropic.messages"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
"""Anthropic's documented error type per status; other 4xx are ``invalid_request_error``, other 5xx ``api_error``."""

STOP_REASONS = {
    "stop": "end_turn",
    "eos_token": "end_turn",
    "stop_sequence": "end_turn",
    "length": "max_tokens",
    "model_length": "model_context_window_exceeded",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
"""``finish_reason`` (OpenAI and the vendor values :mod:`proxy.wire` accepts) → ``stop_reason``."""


def error_type(status: int) -> str:
    """The Anthropic error ``type`` for an HTTP status."""
    t = ERROR_TYPES.get(status)
    if t is not None:
        return t
    return "invalid_request_error" if status < 500 else "api_error"


def error_object(ex: Exchange, status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}, "request_id": ex.request_id}


def _render_error(message: str) -> WardenError:
    return WardenError(f"the answer cannot be rendered as an Anthropic message: {message}", status=502, type="api_error", code="upstream_unavailable", rule="protocol.render")


def stop_reason(finish: str | None, vendor_stop: Any, stops: Any, has_calls: bool) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` for a chat ``finish_reason``.

    OpenAI does not say which stop sequence ended an answer; vLLM does
    (``choices[].stop_reason``, the matched string), and then it is
    reported as ``stop_sequence``.  A call with ``finish_reason`` ``stop``
    (vLLM, Ollama) is ``tool_use`` (the application has calls to run, whatever else ended the turn).
    """
    if has_calls and finish in ("stop", "tool_calls", "function_call", "eos_token", None):
        return "tool_use", None
    if finish in ("stop", None) and isinstance(vendor_stop, str) and isinstance(stops, list) and vendor_stop in stops:
        return "stop_sequence", vendor_stop
    if finish is None:
        return "end_turn", None
    return STOP_REASONS.get(finish, "end_turn"), None


def _input(name: str, arguments: str) -> dict[str, Any]:
    """A judged call's arguments as ``tool_use.input`` (the core refused any call whose arguments are not an object)."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _render_error(f"the arguments of a call to {safe_text(name, 64)!r} are not a JSON object")
    return parsed


def _usage(usage: Any) -> dict[str, int]:
    u = usage if isinstance(usage, dict) else {}
    prompt = u.get("prompt_tokens")
    completion = u.get("completion_tokens")
    return {
        "input_tokens": prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0,
        "output_tokens": completion if isinstance(completion, int) and not isinstance(completion, bool) else 0,
    }


def message_id(ex: Exchange) -> str:
    """The ``message.id``: the exchange's request id, so an answer leads to its audit record."""
    return "msg_" + ex.request_id.removeprefix("req_")


def render_message(ex: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` (checked against the wire format) as an Anthropic ``message``."""
    choices = completion["choices"]
    choice = choices[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = _text_of(msg.get("content"))
    if not text and isinstance(msg.get("refusal"), str):
        text = msg["refusal"]
    if text:
        content.append({"type": "text", "text": text})
    calls = _calls_of(msg)
    for call_id, name, arguments in calls:
        content.append({"type": "tool_use", "id": call_id, "name": name, "input": _input(name, arguments)})
    body = ex.body if isinstance(ex.body, dict) else {}
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), body.get("stop"), bool(calls))
    model = completion.get("model")
    return {
        "id": message_id(ex),
        "type": "message",
        "role": "assistant",
        "model": model if isinstance(model, str) else ex.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(completion.get("usage")),
    }


def _event(name: bytes, obj: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


_PING = _event(b"ping", {"type": "ping"})


class AnthropicStream(StreamRenderer):
    """The Messages stream of one answer, built from the internal chat chunks as they are relayed.

    ``message_start`` goes out with the first chunk or keep-alive (its usage
    is zero: an OpenAI-compatible provider reports usage only at the end; the
    totals come in ``message_delta``, as cumulative counts).  Text opens a
    ``text`` block; each judged tool call is one ``tool_use`` block whose
    whole arguments are one ``input_json_delta``.  The stop reason is held
    until the end, after the record: ``message_delta`` then ``message_stop``.
    """

    __slots__ = ("ex", "started", "index", "open", "finish", "vendor_stop", "usage", "calls")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.started = False
        self.index = -1
        self.open = False
        self.finish: str | None = None
        self.vendor_stop: Any = None
        self.usage: Any = None
        self.calls = 0

    def _start(self, model: Any, out: list[bytes]) -> None:
        self.started = True
        message: dict[str, Any] = {
            "id": message_id(self.ex),
            "type": "message",
            "role": "assistant",
            "model": model if isinstance(model, str) else self.ex.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(_event(b"message_start", {"type": "message_start", "message": message}))
        out.append(_PING)

    def _close(self, out: list[bytes]) -> None:
        if self.open:
            out.append(_event(b"content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.open = False

    def _text(self, text: str, out: list[bytes]) -> None:
        if not self.open:
            self.index += 1
            self.open = True
            out.append(_event(b"content_block_start", {"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}}))
        out.append(_event(b"content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}}))

    def _call(self, call_id: str, name: str, arguments: str, out: list[bytes]) -> None:
        self._close(out)
        _input(name, arguments)  # a call that cannot be a tool_use never starts one
        self.index += 1
        self.calls += 1
        block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        out.append(_event(b"content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}))
        out.append(_event(b"content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": {"type": "input_json_delta", "partial_json": arguments}}))
        out.append(_event(b"content_block_stop", {"type": "content_block_stop", "index": self.index}))

    def event(self, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        out: list[bytes] = []
        if not self.started:
            self._start(chunk.get("model"), out)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for ch in first_choices(chunk):
            delta = ch.get("delta")
            if isinstance(delta, dict):
                text = _text_of(delta.get("content"))
                if not text and isinstance(delta.get("refusal"), str):
                    text = delta["refusal"]
                if text:
                    self._text(text, out)
                for call_id, name, arguments in _calls_of(delta):
                    self._call(call_id, name, arguments, out)
            fr = ch.get("finish_reason")
            if fr is not None:
                self.finish = str(fr)
                self.vendor_stop = ch.get("stop_reason")
                self._close(out)
        return b"".join(out) if out else None

    def keepalive(self, raw: bytes) -> bytes | None:
        out: list[bytes] = []
        if not self.started:
            self._start(None, out)
            return b"".join(out)
        return _PING

    def end(self, usage_chunk: dict[str, Any] | None, usage: dict[str, int] | None) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            self._start(None, out)
        self._close(out)
        reported: Any = usage
        if reported is None and usage_chunk is not None:
            reported = usage_chunk.get("usage")
        if reported is None:
            reported = self.usage
        body = self.ex.body if isinstance(self.ex.body, dict) else {}
        reason, sequence = stop_reason(self.finish, self.vendor_stop, body.get("stop"), self.calls > 0)
        out.append(_event(b"message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": _usage(reported)}))
        out.append(_event(b"message_stop", {"type": "message_stop"}))
        return out

    def error(self, err: WardenError) -> bytes:
        return _event(b"error", error_object(self.ex, err.status, err.to_dict()["error"]["message"]))


class AnthropicMessages(Protocol):
    """``POST /v1/messages``: the Anthropic Messages API, translated to and from the internal chat shape."""

    name = NAME
    object_arguments = True

    def credential(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization")
        key = headers.get("x-api-key")
        if key is None:
            return auth
        bearer = "Bearer " + key.strip(" \t")
        if auth is None:
            return bearer
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip(" \t") == key.strip(" \t"):
            return auth
        raise Unauthorized("the request carries two different credentials (Authorization and x-api-key); send one", rule="auth.credentials")

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        if ex.request_headers.get("anthropic-beta"):
            ex.body_refused = "protocol.unsupported"
            raise BadRequest(
                "anthropic-beta: beta features change the request and answer in ways Warden cannot translate faithfully; Warden refuses what it cannot translate",
                param="anthropic-beta",
                rule="protocol.unsupported",
            )
        t = translate_body(ex, body, MAX_TRANSLATED_DEPTH, lambda b: translate(b, bounds))
        adopt(ex, t.body, t.stream)

    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        if status >= 400:
            return orjson.dumps(error_object(ex, status, _provider_message(ex, status, body)))
        return orjson.dumps(render_message(ex, checked_completion(ex, body, _render_error)))

    def error_body(self, ex: Exchange, err: WardenError) -> bytes:
        return orjson.dumps(error_object(ex, err.status, err.to_dict()["error"]["message"]))

    def stream(self, ex: Exchange) -> StreamRenderer:
        return AnthropicStream(ex)

    def headers(self, ex: Exchange) -> dict[str, str]:
        # The anthropic SDK shows this header as the response's ``_request_id``.
        return {"request-id": ex.request_id}


def _provider_message(ex: Exchange, status: int, body: bytes) -> str:
    """The provider's own error message (an OpenAI-format body), clean and bounded."""
    parsed = ex.response_body
    if not isinstance(parsed, dict):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if isinstance(message, str) and message:
        return f"the provider answered {status}: {safe_text(message, 1000)}"
    return f"the provider answered {status}"
