"""The provider's chat-completions wire format: is a 2xx answer what it claims to be?

Warden judges tool calls, counts tokens and relays finish reasons from the
provider's answer, so an answer that does not match the OpenAI
chat-completions format must not be relayed as if it did.  Two checks, one
per shape, each returning ``None`` for a well-formed value or a short reason
naming the field and what is wrong with it (the value itself is never
repeated, except an unknown ``finish_reason`` or ``role`` that is a short
identifier):

- :func:`check_completion`: a non-streamed ``chat.completion``;
- :func:`check_chunk`: one streamed ``chat.completion.chunk`` (the JSON of one
  SSE ``data:`` payload other than ``[DONE]``).

Strict where Warden's judgement depends on the structure:

- ``choices`` is a list of objects, each with a distinct integer ``index``; a
  non-streamed answer has at least one choice (the OpenAI API never returns
  none; a stream's usage chunk and Azure's ``prompt_filter_results`` chunk
  legitimately carry ``choices: []``);
- a message (non-streamed) is an object; a tool call in it has a string
  ``id`` (distinct within the message), ``type`` ``"function"`` and a
  ``function`` object with string ``name`` and string ``arguments``; a legacy
  ``function_call`` has string ``name`` and ``arguments``;
- a tool-call delta (streamed) is an object whose ``index``, when present, is
  a non-negative integer and whose ``id``, ``type`` (``"function"``),
  ``function.name`` and ``function.arguments`` are strings when present; one
  chunk does not give the same ``id`` to two indexes (across chunks the check
  is stateless: the assembler sees the whole stream);
- ``finish_reason`` is one of :data:`FINISH_REASONS`, one of the documented
  vendor aliases in :data:`VENDOR_FINISH_REASONS`, or null.  ``abort`` (vLLM:
  the engine aborted the request) and ``error`` (vLLM, Mistral: generation
  failed) say the answer is incomplete and are reported as such;
- ``usage``'s ``prompt_tokens``, ``completion_tokens`` and ``total_tokens``
  are integers in ``0 .. 2**53-1`` (limits charge them; a negative count would
  refund tokens, a huge one overflow a 64-bit counter);
- an ``error`` object (not null) in a 2xx answer or in a stream event is
  malformed: the provider says it failed, whatever else the body holds.

Liberal where real providers legitimately differ (vLLM, Ollama, TGI, Azure,
Mistral, Gemini's OpenAI endpoint, OpenAI itself):

- unknown keys anywhere are fine (``system_fingerprint``, ``service_tier``,
  ``prompt_filter_results``, ``content_filter_results``, ``reasoning_content``,
  ``x_groq``, ``stop_reason``...), and ``id``, ``created`` and ``object`` are
  not judged beyond ``object`` being a string (Azure sends ``""`` in its first
  stream chunk, early TGI ``"text_completion"``);
- null is the same as absent for every optional field (OpenAI sends
  ``"usage": null`` in each chunk when ``include_usage`` is on; vLLM
  ``"tool_calls": []`` and ``"prompt_tokens_details": null``);
- ``message.role`` may be absent (it is the assistant's by position) but, when
  present, is ``"assistant"``;
- ``content`` is a string, null or a list of content parts (Mistral's
  reasoning models answer with ``text`` and ``thinking`` parts): each part an
  object with a string ``type`` (a ``text`` part has a string ``text``);
- a streamed choice may lack ``delta`` (Azure's content-filter annotation
  chunks), and a tool-call delta may lack ``index`` (Gemini's OpenAI
  endpoint; :class:`proxy.tooling.StreamedCalls` then follows the ``id``);
- a tool call with ``finish_reason`` ``stop`` and ``tool_calls`` without
  calls are both fine (vLLM and Ollama do the first);
- other ``usage`` entries (Groq's float timings, ``*_tokens_details``) are not
  judged beyond numbers being non-negative.

Both run on every answer and every stream event, so they are written for
speed: type identity tests (``orjson`` yields exact ``dict``/``list``/``str``/
``int``), and the field path is built only when something is wrong.
``bench/wire.py`` measures them (about as long as ``orjson.loads`` of the
same answer: 0.4-0.7 µs per chunk, 1-2.5 µs per answer).
"""

from __future__ import annotations

import re
from typing import Any

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
"""The OpenAI values of ``finish_reason``."""

VENDOR_FINISH_REASONS = frozenset({"eos_token", "stop_sequence", "model_length"})
"""Tolerated vendor values: ``eos_token`` and ``stop_sequence`` (text-generation-inference
before its PR #2344 of August 2024, meaning ``stop``) and ``model_length`` (Mistral: the
context is full, like ``length``).  No other server in common use sends its own value
(vLLM, Ollama, llama.cpp, Azure and Gemini's OpenAI endpoint use the OpenAI ones)."""

FAILED_FINISH_REASONS = frozenset({"abort", "error"})
"""Values by which a provider says the answer is incomplete (vLLM ``abort`` / ``error``, Mistral ``error``)."""

MAX_TOKEN_COUNT = 2**53 - 1
"""Largest token count accepted in ``usage`` (exact in a double; far below a 64-bit counter's limit)."""

_USAGE_COUNTERS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SHORT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,32}")


def check_completion(obj: object) -> str | None:
    """``None`` when ``obj`` (a parsed non-streamed 2xx answer) is a well-formed ``chat.completion``, else why not."""
    if type(obj) is not dict:
        return "the answer is not a JSON object"
    if obj.get("error") is not None:
        return "an error object in a 2xx answer"
    choices = obj.get("choices")
    if type(choices) is not list:
        return "choices is missing" if choices is None else "choices is not a list"
    if not choices:
        return "choices is empty"
    for i, ch in enumerate(choices):
        if type(ch) is not dict:
            return f"choices[{i}] is not an object"
        why = _index(ch, i)
        if why is not None:
            return why
        msg = ch.get("message")
        if type(msg) is not dict:
            return f"choices[{i}].message is missing" if msg is None else f"choices[{i}].message is not an object"
        why = _message(msg, i)
        if why is not None:
            return why
        fr = ch.get("finish_reason")
        if fr is not None and (type(fr) is not str or fr not in FINISH_REASONS):
            why = _finish_reason(fr, i)
            if why is not None:
                return why
    if len(choices) > 1:
        why = _distinct_indexes(choices)
        if why is not None:
            return why
    return _envelope(obj)


def check_chunk(obj: object) -> str | None:
    """``None`` when ``obj`` (one parsed stream event) is a well-formed ``chat.completion.chunk``, else why not."""
    if type(obj) is not dict:
        return "the stream event is not a JSON object"
    if obj.get("error") is not None:
        return "an error object in a stream event"
    choices = obj.get("choices")
    if type(choices) is not list:
        return "choices is missing" if choices is None else "choices is not a list"
    for i, ch in enumerate(choices):
        if type(ch) is not dict:
            return f"choices[{i}] is not an object"
        why = _index(ch, i)
        if why is not None:
            return why
        delta = ch.get("delta")
        if delta is not None:
            if type(delta) is not dict:
                return f"choices[{i}].delta is not an object"
            if delta:
                why = _delta(delta, i)
                if why is not None:
                    return why
        fr = ch.get("finish_reason")
        if fr is not None and (type(fr) is not str or fr not in FINISH_REASONS):
            why = _finish_reason(fr, i)
            if why is not None:
                return why
    if len(choices) > 1:
        why = _distinct_indexes(choices)
        if why is not None:
            return why
    return _envelope(obj)


def _index(ch: dict[str, Any], i: int) -> str | None:
    idx = ch.get("index")
    if type(idx) is int and idx >= 0:
        return None
    return f"choices[{i}].index is missing" if idx is None else f"choices[{i}].index is not a non-negative integer"


def _distinct_indexes(choices: list[Any]) -> str | None:
    seen = set()
    for i, ch in enumerate(choices):
        idx = ch["index"]
        if idx in seen:
            return f"choices[{i}].index repeats an earlier choice's index"
        seen.add(idx)
    return None


def _finish_reason(fr: object, i: int) -> str | None:
    """Why a ``finish_reason`` outside :data:`FINISH_REASONS` is refused (None for a tolerated vendor value)."""
    if type(fr) is not str:
        return f"choices[{i}].finish_reason is not a string"
    if fr in VENDOR_FINISH_REASONS:
        return None
    if fr in FAILED_FINISH_REASONS:
        return f"choices[{i}].finish_reason '{fr}': the provider did not complete the answer"
    if _SHORT_NAME.fullmatch(fr):
        return f"unknown finish_reason '{fr}' in choices[{i}]"
    return f"unknown finish_reason in choices[{i}]"


def _envelope(obj: dict[str, Any]) -> str | None:
    """The fields around the choices: ``usage``, ``model`` and ``object``."""
    usage = obj.get("usage")
    if usage is not None:
        if type(usage) is not dict:
            return "usage is not an object"
        why = _usage(usage)
        if why is not None:
            return why
    model = obj.get("model")
    if model is not None and type(model) is not str:
        return "model is not a string"
    kind = obj.get("object")
    if kind is not None and type(kind) is not str:
        return "object is not a string"
    return None


def _usage(usage: dict[str, Any]) -> str | None:
    for k in _USAGE_COUNTERS:
        v = usage.get(k)
        if v is not None and not (type(v) is int and 0 <= v <= MAX_TOKEN_COUNT):
            return f"usage.{k} is not a token count (an integer from 0 to 2**53-1)"
    for k, v in usage.items():
        t = type(v)
        if (t is int or t is float) and not v >= 0:  # "not >=": NaN is refused too
            return f"usage.{k} is negative"
        if t is dict:
            for kk, vv in v.items():
                tt = type(vv)
                if (tt is int or tt is float) and not vv >= 0:
                    return f"usage.{k}.{kk} is negative"
    return None


def _role(role: object, where: str) -> str:
    if type(role) is str and _SHORT_NAME.fullmatch(role):
        return f"{where}.role is '{role}', not 'assistant'"
    return f"{where}.role is not 'assistant'"


def _content(content: object, where: str) -> str | None:
    """``content`` is a string, null or a list of content parts."""
    if content is None or type(content) is str:
        return None
    if type(content) is not list:
        return f"{where}.content is not a string, null or a list of parts"
    for j, part in enumerate(content):
        if type(part) is not dict:
            return f"{where}.content[{j}] is not an object"
        kind = part.get("type")
        if type(kind) is not str:
            return f"{where}.content[{j}].type is not a string"
        if kind == "text" and type(part.get("text")) is not str:
            return f"{where}.content[{j}].text is not a string"
    return None


def _message(msg: dict[str, Any], i: int) -> str | None:
    role = msg.get("role")
    if role is not None and role != "assistant":
        return _role(role, f"choices[{i}].message")
    content = msg.get("content")
    if content is not None and type(content) is not str:
        why = _content(content, f"choices[{i}].message")
        if why is not None:
            return why
    refusal = msg.get("refusal")
    if refusal is not None and type(refusal) is not str:
        return f"choices[{i}].message.refusal is not a string"
    calls = msg.get("tool_calls")
    if calls is not None:
        if type(calls) is not list:
            return f"choices[{i}].message.tool_calls is not a list"
        if calls:
            why = _tool_calls(calls, i)
            if why is not None:
                return why
    fc = msg.get("function_call")
    if fc is not None:
        where = f"choices[{i}].message.function_call"
        if type(fc) is not dict:
            return f"{where} is not an object"
        if type(fc.get("name")) is not str:
            return f"{where}.name is not a string"
        if type(fc.get("arguments")) is not str:
            return f"{where}.arguments is not a string"
    return None


def _tool_calls(calls: list[Any], i: int) -> str | None:
    ids: set[str] | None = set() if len(calls) > 1 else None
    for j, tc in enumerate(calls):
        if type(tc) is not dict:
            return f"choices[{i}].message.tool_calls[{j}] is not an object"
        call_id = tc.get("id")
        if type(call_id) is not str:
            return f"choices[{i}].message.tool_calls[{j}].id is not a string"
        if ids is not None:
            if call_id in ids:
                return f"choices[{i}].message.tool_calls[{j}].id repeats an earlier call's id"
            ids.add(call_id)
        if tc.get("type") != "function":
            return f"choices[{i}].message.tool_calls[{j}].type is not 'function'"
        fn = tc.get("function")
        if type(fn) is not dict:
            return f"choices[{i}].message.tool_calls[{j}].function is not an object"
        if type(fn.get("name")) is not str:
            return f"choices[{i}].message.tool_calls[{j}].function.name is not a string"
        if type(fn.get("arguments")) is not str:
            return f"choices[{i}].message.tool_calls[{j}].function.arguments is not a string"
    return None


def _delta(delta: dict[str, Any], i: int) -> str | None:
    role = delta.get("role")
    if role is not None and role != "assistant":
        return _role(role, f"choices[{i}].delta")
    content = delta.get("content")
    if content is not None and type(content) is not str:
        why = _content(content, f"choices[{i}].delta")
        if why is not None:
            return why
    refusal = delta.get("refusal")
    if refusal is not None and type(refusal) is not str:
        return f"choices[{i}].delta.refusal is not a string"
    calls = delta.get("tool_calls")
    if calls is not None:
        if type(calls) is not list:
            return f"choices[{i}].delta.tool_calls is not a list"
        for j, tc in enumerate(calls):
            why = _tool_call_delta(tc, i, j)
            if why is not None:
                return why
        if len(calls) > 1:
            why = _distinct_delta_ids(calls, i)
            if why is not None:
                return why
    fc = delta.get("function_call")
    if fc is not None:
        where = f"choices[{i}].delta.function_call"
        if type(fc) is not dict:
            return f"{where} is not an object"
        for k in ("name", "arguments"):
            v = fc.get(k)
            if v is not None and type(v) is not str:
                return f"{where}.{k} is not a string"
    return None


def _distinct_delta_ids(calls: list[Any], i: int) -> str | None:
    """Within one chunk, one ``id`` names one call: the same id on two indexes is ambiguous."""
    owner: dict[str, object] = {}
    for j, tc in enumerate(calls):
        call_id = tc.get("id")
        if call_id:
            idx = tc.get("index")
            if owner.setdefault(call_id, idx) != idx:
                return f"choices[{i}].delta.tool_calls[{j}].id names another call of the same chunk"
    return None


def _tool_call_delta(tc: object, i: int, j: int) -> str | None:
    if type(tc) is not dict:
        return f"choices[{i}].delta.tool_calls[{j}] is not an object"
    idx = tc.get("index")
    if idx is not None and not (type(idx) is int and idx >= 0):
        return f"choices[{i}].delta.tool_calls[{j}].index is not a non-negative integer"
    call_id = tc.get("id")
    if call_id is not None and type(call_id) is not str:
        return f"choices[{i}].delta.tool_calls[{j}].id is not a string"
    kind = tc.get("type")
    if kind is not None and kind != "function":
        return f"choices[{i}].delta.tool_calls[{j}].type is not 'function'"
    fn = tc.get("function")
    if fn is not None:
        if type(fn) is not dict:
            return f"choices[{i}].delta.tool_calls[{j}].function is not an object"
        name = fn.get("name")
        if name is not None and type(name) is not str:
            return f"choices[{i}].delta.tool_calls[{j}].function.name is not a string"
        args = fn.get("arguments")
        if args is not None and type(args) is not str:
            return f"choices[{i}].delta.tool_calls[{j}].function.arguments is not a string"
    return None
