"""Helpers every translating adapter shares: refusals that name their rule, checked fields, the chat shape read back.

A translating adapter (Anthropic Messages, OpenAI Responses) validates a
foreign API's body field by field and reads the internal chat answer to
render its own; these are the pieces they have in common.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from llm_warden.proxy import wire
from llm_warden.proxy.errors import BadRequest, WardenError
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.jsonbounds import depth_exceeds
from llm_warden.proxy.protocols.openai_chat import check_model

T = TypeVar("T")

MAX_TOKENS_LIMIT = 2**31 - 1
"""Largest token bound a translated request may set (an int32 in both APIs)."""

MAX_TRANSLATED_DEPTH = 250
"""Deepest nesting a request may have to be translated (the serializer stops at 254 levels)."""

_FIELD = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""A tool name both APIs and chat completions accept."""
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
"""A call or item id Warden relays (no spaces, quotes or control characters)."""


def field_name(value: Any) -> str:
    """A client-given key or type for an error message: shown only when it is a short identifier."""
    return f"'{value}'" if isinstance(value, str) and _FIELD.fullmatch(value) else "(a value that is not a short identifier)"


def schema_error(message: str, param: str) -> BadRequest:
    """400 ``request.schema``: a field of the wrong type, shape or range."""
    return BadRequest(f"{param}: {message}", param=param, rule="request.schema")


def unsupported(message: str, param: str) -> BadRequest:
    """400 ``protocol.unsupported``: a feature the translation cannot carry faithfully."""
    return BadRequest(f"{param}: {message}; Warden refuses what it cannot translate faithfully", param=param, rule="protocol.unsupported")


def number(body: dict[str, Any], key: str, low: float, high: float) -> float | int | None:
    """``body[key]``: absent/null, or a number within ``[low, high]``."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
        raise schema_error(f"must be a number from {low:g} to {high:g}", key)
    return v


def string(v: Any, param: str, *, empty: bool = True) -> str:
    """``v`` when it is a string (non-empty unless ``empty``)."""
    if not isinstance(v, str) or (not empty and not v):
        raise schema_error("must be a string" if empty else "must be a non-empty string", param)
    return v


def known_keys(block: dict[str, Any], allowed: frozenset[str], param: str) -> None:
    """Fail closed on a key the translation does not know."""
    for k in block:
        if k not in allowed:
            raise unsupported(f"the field {field_name(k)} is not one this translation knows", param)


def text_of(content: Any) -> str:
    """The text of a chat ``content``: a string, or the ``text`` parts of a list (other parts are not text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def calls_of(message: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(id, name, arguments)`` of a chat message's or delta's tool calls (a legacy ``function_call`` too)."""
    out: list[tuple[str, str, str]] = []
    fc = message.get("function_call")
    if isinstance(fc, dict):
        out.append(("function_call", str(fc.get("name") or ""), str(fc.get("arguments") or "")))
    tcs = message.get("tool_calls")
    if isinstance(tcs, list):
        for i, tc in enumerate(tcs):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                args = fn.get("arguments")
                out.append((str(tc.get("id") or f"call_{i}"), str(fn.get("name") or ""), args if isinstance(args, str) else ""))
    return out


def translate_body(ex: Exchange, body: dict[str, Any], depth: int, translate: Callable[[dict[str, Any]], T]) -> T:
    """The parse stage of a translating adapter: bounded nesting, the model, then the API's own translation.

    A refusal marks the body refused under its rule (it is then recorded by
    size and digest only).
    """
    try:
        if depth_exceeds(body, ex.raw_body, depth):
            raise BadRequest(f"request body nests deeper than {depth} levels", rule="request.json_depth")
        ex.model = check_model(body.get("model"))
        return translate(body)
    except WardenError as e:
        ex.body_refused = e.rule or "request.schema"
        raise


def adopt(ex: Exchange, chat_body: dict[str, Any], stream: bool) -> None:
    """Set the translated chat body as the exchange's internal body (the client's body, as sent upstream until a hook changes it)."""
    ex.stream = stream
    ex.client_body = chat_body
    ex.body = chat_body
    ex.body_modified = True


def checked_completion(ex: Exchange, body: bytes, render_error: Callable[[str], WardenError]) -> dict[str, Any]:
    """The whole answer to render, as the response hooks left it, checked against the chat wire format."""
    answer = ex.response_body
    if not isinstance(answer, dict):
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise render_error("the answer is not JSON") from None
    why = wire.check_completion(answer)
    if why is not None:
        raise render_error(why)
    assert isinstance(answer, dict)
    return answer


def function_tool(t: dict[str, Any], parameters: dict[str, Any] | None, param: str) -> dict[str, Any]:
    """A chat function tool from a foreign tool's ``name``, ``description`` and ``strict`` (checked) and its parameters schema."""
    name = t.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise schema_error("name must be 1 to 128 letters, digits, '_' or '-'", f"{param}.name")
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    desc = t.get("description")
    if desc is not None:
        fn["description"] = string(desc, f"{param}.description")
    strict = t.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise schema_error("strict must be a boolean", f"{param}.strict")
        fn["strict"] = strict
    return {"type": "function", "function": fn}


def first_choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of a chunk's ``choices`` for the first choice (index 0): the only one an adapter renders."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [ch for ch in choices if isinstance(ch, dict) and ch.get("index", 0) == 0]
