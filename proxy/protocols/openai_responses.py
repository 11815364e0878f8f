"""The OpenAI Responses API (``POST /v1/responses``) over an OpenAI-compatible chat upstream.

Requests are validated and translated into the internal chat body by
:mod:`proxy.protocols.responses_request`; this module renders the other
way: a ``chat.completion`` as a ``response`` object (``output`` items:
a ``message`` with ``output_text``/``refusal`` parts, one ``function_call``
item per judged call; ``usage``; ``status`` and ``incomplete_details``),
and ``chat.completion.chunk`` events as the Responses stream of typed
events, each with its ``sequence_number``:

``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ... /
``response.refusal.delta`` ..., ``response.output_text.annotation.added``,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, the function-call items
(``response.function_call_arguments.delta`` / ``.done``), and one terminal
event: ``response.completed`` or ``response.incomplete`` — or, when the
stream goes bad after the 200, ``error`` followed by ``response.failed``.

Warden keeps no state on any server for this API: every response says
``"store": false``.  Errors are OpenAI's ``{"error": {...}}`` (the chat
adapter's), a relayed provider error keeps its status and body.

Citations: the chat answer's own ``annotations`` (``url_citation``) are
carried; the ``[n]`` markers retrieval mapped to documents
(``Exchange.citations``) become ``file_citation`` annotations whose
``file_id`` is the Warden document id.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from llm_warden.proxy.errors import WardenError
from llm_warden.proxy.exchange import CITATION_MARKER, Exchange, StateKey
from llm_warden.proxy.protocols.base import Bounds, StreamRenderer
from llm_warden.proxy.protocols.common import (
    MAX_TRANSLATED_DEPTH,
    adopt,
    calls_of,
    checked_completion,
    first_choices,
    text_of,
    translate_body,
)
from llm_warden.proxy.protocols.openai_chat import OpenAIRelay
from llm_warden.proxy.protocols.responses_request import ResponsesRequest, translate

NAME = "openai.responses"
REQUEST = StateKey("openai.responses", ResponsesRequest)
"""What the response object echoes of the client's request (set by :meth:`OpenAIResponses.parse`)."""

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""``finish_reason`` → ``incomplete_details.reason``; every other reason completes the response."""


def _render_error(message: str) -> WardenError:
    return WardenError(f"the answer cannot be rendered as a response: {message}", status=502, type="api_error", code="upstream_unavailable", rule="protocol.render")


def _suffix(ex: Exchange) -> str:
    return ex.request_id.removeprefix("req_")


def response_id(ex: Exchange) -> str:
    """The response ``id``: the exchange's request id, so a response leads to its audit record."""
    return "resp_" + _suffix(ex)


def _message_id(ex: Exchange) -> str:
    return "msg_" + _suffix(ex)


def _call_item_id(ex: Exchange, i: int) -> str:
    return f"fc_{_suffix(ex)}_{i}"


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def render_usage(totals: Any, details: Any) -> dict[str, Any] | None:
    """The Responses ``usage`` from chat totals (``None``: the provider reported none); details from one provider ``usage``."""
    if not isinstance(totals, dict):
        return None
    d = details if isinstance(details, dict) else {}
    prompt_details = d.get("prompt_tokens_details")
    completion_details = d.get("completion_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    prompt, completion = _int(totals.get("prompt_tokens")), _int(totals.get("completion_tokens"))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _int(totals.get("total_tokens")) or prompt + completion,
    }


def text_annotations(ex: Exchange, text: str, provided: Any) -> list[dict[str, Any]]:
    """The ``output_text`` annotations: the provider's ``url_citation``s, then Warden's document citations in text order."""
    out: list[dict[str, Any]] = []
    if isinstance(provided, list):
        for a in provided:
            u = a.get("url_citation") if isinstance(a, dict) and a.get("type") == "url_citation" else None
            if isinstance(u, dict) and isinstance(u.get("url"), str):
                out.append({
                    "type": "url_citation", "start_index": _int(u.get("start_index")), "end_index": _int(u.get("end_index")),
                    "title": u["title"] if isinstance(u.get("title"), str) else "", "url": u["url"],
                })  # fmt: skip
    cited = {c.n: c.doc_id for c in ex.citations if c.valid and c.doc_id is not None}
    if not cited or not text:
        return out
    titles = {c.doc_id: c.title for c in ex.retrieved if c.injected and c.title}
    for m in CITATION_MARKER.finditer(text):
        for part in m.group(1).split(","):
            doc = cited.get(int(part))
            if doc is not None:
                out.append({"type": "file_citation", "file_id": doc, "filename": titles.get(doc, doc), "index": m.end()})
    return out


def _status(finish: str | None) -> tuple[str, dict[str, str] | None]:
    reason = INCOMPLETE.get(finish or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def response_object(ex: Exchange, model: Any, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A ``response`` object: the request's echo (stored on the exchange at parse) with this state."""
    echo = ex.slots.get(REQUEST) or ResponsesRequest()
    return {
        "id": response_id(ex),
        "object": "response",
        "created_at": int(ex.wall_time),
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "max_tool_calls": echo.max_tool_calls,
        "model": model if isinstance(model, str) else ex.model,
        "output": output,
        "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": None,
        "prompt_cache_key": echo.prompt_cache_key,
        "reasoning": echo.reasoning or {"effort": None, "summary": None},
        "safety_identifier": echo.safety_identifier,
        "service_tier": echo.service_tier,
        "store": False,
        "temperature": echo.temperature,
        "text": echo.text,
        "tool_choice": echo.tool_choice,
        "tools": echo.tools,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": echo.user,
        "metadata": echo.metadata,
    }


def render_response(ex: Exchange, completion: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` (checked against the wire format) as a ``response`` object."""
    choice = completion["choices"][0]
    msg = choice.get("message") or {}
    status, incomplete = _status(choice.get("finish_reason"))
    output: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    text = text_of(msg.get("content"))
    if text:
        parts.append({"type": "output_text", "text": text, "annotations": text_annotations(ex, text, msg.get("annotations")), "logprobs": []})
    if isinstance(msg.get("refusal"), str) and msg["refusal"]:
        parts.append({"type": "refusal", "refusal": msg["refusal"]})
    if parts:
        output.append({"id": _message_id(ex), "type": "message", "status": status, "role": "assistant", "content": parts})
    for i, (call_id, name, arguments) in enumerate(calls_of(msg)):
        output.append({"id": _call_item_id(ex, i), "type": "function_call", "status": "completed", "call_id": call_id, "name": name, "arguments": arguments})
    totals = ex.usage.as_dict() if ex.usage is not None else completion.get("usage")
    out = response_object(ex, completion.get("model"), status, output, render_usage(totals, completion.get("usage")))
    out["incomplete_details"] = incomplete
    return out


def _delta_head(kind: str, where: dict[str, Any]) -> bytes:
    """The bytes of a text or refusal delta event up to its ``delta`` value."""
    name = "response.output_text.delta" if kind == "output_text" else "response.refusal.delta"
    fields = orjson.dumps({"type": name, **where})[:-1]
    return b"event: " + name.encode() + b"\ndata: " + fields + b',"delta":'


def _event(obj: dict[str, Any]) -> bytes:
    kind: str = obj["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class ResponsesStream(StreamRenderer):
    """The Responses stream of one answer, built from the internal chat chunks as they are relayed.

    Text opens a ``message`` item and an ``output_text`` part (a refusal a
    ``refusal`` part) and streams as deltas; each judged tool call closes the
    message and is one ``function_call`` item whose whole arguments arrive
    in one delta.  The message still open at the end is closed after the
    response hooks ran (so retrieval's citations are its annotations), then
    the terminal event carries the whole response with the usage.
    """

    __slots__ = ("ex", "seq", "started", "model", "output", "msg", "part", "pieces", "finish", "usage", "calls", "provided", "delta_head")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.seq = 0
        self.started = False
        self.model: Any = None
        self.output: list[dict[str, Any]] = []
        self.msg: dict[str, Any] | None = None
        self.part: dict[str, Any] | None = None
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None
        self.calls = 0
        self.provided: list[Any] = []
        self.delta_head = b""

    def _emit(self, out: list[bytes], obj: dict[str, Any]) -> None:
        obj["sequence_number"] = self.seq
        self.seq += 1
        out.append(_event(obj))

    def _snapshot(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(self.ex, self.model, status, list(self.output), usage)

    def _start(self, out: list[bytes]) -> None:
        self.started = True
        self._emit(out, {"type": "response.created", "response": self._snapshot("in_progress")})
        self._emit(out, {"type": "response.in_progress", "response": self._snapshot("in_progress")})

    def _where(self) -> dict[str, Any]:
        assert self.msg is not None
        return {"item_id": self.msg["id"], "output_index": len(self.output), "content_index": len(self.msg["content"]) - 1}

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        if self.msg is None:
            self.msg = {"id": _message_id(self.ex), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            self._emit(out, {"type": "response.output_item.added", "output_index": len(self.output), "item": {**self.msg, "content": []}})
        if self.part is None or self.part["type"] != kind:
            self._close_part(out, "completed")
            self.part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []} if kind == "output_text" else {"type": "refusal", "refusal": ""}
            self.msg["content"].append(self.part)
            self._emit(out, {"type": "response.content_part.added", **self._where(), "part": dict(self.part)})
            self.delta_head = _delta_head(kind, self._where())
        self.pieces.append(text)
        # The per-token event, written without building its dict: the same bytes orjson gives for it.
        tail = b',"logprobs":[],"sequence_number":' if kind == "output_text" else b',"sequence_number":'
        out.append(self.delta_head + orjson.dumps(text) + tail + str(self.seq).encode() + b"}\n\n")
        self.seq += 1

    def _close_part(self, out: list[bytes], status: str) -> None:
        part = self.part
        if part is None:
            return
        where = self._where()
        text = "".join(self.pieces)
        self.pieces = []
        if part["type"] == "output_text":
            part["text"] = text
            if status != "failed":
                for i, a in enumerate(text_annotations(self.ex, text, self.provided)):
                    part["annotations"].append(a)
                    self._emit(out, {"type": "response.output_text.annotation.added", **where, "annotation_index": i, "annotation": a})
            self._emit(out, {"type": "response.output_text.done", **where, "text": text, "logprobs": []})
        else:
            part["refusal"] = text
            self._emit(out, {"type": "response.refusal.done", **where, "refusal": text})
        self._emit(out, {"type": "response.content_part.done", **where, "part": dict(part)})
        self.part = None

    def _close_message(self, out: list[bytes], status: str) -> None:
        if self.msg is None:
            return
        self._close_part(out, status)
        self.msg["status"] = "incomplete" if status == "failed" else status
        self._emit(out, {"type": "response.output_item.done", "output_index": len(self.output), "item": self.msg})
        self.output.append(self.msg)
        self.msg = None

    def _call(self, call_id: str, name: str, arguments: str, out: list[bytes]) -> None:
        self._close_message(out, "completed")
        index = len(self.output)
        item = {"id": _call_item_id(self.ex, self.calls), "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""}
        self.calls += 1
        self._emit(out, {"type": "response.output_item.added", "output_index": index, "item": dict(item)})
        self._emit(out, {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index, "delta": arguments})
        self._emit(out, {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index, "name": name, "arguments": arguments})
        item.update(status="completed", arguments=arguments)
        self._emit(out, {"type": "response.output_item.done", "output_index": index, "item": item})
        self.output.append(item)

    def event(self, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        out: list[bytes] = []
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if not self.started:
            self._start(out)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        for ch in first_choices(chunk):
            delta = ch.get("delta")
            if isinstance(delta, dict):
                text = text_of(delta.get("content"))
                if text:
                    self._text("output_text", text, out)
                if isinstance(delta.get("refusal"), str) and delta["refusal"]:
                    self._text("refusal", delta["refusal"], out)
                if isinstance(delta.get("annotations"), list):
                    self.provided.extend(delta["annotations"])
                for call_id, name, arguments in calls_of(delta):
                    self._call(call_id, name, arguments, out)
            if ch.get("finish_reason") is not None:
                self.finish = str(ch["finish_reason"])
        return b"".join(out) if out else None

    def keepalive(self, raw: bytes) -> bytes | None:
        if not self.started:
            out: list[bytes] = []
            self._start(out)
            return b"".join(out)
        return raw

    def end(self, usage_chunk: dict[str, Any] | None, usage: dict[str, int] | None) -> list[bytes]:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        status, incomplete = _status(self.finish)
        self._close_message(out, status)
        reported = usage_chunk.get("usage") if usage_chunk is not None else None
        totals: Any = usage if usage is not None else reported if reported is not None else self.usage
        response = self._snapshot(status, render_usage(totals, reported if len(self.ex.turns) <= 1 else None))
        response["incomplete_details"] = incomplete
        self._emit(out, {"type": "response.completed" if status == "completed" else "response.incomplete", "response": response})
        return out

    def error(self, err: WardenError) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        self._close_message(out, "failed")
        detail = err.to_dict()["error"]
        self._emit(out, {"type": "error", "code": detail.get("code"), "message": detail["message"], "param": detail.get("param")})
        response = self._snapshot("failed")
        response["completed_at"] = None
        response["error"] = {"code": "rate_limit_exceeded" if err.status == 429 else "server_error", "message": detail["message"]}
        self._emit(out, {"type": "response.failed", "response": response})
        return b"".join(out)


class OpenAIResponses(OpenAIRelay):
    """``POST /v1/responses``: the Responses API, translated to and from the internal chat shape (OpenAI-format errors)."""

    name = NAME

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        t = translate_body(ex, body, MAX_TRANSLATED_DEPTH, lambda b: translate(b, bounds))
        adopt(ex, t.body, t.stream)
        ex.slots[REQUEST] = t.echo

    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        if status >= 400:
            return super().render(ex, status, body)
        return orjson.dumps(render_response(ex, checked_completion(ex, body, _render_error)))

    def stream(self, ex: Exchange) -> StreamRenderer:
        return ResponsesStream(ex)
