"""An upstream that speaks the Anthropic Messages API (``[upstream] api = "anthropic"``).

The flow and the plugins work on the internal chat-completions shape whatever
API the client speaks and whatever the provider speaks.  With an Anthropic
provider the chat flow's upstream turns go through :class:`AnthropicDialect`:

- the internal chat body becomes a Messages request (:func:`messages_request`):
  leading ``system``/``developer`` messages → ``system``; ``tool_calls`` →
  ``tool_use`` blocks; ``role: tool`` messages → ``tool_result`` blocks of a
  user turn; ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` →
  Anthropic's tools, ``tool_choice`` and ``disable_parallel_tool_use``;
  ``stop`` → ``stop_sequences``; ``user`` → ``metadata.user_id``;
  ``max_tokens`` / ``max_completion_tokens`` → ``max_tokens`` (required by
  Anthropic: ``[upstream] default_max_tokens`` when the client gave none);
- the answer, streamed or not, is checked against the Messages wire format and
  translated back into a ``chat.completion`` / ``chat.completion.chunk`` events
  (:mod:`proxy.upstream_anthropic_answer`);
- an Anthropic error body becomes an OpenAI-format one (the status is kept;
  529 ``overloaded_error`` is retried like 502/503/504).

Whatever has no faithful Messages form is refused before anything is sent
(400 ``protocol.unsupported``, the field named): ``n`` > 1, ``logprobs``,
penalties, ``logit_bias``, ``seed``, structured ``response_format``, audio,
``temperature`` above 1, a system message after the conversation started,
non-text tool results, legacy ``functions``... (docs/protocols.md, "Upstream APIs").
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from llm_warden.proxy.errors import BadRequest
from llm_warden.proxy.upstream_anthropic_answer import MessagesStream, completion_of
from llm_warden.proxy.wire import MAX_TOKEN_COUNT

PATH = "/messages"
COUNT_TOKENS_PATH = "/messages/count_tokens"
RETRY_STATUSES = frozenset({502, 503, 504, 529})
"""Anthropic's 529 (``overloaded_error``) says the request was not processed: retried like a 503."""

_DATA_URL = re.compile(r"^data:(image/(?:jpeg|png|gif|webp));base64,([A-Za-z0-9+/=\s]+)$", re.S)

NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "store": (False,),
    "service_tier": ("auto", "default"),
}
"""Chat fields accepted only at the value that changes nothing (what the field means when it is absent)."""

REFUSED: dict[str, str] = {
    "n": "Anthropic answers with one message; several choices (n > 1) cannot be asked for",
    "logprobs": "Anthropic does not return token log probabilities",
    "top_logprobs": "Anthropic does not return token log probabilities",
    "presence_penalty": "Anthropic has no presence penalty",
    "frequency_penalty": "Anthropic has no frequency penalty",
    "logit_bias": "Anthropic has no logit bias",
    "seed": "Anthropic has no sampling seed",
    "response_format": "structured output formats (json_object, json_schema) have no faithful Messages form",
    "modalities": "audio output has no Messages form",
    "audio": "audio output has no Messages form",
    "prediction": "predicted outputs have no Messages form",
    "reasoning_effort": "reasoning effort has no faithful Messages form",
    "store": "stored completions are an OpenAI server feature",
    "metadata": "stored-completion metadata is an OpenAI server feature",
    "service_tier": "OpenAI service tiers have no Anthropic equivalent",
    "web_search_options": "web search runs on the provider's servers, out of Warden's tool fence",
    "functions": "legacy functions: send tools instead",
    "function_call": "legacy functions: send tool_choice instead",
    "verbosity": "verbosity has no Messages form",
    "safety_identifier": "safety identifiers have no Messages form",
    "prompt_cache_key": "OpenAI prompt-cache keys have no Messages form",
}
"""Chat fields refused (when not at a neutral value), with why."""

CARRIED = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "user", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls"}
)
"""Chat fields the translation carries (``stream_options`` is implied: Anthropic always reports usage)."""


def _neutral(key: str, value: Any) -> bool:
    """Whether a refusable chat field holds the value that means what its absence means."""
    if key in ("logit_bias", "metadata"):
        return isinstance(value, dict) and not value
    if key == "response_format":
        return isinstance(value, dict) and value.get("type") == "text" and len(value) == 1
    if key == "top_logprobs":
        return value == 0 and not isinstance(value, bool)
    allowed = NEUTRAL.get(key)
    return allowed is not None and value in allowed and isinstance(value, bool) == isinstance(allowed[0], bool)


def _unsupported(message: str, param: str) -> BadRequest:
    return BadRequest(
        f"{param}: {message}; the upstream speaks the Anthropic Messages API and Warden refuses what it cannot translate faithfully",
        param=param,
        rule="protocol.unsupported",
    )


def _schema(message: str, param: str) -> BadRequest:
    return BadRequest(f"{param}: {message}", param=param, rule="request.schema")


def messages_request(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """The Messages request for an internal chat body; raises ``BadRequest`` naming the field it cannot translate."""
    for k, v in body.items():
        if k in CARRIED or v is None:
            continue
        if _neutral(k, v):
            continue
        why = REFUSED.get(k)
        raise _unsupported(why or "this chat field has no Messages form", k if why else "body")
    out: dict[str, Any] = {"model": body.get("model")}
    system, messages = _conversation(body.get("messages"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _schema("must be a positive integer", "max_tokens")
    out["max_tokens"] = max_tokens
    out["messages"] = messages
    if system:
        out["system"] = "\n".join(system)
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            raise _unsupported("Anthropic's temperature ranges from 0 to 1; a higher value cannot be translated", "temperature")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    elif stop is not None and stop != []:
        raise _schema("must be a string or a list of strings", "stop")
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if body.get("stream") is True:
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _text(content: Any, param: str) -> str:
    """A content that must be text: a string, or text parts (joined as the chat API joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _unsupported("only text parts can be translated here", f"{param}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise _schema("must be a string or a list of content parts", param)


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _schema("must be a string or a list of content parts", param)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), where))
        else:
            raise _unsupported("only text and image parts have a Messages form (audio and files do not)", where)
    return blocks


def _image(image: Any, param: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise _schema("image_url.url must be a string", param)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    m = _DATA_URL.match(url)
    if m is None:
        raise _unsupported("an image must be an http(s) URL or a base64 data: URL of a JPEG, PNG, GIF or WebP image", param)
    return {"type": "image", "source": {"type": "base64", "media_type": m.group(1), "data": m.group(2)}}


def _tool_use(call: Any, param: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise _unsupported("only function tool calls have a tool_use form", param)
    name, arguments, call_id = fn.get("name"), fn.get("arguments"), call.get("id")
    if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
        raise _schema("a tool call needs a string id, function.name and function.arguments", param)
    try:
        parsed = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _unsupported("the arguments are not a JSON object, and Anthropic's tool_use.input is one", f"{param}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": parsed}


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one turn (Anthropic alternates user and assistant)."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _conversation(raw: Any) -> tuple[list[str], list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise _schema("must be a non-empty list of messages", "messages")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _schema("must be an object", param)
        role = m.get("role")
        content = m.get("content")
        if m.get("name") is not None and role not in ("tool", "function"):
            raise _unsupported("a participant name has no Messages form", f"{param}.name")
        if role in ("system", "developer"):
            if messages:
                raise _unsupported("a system message after the conversation started has no Messages form (system is one leading prompt)", param)
            system.append(_text(content, f"{param}.content"))
        elif role == "user":
            _append(messages, "user", _user_blocks(content, f"{param}.content"))
        elif role == "assistant":
            if m.get("function_call") is not None:
                raise _unsupported(REFUSED["function_call"], f"{param}.function_call")
            blocks: list[dict[str, Any]] = []
            text = _text(content, f"{param}.content") if content is not None else ""
            if not text and isinstance(m.get("refusal"), str):
                text = m["refusal"]
            if text:
                blocks.append({"type": "text", "text": text})
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise _schema("must be a list", f"{param}.tool_calls")
            blocks.extend(_tool_use(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls))
            if not blocks:
                blocks.append({"type": "text", "text": ""})
            _append(messages, "assistant", blocks)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _schema("tool_call_id must be a string", f"{param}.tool_call_id")
            result = {"type": "tool_result", "tool_use_id": call_id, "content": _text(content, f"{param}.content")}
            if messages and messages[-1]["role"] == "user" and any(b.get("type") != "tool_result" for b in messages[-1]["content"]):
                raise _unsupported("a tool result must follow the assistant turn that called the tool", param)
            _append(messages, "user", [result])
        elif role == "function":
            raise _unsupported(REFUSED["functions"], f"{param}.role")
        else:
            raise _schema("role must be system, developer, user, assistant or tool", f"{param}.role")
    return system, messages


def _tool(t: Any, i: int) -> dict[str, Any]:
    fn = t.get("function") if isinstance(t, dict) else None
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
        raise _unsupported("only function tools have a Messages form (custom tools do not)", f"tools[{i}]")
    name = fn.get("name")
    if not isinstance(name, str):
        raise _schema("function.name must be a string", f"tools[{i}]")
    out: dict[str, Any] = {"name": name}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    params = fn.get("parameters")
    out["input_schema"] = params if isinstance(params, dict) else {"type": "object", "properties": {}}
    if fn.get("strict") is True:
        out["strict"] = True
    return out


def _tool_choice(choice: Any, parallel: Any, tools: bool) -> dict[str, Any] | None:
    serial = parallel is False
    if choice is None:
        return {"type": "auto", "disable_parallel_tool_use": True} if serial and tools else None
    if choice == "none":
        return {"type": "none"} if tools else None
    if choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _unsupported("only auto, none, required and a named function have a Messages form", "tool_choice")
    if not tools:
        if out["type"] == "auto":
            return None
        raise _schema("a tool must be offered for this tool_choice", "tool_choice")
    if serial:
        out["disable_parallel_tool_use"] = True
    return out


COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice")
"""What a token-counting request carries of a Messages request (no ``max_tokens``, sampling or ``stream``)."""


def count_tokens_request(body: dict[str, Any]) -> dict[str, Any]:
    """The ``/messages/count_tokens`` request for an internal chat body (the governed request, as it would be sent)."""
    full = messages_request(body, 1)
    return {k: full[k] for k in COUNT_FIELDS if k in full}


def check_count(obj: object) -> str | None:
    """Why a count answer is not ``{"input_tokens": N}`` (``None`` when it is)."""
    if type(obj) is not dict:
        return "the answer is not a JSON object"
    n = obj.get("input_tokens")
    if type(n) is not int or not 0 <= n <= MAX_TOKEN_COUNT:
        return "input_tokens is not a token count (an integer from 0 to 2**53-1)"
    return None


def openai_error(raw: bytes) -> bytes:
    """An Anthropic error body (``{"type": "error", "error": {"type", "message"}}``) in the OpenAI format; other bodies unchanged."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return raw
    kind = err.get("type")
    return orjson.dumps({"error": {"message": err["message"], "type": kind if isinstance(kind, str) else "api_error", "code": None, "param": None}})


class AnthropicDialect:
    """The chat flow's upstream turns in the Messages API (see the module docstring)."""

    name = "anthropic"
    path = PATH
    retry_statuses = RETRY_STATUSES

    def __init__(self, default_max_tokens: int, version: str) -> None:
        self.default_max_tokens = default_max_tokens
        self.version = version

    def auth_headers(self, key: str | None) -> dict[str, str]:
        out = {"anthropic-version": self.version}
        if key:
            out["x-api-key"] = key
        return out

    def encode(self, payload: dict[str, Any], raw: bytes) -> bytes:
        return orjson.dumps(messages_request(payload, self.default_max_tokens))

    def answer(self, obj: object) -> tuple[dict[str, Any] | None, str | None]:
        return completion_of(obj)

    def error_body(self, raw: bytes) -> bytes:
        return openai_error(raw)

    def stream(self) -> MessagesStream:
        return MessagesStream()
