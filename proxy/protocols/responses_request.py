"""An OpenAI Responses request (``POST /v1/responses``), validated and translated into the internal chat body.

:func:`translate` checks every field the Responses API defines and builds
the chat-completions body the chat flow, the plugins and the audit record
work on.  Warden is stateless toward the provider on this API: nothing is
stored on any server, so what needs server-side state is refused by rule,
never passed through or dropped in silence:

- 400 ``request.schema``: a field of the wrong type or out of range, an
  unknown item, content or tool type;
- 400 ``protocol.state``: ``store: true``, ``previous_response_id``,
  ``conversation``, ``background: true``, stored ``prompt`` templates,
  ``context_management`` (server-side compaction), ``item_reference`` and
  ``compaction`` items, encrypted reasoning (``include`` of
  ``reasoning.encrypted_content``, reasoning items carrying it), ``file_id``
  inputs (Files API);
- 400 ``protocol.unsupported``: what a chat-completions upstream cannot do
  faithfully — built-in tools (web and file search, code interpreter,
  computer use, image generation, MCP, shells, custom grammar tools...) and
  their items, reasoning items and summaries, ``truncation: "auto"``,
  log probabilities, ``allowed_tools`` choices, file and audio inputs, any
  top-level field this translation does not know.

The mapping (docs/protocols.md has the whole table): ``instructions`` → one
leading ``system`` message; ``input`` a string → one ``user`` message;
``message`` items → chat messages (``developer`` → ``system``;
``input_text``/``output_text``/``refusal`` → text, ``input_image`` →
``image_url``); ``function_call`` items → the assistant message's
``tool_calls``; ``function_call_output`` → a ``role: tool`` message;
``function`` tools → chat function tools; ``max_output_tokens`` →
``max_tokens``; ``text.format`` → ``response_format``; ``reasoning.effort``
→ ``reasoning_effort``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llm_warden.proxy.errors import BadRequest
from llm_warden.proxy.protocols.base import Bounds
from llm_warden.proxy.protocols.common import (
    ID,
    MAX_TOKENS_LIMIT,
    TOOL_NAME,
    field_name,
    function_tool,
    known_keys,
    number,
    schema_error,
    string,
    unsupported,
)

_IMAGE_DETAIL = frozenset({"auto", "low", "high", "original"})
_SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority", "fast", "ultrafast"})
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
_VERBOSITY = frozenset({"low", "medium", "high"})

STATE = "protocol.state"

STATE_FIELDS: dict[str, str] = {
    "previous_response_id": "it continues a response stored on the provider's servers; Warden keeps no responses (send the whole conversation as input items)",
    "conversation": "conversations are state kept on the provider's servers; Warden keeps none (send the whole conversation as input items)",
    "prompt": "stored prompt templates live on the provider's servers; render the prompt in the application",
    "context_management": "compaction runs on the provider's servers and returns encrypted items only it can read",
    "background_options": "background responses run and are kept on the provider's servers",
}
"""Top-level fields refused (when set) because they need state on the provider's servers (``protocol.state``)."""

UNSUPPORTED_FIELDS: dict[str, str] = {
    "moderation": "moderation of the response runs on the provider's servers",
    "access_programs": "access programs are provider account settings",
    "image": "image context compression is a provider setting with no chat-completions form",
    "prompt_cache_options": "prompt cache options (breakpoints, prewarming) have no chat-completions form",
}
"""Top-level fields refused (when set) because a chat-completions upstream cannot honour them (``protocol.unsupported``)."""

SUPPORTED_FIELDS = frozenset(
    {
        "model", "input", "instructions", "stream", "stream_options", "store", "background", "include", "tools", "tool_choice",
        "parallel_tool_calls", "max_output_tokens", "max_tool_calls", "temperature", "top_p", "top_logprobs", "user", "safety_identifier",
        "metadata", "text", "reasoning", "truncation", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    }
)  # fmt: skip
"""Top-level fields the translation reads (each with the values it can honour)."""

BUILTIN_TOOL = "built-in tools run on the provider's servers, out of Warden's tool fence"
UNSUPPORTED_ITEMS: dict[str, str] = {
    "item_reference": "an item reference points to an item stored on the provider's servers",
    "compaction": "compaction items are encrypted by the provider's servers",
    "reasoning": "reasoning items are a reasoning model's state; a chat-completions model cannot take them",
    "custom_tool_call": "custom (grammar) tools have no chat-completions form",
    "custom_tool_call_output": "custom (grammar) tools have no chat-completions form",
    **{
        kind: BUILTIN_TOOL
        for kind in (
            "file_search_call", "web_search_call", "computer_call", "computer_call_output", "image_generation_call", "code_interpreter_call",
            "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
            "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call", "tool_search_call", "tool_search_output",
        )
    },
}  # fmt: skip
"""Input item types refused by name, with why (``protocol.state`` for the first two, else ``protocol.unsupported``)."""

_STATE_ITEMS = frozenset({"item_reference", "compaction"})

UNSUPPORTED_TOOLS: dict[str, str] = {
    "custom": "custom tools with free-form or grammar inputs have no chat-completions form",
    "namespace": "tool namespaces have no chat-completions form",
    **{
        kind: BUILTIN_TOOL
        for kind in (
            "file_search", "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "computer",
            "computer_use", "computer_use_preview", "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "apply_patch",
            "tool_search",
        )
    },
}  # fmt: skip
"""Tool types refused by name (``protocol.unsupported``); only ``function`` tools are fenced."""

INCLUDE_REFUSED: dict[str, tuple[str, str]] = {
    "reasoning.encrypted_content": (STATE, "encrypted reasoning is provider state that only the provider can read"),
    "message.input_image.image_url": (STATE, "it lists stored input items; Warden stores none"),
    "message.output_text.logprobs": ("protocol.unsupported", "log probabilities are not rendered by this translation"),
}
"""``include`` values refused (every other known one names a built-in tool's output: ``protocol.unsupported``)."""


def _state(message: str, param: str) -> BadRequest:
    return BadRequest(f"{param}: {message}; Warden is stateless toward the provider on this API", param=param, rule=STATE)


@dataclass(slots=True)
class ResponsesRequest:
    """What the Response object echoes of the request (the chat body carries the rest)."""

    instructions: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float | int | None = None
    top_p: float | int | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None


@dataclass(slots=True)
class Translation:
    body: dict[str, Any]
    stream: bool
    echo: ResponsesRequest


def translate(req: dict[str, Any], bounds: Bounds) -> Translation:
    """The internal chat body for a Responses request; raises ``BadRequest`` naming the rule."""
    for k, v in req.items():
        if k in SUPPORTED_FIELDS:
            continue
        if k in STATE_FIELDS:
            if v is not None:
                raise _state(STATE_FIELDS[k], k)
            continue
        if k in UNSUPPORTED_FIELDS:
            if v is not None:
                raise unsupported(UNSUPPORTED_FIELDS[k], k)
            continue
        raise unsupported(f"the field {field_name(k)} is not one this translation knows", "body")
    echo = ResponsesRequest()
    _state_switches(req)
    stream = req.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise schema_error("must be a boolean", "stream")
    out: dict[str, Any] = {"model": req.get("model")}
    messages: list[dict[str, Any]] = []
    instructions = req.get("instructions")
    if instructions is not None:
        echo.instructions = string(instructions, "instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    _input(req.get("input"), bounds, messages)  # one chat message per item at most: the bound holds for both
    out["messages"] = messages
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    _stream_options(req.get("stream_options"), bool(stream))
    _sampling(req, out, echo)
    _tools(req, out, echo, bounds)
    _text(req.get("text"), out, echo)
    _reasoning(req.get("reasoning"), out, echo)
    _include(req.get("include"))
    return Translation(out, bool(stream), echo)


def _state_switches(req: dict[str, Any]) -> None:
    store = req.get("store")
    if store is not None and not isinstance(store, bool):
        raise schema_error("must be a boolean", "store")
    if store:
        raise _state("store: true keeps the response on the provider's servers; Warden answers with store: false (omit it or send false)", "store")
    background = req.get("background")
    if background is not None and not isinstance(background, bool):
        raise schema_error("must be a boolean", "background")
    if background:
        raise _state("background responses run and are kept on the provider's servers, to be polled later", "background")
    truncation = req.get("truncation")
    if truncation not in (None, "disabled", "auto"):
        raise schema_error("must be 'auto' or 'disabled'", "truncation")
    if truncation == "auto":
        raise unsupported("the provider's servers drop conversation items to fit the context window; a chat-completions upstream cannot", "truncation")


def _stream_options(opts: Any, stream: bool) -> None:
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise schema_error("must be an object", "stream_options")
    known_keys(opts, frozenset({"include_obfuscation"}), "stream_options")
    if not isinstance(opts.get("include_obfuscation", False), bool):
        raise schema_error("include_obfuscation must be a boolean", "stream_options.include_obfuscation")
    if not stream:
        raise schema_error("may only be set when stream is true", "stream_options")


def _sampling(req: dict[str, Any], out: dict[str, Any], echo: ResponsesRequest) -> None:
    max_out = req.get("max_output_tokens")
    if max_out is not None:
        if isinstance(max_out, bool) or not isinstance(max_out, int) or not 1 <= max_out <= MAX_TOKENS_LIMIT:
            raise schema_error(f"must be an integer from 1 to {MAX_TOKENS_LIMIT}", "max_output_tokens")
        out["max_tokens"] = echo.max_output_tokens = max_out
    max_calls = req.get("max_tool_calls")
    if max_calls is not None:
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
            raise schema_error("must be a non-negative integer", "max_tool_calls")
        echo.max_tool_calls = max_calls  # it bounds built-in tool calls, which this translation refuses
    t = number(req, "temperature", 0.0, 2.0)
    if t is not None:
        out["temperature"] = echo.temperature = t
    p = number(req, "top_p", 0.0, 1.0)
    if p is not None:
        out["top_p"] = echo.top_p = p
    top_logprobs = req.get("top_logprobs")
    if top_logprobs is not None:
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise schema_error("must be an integer from 0 to 20", "top_logprobs")
        if top_logprobs:
            raise unsupported("log probabilities are not rendered by this translation", "top_logprobs")
    for key, limit in (("user", 256), ("safety_identifier", 128), ("prompt_cache_key", 256)):
        v = req.get(key)
        if v is not None:
            if not isinstance(v, str) or len(v) > limit:
                raise schema_error(f"must be a string of at most {limit} characters", key)
            out[key] = v
            setattr(echo, key, v)
    retention = req.get("prompt_cache_retention")
    if retention is not None:
        if retention not in ("in_memory", "24h"):
            raise schema_error("must be 'in_memory' or '24h'", "prompt_cache_retention")
        out["prompt_cache_retention"] = retention
    tier = req.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in _SERVICE_TIERS:
            raise schema_error(f"must be one of {', '.join(sorted(_SERVICE_TIERS))}", "service_tier")
        out["service_tier"] = echo.service_tier = tier
    metadata = req.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise schema_error("must be an object of at most 16 pairs", "metadata")
        for k, v in metadata.items():
            if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
                raise schema_error("keys must be at most 64 characters and values strings of at most 512", "metadata")
        echo.metadata = dict(metadata)


def _input(items: Any, bounds: Bounds, out: list[dict[str, Any]]) -> None:
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return
    if not isinstance(items, list) or not items:
        raise schema_error("is required: a string or a non-empty list of input items", "input")
    if len(items) > bounds.max_messages:
        raise BadRequest(f"'input' has more than {bounds.max_messages} items", param="input", rule="request.max_messages")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise schema_error("must be an input item object", param)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind == "message":
            _message(item, param, out)
        elif kind == "function_call":
            _function_call(item, param, out)
        elif kind == "function_call_output":
            out.append(_function_call_output(item, param))
        elif isinstance(kind, str) and kind in UNSUPPORTED_ITEMS:
            if kind in _STATE_ITEMS or (kind == "reasoning" and item.get("encrypted_content")):
                raise _state(UNSUPPORTED_ITEMS[kind] if kind != "reasoning" else "encrypted reasoning can only be read by the provider's servers", param)
            raise unsupported(UNSUPPORTED_ITEMS[kind], param)
        else:
            raise schema_error(f"unknown input item type {field_name(kind)}", f"{param}.type")


_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})


def _message(item: dict[str, Any], param: str, out: list[dict[str, Any]]) -> None:
    known_keys(item, _MESSAGE_KEYS, param)
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise schema_error("role must be 'user', 'assistant', 'system' or 'developer'", f"{param}.role")
    _optional_id(item, param)
    content = item.get("content")
    chat_role = "system" if role == "developer" else role
    if isinstance(content, str):
        out.append({"role": chat_role, "content": content})
        return
    if not isinstance(content, list):
        raise schema_error("content must be a string or a list of content parts", f"{param}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pp = f"{param}.content[{j}]"
        if not isinstance(part, dict):
            raise schema_error("must be a content part object", pp)
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            known_keys(part, frozenset({"type", "text", "annotations", "logprobs", "prompt_cache_breakpoint"}), pp)
            parts.append({"type": "text", "text": string(part.get("text"), f"{pp}.text")})
        elif kind == "refusal":
            known_keys(part, frozenset({"type", "refusal"}), pp)
            parts.append({"type": "text", "text": string(part.get("refusal"), f"{pp}.refusal")})
        elif kind == "input_image":
            if role == "assistant":
                raise schema_error("an assistant message carries no images", pp)
            parts.append(_image(part, pp))
        elif kind in ("input_file", "input_audio"):
            raise unsupported("file and audio inputs have no faithful chat-completions form on every upstream", pp)
        else:
            raise schema_error(f"unknown content part type {field_name(kind)}", f"{pp}.type")
    if role != "user" and any(p["type"] != "text" for p in parts):
        raise schema_error("only a user message carries images", param)
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": chat_role, "content": parts[0]["text"]})
    elif role in ("assistant", "system", "developer"):
        out.append({"role": chat_role, "content": "".join(p["text"] for p in parts)})
    else:
        out.append({"role": chat_role, "content": parts})


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    known_keys(part, frozenset({"type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"}), param)
    if part.get("file_id") is not None:
        raise _state("a file_id names a file stored with the provider's Files API", f"{param}.file_id")
    url = string(part.get("image_url"), f"{param}.image_url", empty=False)
    if not url.startswith(("https://", "http://", "data:image/")):
        raise schema_error("must be an http(s) or data:image/ URL", f"{param}.image_url")
    image: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if detail is not None:
        if not isinstance(detail, str) or detail not in _IMAGE_DETAIL:
            raise schema_error(f"detail must be one of {', '.join(sorted(_IMAGE_DETAIL))}", f"{param}.detail")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _optional_id(item: dict[str, Any], param: str) -> None:
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not ID.fullmatch(item_id)):
        raise schema_error("id must be 1 to 256 letters, digits or '_.:-'", f"{param}.id")
    status = item.get("status")
    if status is not None and status not in ("in_progress", "completed", "incomplete"):
        raise schema_error("status must be 'in_progress', 'completed' or 'incomplete'", f"{param}.status")


def _call_id(item: dict[str, Any], param: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not ID.fullmatch(call_id):
        raise schema_error("call_id must be 1 to 256 letters, digits or '_.:-'", f"{param}.call_id")
    return call_id


def _function_call(item: dict[str, Any], param: str, out: list[dict[str, Any]]) -> None:
    known_keys(item, frozenset({"type", "call_id", "name", "arguments", "id", "status", "namespace", "caller"}), param)
    _optional_id(item, param)
    if item.get("namespace") is not None:
        raise unsupported("tool namespaces have no chat-completions form", f"{param}.namespace")
    caller = item.get("caller")
    if caller is not None and not (isinstance(caller, dict) and caller.get("type") == "direct"):
        raise unsupported("calls made by the provider's server-side programs are not fenced by Warden", f"{param}.caller")
    name = item.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise schema_error("name must be 1 to 128 letters, digits, '_' or '-'", f"{param}.name")
    arguments = string(item.get("arguments"), f"{param}.arguments")
    call = {"id": _call_id(item, param), "type": "function", "function": {"name": name, "arguments": arguments}}
    last = out[-1] if out else None
    # Calls that follow an assistant message (or other calls) with no tool result between are one chat turn.
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if last.get("content") == "":
            last["content"] = None
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_call_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    known_keys(item, frozenset({"type", "call_id", "output", "id", "status"}), param)
    _optional_id(item, param)
    output = item.get("output")
    if isinstance(output, str):
        text = output
    elif isinstance(output, list):
        texts = []
        for k, part in enumerate(output):
            pp = f"{param}.output[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_text":
                known_keys(part, frozenset({"type", "text", "prompt_cache_breakpoint"}), pp)
                texts.append(string(part.get("text"), f"{pp}.text"))
            elif kind in ("input_image", "input_file"):
                raise unsupported("a chat-completions tool message carries text only", pp)
            else:
                raise schema_error(f"unknown output part type {field_name(kind)}", f"{pp}.type")
        text = "".join(texts)
    else:
        raise schema_error("output must be a string or a list of content parts", f"{param}.output")
    return {"role": "tool", "tool_call_id": _call_id(item, param), "content": text}


def _tools(req: dict[str, Any], out: dict[str, Any], echo: ResponsesRequest, bounds: Bounds) -> None:
    tools = req.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise schema_error("must be a list of tools", "tools")
        if len(tools) > bounds.max_tools:
            raise BadRequest(f"'tools' has more than {bounds.max_tools} entries", param="tools", rule="request.max_tools")
        chat_tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
        if chat_tools:
            out["tools"] = chat_tools
            echo.tools = [dict(t) for t in tools]
    choice = req.get("tool_choice")
    if choice is not None:
        chat_choice = _tool_choice(choice)
        echo.tool_choice = choice
        if "tools" in out:
            out["tool_choice"] = chat_choice
        elif chat_choice not in ("auto", "none"):
            # Chat completions refuses a tool_choice without tools; "auto" and "none" mean nothing then.
            raise schema_error("forces a tool call, but 'tools' offers none", "tool_choice")
    parallel = req.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise schema_error("must be a boolean", "parallel_tool_calls")
        echo.parallel_tool_calls = parallel
        if "tools" in out:
            out["parallel_tool_calls"] = parallel


def _tool(t: Any, param: str) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise schema_error("must be a tool object", param)
    kind = t.get("type")
    if kind != "function":
        if isinstance(kind, str) and kind in UNSUPPORTED_TOOLS:
            raise unsupported(UNSUPPORTED_TOOLS[kind], f"{param}.type")
        raise schema_error(f"unknown tool type {field_name(kind)}", f"{param}.type")
    known_keys(t, frozenset({"type", "name", "description", "parameters", "strict", "defer_loading"}), param)
    if t.get("defer_loading"):
        raise unsupported("deferred tool loading belongs to the provider's server-side tool search", f"{param}.defer_loading")
    params = t.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise schema_error("parameters must be a JSON Schema object", f"{param}.parameters")
    return function_tool(t, params, param)


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise schema_error("must be 'none', 'auto', 'required' or a tool choice object", "tool_choice")
        return choice
    if not isinstance(choice, dict):
        raise schema_error("must be a string or an object", "tool_choice")
    kind = choice.get("type")
    if kind == "function":
        known_keys(choice, frozenset({"type", "name"}), "tool_choice")
        name = choice.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise schema_error("name must be 1 to 128 letters, digits, '_' or '-'", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools":
        raise unsupported("an allowed-tools subset is not fenced by Warden (send only the tools the model may call)", "tool_choice")
    if isinstance(kind, str) and (kind in UNSUPPORTED_TOOLS or kind in ("mcp", "custom", "programmatic_tool_calling")):
        raise unsupported(BUILTIN_TOOL, "tool_choice")
    raise schema_error(f"unknown tool choice type {field_name(kind)}", "tool_choice.type")


def _text(text: Any, out: dict[str, Any], echo: ResponsesRequest) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise schema_error("must be an object", "text")
    known_keys(text, frozenset({"format", "verbosity"}), "text")
    verbosity = text.get("verbosity")
    if verbosity is not None:
        if not isinstance(verbosity, str) or verbosity not in _VERBOSITY:
            raise schema_error("verbosity must be 'low', 'medium' or 'high'", "text.verbosity")
        out["verbosity"] = verbosity
    fmt = text.get("format")
    echo.text = {"format": {"type": "text"}, **({"verbosity": verbosity} if verbosity else {})}
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise schema_error("must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        known_keys(fmt, frozenset({"type"}), "text.format")
    elif kind == "json_object":
        known_keys(fmt, frozenset({"type"}), "text.format")
        out["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        known_keys(fmt, frozenset({"type", "name", "schema", "strict", "description"}), "text.format")
        name = fmt.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise schema_error("name must be 1 to 64 letters, digits, '_' or '-'", "text.format.name")
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise schema_error("schema must be a JSON Schema object", "text.format.schema")
        js: dict[str, Any] = {"name": name, "schema": schema}
        if fmt.get("description") is not None:
            js["description"] = string(fmt.get("description"), "text.format.description")
        strict = fmt.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise schema_error("strict must be a boolean", "text.format.strict")
            js["strict"] = strict
        out["response_format"] = {"type": "json_schema", "json_schema": js}
    else:
        raise schema_error("type must be 'text', 'json_object' or 'json_schema'", "text.format.type")
    echo.text = {**echo.text, "format": dict(fmt)}


def _reasoning(reasoning: Any, out: dict[str, Any], echo: ResponsesRequest) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise schema_error("must be an object", "reasoning")
    known_keys(reasoning, frozenset({"effort", "summary", "generate_summary"}), "reasoning")
    effort = reasoning.get("effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in _EFFORTS:
            raise schema_error(f"effort must be one of {', '.join(sorted(_EFFORTS))}", "reasoning.effort")
        out["reasoning_effort"] = effort
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) is not None:
            raise unsupported("a chat-completions answer carries no reasoning summary", f"reasoning.{key}")
    echo.reasoning = {"effort": effort, "summary": None}


def _include(include: Any) -> None:
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
        raise schema_error("must be a list of strings", "include")
    for i, value in enumerate(include):
        param = f"include[{i}]"
        refused = INCLUDE_REFUSED.get(value)
        if refused is not None:
            rule, why = refused
            if rule == STATE:
                raise _state(why, param)
            raise unsupported(why, param)
        if value.split(".", 1)[0] in ("file_search_call", "web_search_call", "computer_call_output", "code_interpreter_call"):
            raise unsupported(BUILTIN_TOOL, param)
        raise schema_error(f"unknown include value {field_name(value)}", param)

