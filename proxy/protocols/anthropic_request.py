"""An Anthropic Messages request, validated and translated into the internal chat body.

:func:`translate` checks every field the Messages API defines (types,
ranges, block shapes) and builds the OpenAI chat-completions body that the
chat flow, the plugins and the audit record work on.  What a
chat-completions upstream cannot do faithfully is refused by rule, never
dropped in silence:

- 400 ``request.schema``: a field of the wrong type or out of range, an
  unknown content block type, a message role other than ``user`` /
  ``assistant``;
- 400 ``protocol.unsupported``: a feature the translation cannot carry —
  ``document`` / ``search_result`` / thinking / server-tool blocks, server
  tools, ``thinking`` enabled, ``top_k``, a trailing assistant message
  (prefill), images inside a ``tool_result``, Files API sources, beta
  features, any top-level field this translation does not know.

The mapping (see docs/protocols.md for the whole table): ``system`` → one
leading ``system`` message; ``tool_use`` blocks → the assistant message's
``tool_calls`` (``input`` serialized as the arguments text); each
``tool_result`` block → one ``role: tool`` message in place;
``stop_sequences`` → ``stop``; ``tool_choice`` ``auto`` / ``any`` /
``tool`` / ``none`` → ``"auto"`` / ``"required"`` / the named function /
``"none"``; ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``;
``metadata.user_id`` → ``user``.  ``cache_control`` is dropped everywhere
(a cost hint; it changes no answer).
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_warden.proxy.errors import BadRequest
from llm_warden.proxy.protocols.base import Bounds
from llm_warden.proxy.protocols.common import ID as _ID
from llm_warden.proxy.protocols.common import MAX_TOKENS_LIMIT, function_tool
from llm_warden.proxy.protocols.common import TOOL_NAME as _TOOL_NAME
from llm_warden.proxy.protocols.common import field_name as _name
from llm_warden.proxy.protocols.common import known_keys as _known_keys
from llm_warden.proxy.protocols.common import number as _number
from llm_warden.proxy.protocols.common import schema_error as _schema
from llm_warden.proxy.protocols.common import string as _string
from llm_warden.proxy.protocols.common import unsupported as _unsupported

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

SUPPORTED_FIELDS = frozenset(
    {"model", "max_tokens", "messages", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p", "tools", "tool_choice", "thinking", "service_tier"}
)
"""Top-level request fields the translation carries (``thinking`` only as ``disabled``; ``service_tier`` is Anthropic capacity, a no-op upstream)."""

UNSUPPORTED_FIELDS: dict[str, str] = {
    "top_k": "chat completions has no top_k sampling parameter",
    "container": "containers belong to Anthropic's server-side code execution",
    "mcp_servers": "MCP servers are called by Anthropic's servers, out of Warden's tool fence",
    "context_management": "context editing is done by Anthropic's servers",
    "output_config": "output configuration (effort, structured formats) has no faithful chat-completions form",
    "output_format": "structured output formats have no faithful chat-completions form",
    "inference_geo": "inference geography is an Anthropic deployment setting",
    "speed": "the inference speed mode is an Anthropic deployment setting",
    "diagnostics": "prompt-cache diagnostics come from Anthropic's servers",
    "cache_control": "automatic prompt caching is an Anthropic server feature",
    "user_profile_id": "user profiles are Anthropic organisation settings",
}
"""Top-level fields of the Messages API that are refused by name (``protocol.unsupported``), with why."""

UNSUPPORTED_BLOCKS: dict[str, str] = {
    "document": "document blocks (PDF, plain-text and content sources, citations) have no chat-completions form",
    "search_result": "search result blocks and their citations have no chat-completions form",
    "thinking": "thinking blocks carry Anthropic signatures a chat-completions model cannot produce or verify",
    "redacted_thinking": "thinking blocks carry Anthropic signatures a chat-completions model cannot produce or verify",
    "server_tool_use": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "web_search_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "web_fetch_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "code_execution_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "bash_code_execution_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "text_editor_code_execution_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "tool_search_tool_result": "server tools run on Anthropic's servers, out of Warden's tool fence",
    "mcp_tool_use": "MCP tools are called by Anthropic's servers, out of Warden's tool fence",
    "mcp_tool_result": "MCP tools are called by Anthropic's servers, out of Warden's tool fence",
    "container_upload": "containers belong to Anthropic's server-side code execution",
    "tool_reference": "tool references belong to Anthropic's server-side tool search",
    "browser_state": "browser state belongs to Anthropic's server-side browser tool",
}
"""Content block types of the Messages API refused by name (``protocol.unsupported``), with why."""

_TOOL_KEYS = frozenset({"name", "description", "input_schema", "cache_control", "type", "strict"})
_TOOL_UNSUPPORTED = {
    "input_examples": "tool input examples cannot be given to a chat-completions model",
    "defer_loading": "deferred tool loading belongs to Anthropic's server-side tool search",
    "allowed_callers": "programmatic tool calling belongs to Anthropic's server-side code execution",
    "eager_input_streaming": "eager tool input streaming cannot be fenced: Warden judges whole calls",
}


class Translation:
    """The chat body built from one Messages request, and what the adapter needs from it."""

    __slots__ = ("body", "stream", "model")

    def __init__(self, body: dict[str, Any], stream: bool, model: Any) -> None:
        self.body = body
        self.stream = stream
        self.model = model


def translate(req: dict[str, Any], bounds: Bounds) -> Translation:
    """The internal chat body for a Messages request; raises ``BadRequest`` naming the rule."""
    for k in req:
        if k in SUPPORTED_FIELDS:
            continue
        why = UNSUPPORTED_FIELDS.get(k)
        if why is not None:
            raise _unsupported(why, k)
        raise _unsupported(f"the field {_name(k)} is not one this translation knows", "body")
    max_tokens = req.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise _schema(f"is required: an integer from 1 to {MAX_TOKENS_LIMIT}", "max_tokens")
    stream = req.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _schema("must be a boolean", "stream")
    out: dict[str, Any] = {"model": req.get("model")}
    messages: list[dict[str, Any]] = []
    system = req.get("system")
    if system is not None:
        text = _system_text(system)
        if text:
            messages.append({"role": "system", "content": text})
    system_messages = len(messages)
    raw_messages = req.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _schema("must be a non-empty list of messages", "messages")
    if len(raw_messages) > bounds.max_messages:
        raise BadRequest(f"'messages' has more than {bounds.max_messages} entries", param="messages", rule="request.max_messages")
    for i, m in enumerate(raw_messages):
        _message(m, i, messages)
    if len(messages) - system_messages > bounds.max_messages:
        raise BadRequest(
            f"'messages' becomes more than {bounds.max_messages} chat messages (each tool_result is one)", param="messages", rule="request.max_messages"
        )
    last = raw_messages[-1]
    if last.get("role") == "assistant":
        raise _unsupported("a final assistant message (prefill) cannot be continued by a chat-completions model", f"messages[{len(raw_messages) - 1}]")
    out["messages"] = messages
    out["max_tokens"] = max_tokens
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        v = _number(req, key, 0.0, 1.0)
        if v is not None:
            out[key] = v
    stops = req.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _schema("must be a list of non-empty strings", "stop_sequences")
        if stops:
            out["stop"] = list(stops)
    metadata = req.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _schema("must be an object", "metadata")
        for k, v in metadata.items():
            if k != "user_id":
                raise _schema(f"has the field {_name(k)}; only 'user_id' is defined", "metadata")
            if v is not None:
                user = _string(v, "metadata.user_id")
                if len(user) > 256:
                    raise _schema("must be at most 256 characters", "metadata.user_id")
                out["user"] = user
    thinking = req.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise _schema("must be an object with a 'type'", "thinking")
        if thinking["type"] != "disabled":
            raise _unsupported("extended thinking returns signed thinking blocks a chat-completions model cannot produce", "thinking")
    tier = req.get("service_tier")
    if tier is not None and tier not in ("auto", "standard_only"):
        raise _schema("must be 'auto' or 'standard_only'", "service_tier")
    tools = req.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _schema("must be a list of tools", "tools")
        if len(tools) > bounds.max_tools:
            raise BadRequest(f"'tools' has more than {bounds.max_tools} entries", param="tools", rule="request.max_tools")
        if tools:
            out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = req.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, out)
    return Translation(out, bool(stream), req.get("model"))


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _schema("must be a string or a list of text blocks", "system")
    parts = []
    for j, block in enumerate(system):
        param = f"system[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _schema("must be a text block", param)
        parts.append(_text_block(block, param))
    return "\n".join(parts)


def _text_block(block: dict[str, Any], param: str) -> str:
    _known_keys(block, frozenset({"type", "text", "cache_control", "citations"}), param)
    text = _string(block.get("text"), f"{param}.text")
    if block.get("citations"):
        raise _unsupported("citations in a text block refer to documents a chat-completions model is not given", f"{param}.citations")
    return text


def _image_part(block: dict[str, Any], param: str) -> dict[str, Any]:
    _known_keys(block, frozenset({"type", "source", "cache_control"}), param)
    source = block.get("source")
    if not isinstance(source, dict):
        raise _schema("must have a 'source' object", f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media = source.get("media_type")
        if not isinstance(media, str) or media not in _IMAGE_TYPES:
            raise _schema(f"media_type must be one of {', '.join(sorted(_IMAGE_TYPES))}", f"{param}.source.media_type")
        data = _string(source.get("data"), f"{param}.source.data", empty=False)
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        url = _string(source.get("url"), f"{param}.source.url", empty=False)
        if not url.startswith(("https://", "http://")) or len(url) > 8192:
            raise _schema("must be an http(s) URL of at most 8192 characters", f"{param}.source.url")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "file":
        raise _unsupported("Files API sources live on Anthropic's servers", f"{param}.source")
    raise _schema("source.type must be 'base64' or 'url'", f"{param}.source.type")


def _block_type(block: Any, param: str) -> str:
    if not isinstance(block, dict):
        raise _schema("must be a content block object", param)
    kind = block.get("type")
    if not isinstance(kind, str):
        raise _schema("must have a string 'type'", f"{param}.type")
    return kind


def _unknown_block(kind: str, param: str) -> BadRequest:
    why = UNSUPPORTED_BLOCKS.get(kind)
    if why is not None:
        return _unsupported(why, param)
    return _schema(f"unknown content block type {_name(kind)}", f"{param}.type")


def _parts_content(parts: list[dict[str, Any]]) -> Any:
    """One text part as a plain string (what every chat server reads); several parts as a list."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _message(m: Any, i: int, out: list[dict[str, Any]]) -> None:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _schema("must be a message object", param)
    _known_keys(m, frozenset({"role", "content"}), param)
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise _schema("role must be 'user' or 'assistant'", f"{param}.role")
    content = m.get("content")
    if isinstance(content, str):
        out.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise _schema("content must be a string or a list of content blocks", f"{param}.content")
    if role == "assistant":
        _assistant(content, param, out)
    else:
        _user(content, param, out)


def _assistant(content: list[Any], param: str, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bp = f"{param}.content[{j}]"
        kind = _block_type(block, bp)
        if kind == "text":
            parts.append({"type": "text", "text": _text_block(block, bp)})
        elif kind == "tool_use":
            calls.append(_tool_use(block, bp))
        else:
            raise _unknown_block(kind, bp)
    msg: dict[str, Any] = {"role": "assistant", "content": _parts_content(parts) if parts else (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    out.append(msg)


def _tool_use(block: dict[str, Any], param: str) -> dict[str, Any]:
    _known_keys(block, frozenset({"type", "id", "name", "input", "cache_control", "caller", "toolset_name"}), param)
    _no_toolset(block, param)
    call_id = block.get("id")
    if not isinstance(call_id, str) or not _ID.fullmatch(call_id):
        raise _schema("id must be 1 to 256 letters, digits or '_.:-'", f"{param}.id")
    name = block.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise _schema("name must be 1 to 128 letters, digits, '_' or '-'", f"{param}.name")
    caller = block.get("caller")
    if caller is not None and not (isinstance(caller, dict) and caller.get("type") == "direct"):
        raise _unsupported("calls made by server-side code execution are not fenced by Warden", f"{param}.caller")
    args = block.get("input")
    if not isinstance(args, dict):
        raise _schema("input must be an object", f"{param}.input")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": orjson.dumps(args).decode()}}


def _no_toolset(block: dict[str, Any], param: str) -> None:
    if block.get("toolset_name") is not None:
        raise _unsupported("toolsets are Anthropic server-side tools, out of Warden's tool fence", f"{param}.toolset_name")


def _user(content: list[Any], param: str, out: list[dict[str, Any]]) -> None:
    """Blocks in order: each ``tool_result`` becomes a ``tool`` message, each run of other blocks one ``user`` message."""
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bp = f"{param}.content[{j}]"
        kind = _block_type(block, bp)
        if kind == "tool_result":
            if parts:
                out.append({"role": "user", "content": _parts_content(parts)})
                parts = []
            out.append(_tool_result(block, bp))
        elif kind == "text":
            parts.append({"type": "text", "text": _text_block(block, bp)})
        elif kind == "image":
            parts.append(_image_part(block, bp))
        else:
            raise _unknown_block(kind, bp)
    if parts or not content:
        out.append({"role": "user", "content": _parts_content(parts) if parts else ""})


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    _known_keys(block, frozenset({"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"}), param)
    _no_toolset(block, param)
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not _ID.fullmatch(call_id):
        raise _schema("tool_use_id must be 1 to 256 letters, digits or '_.:-'", f"{param}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            pp = f"{param}.content[{k}]"
            kind = _block_type(part, pp)
            if kind == "text":
                texts.append(_text_block(part, pp))
            elif kind == "image":
                raise _unsupported("a chat-completions tool message carries text only", pp)
            else:
                raise _unknown_block(kind, pp)
        text = "\n".join(texts)
    else:
        raise _schema("content must be a string or a list of text blocks", f"{param}.content")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _schema("is_error must be a boolean", f"{param}.is_error")
    if is_error:
        # Chat completions has no error flag on a tool message: the model is told in the text.
        text = "Tool error: " + text
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tool(t: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(t, dict):
        raise _schema("must be a tool object", param)
    kind = t.get("type")
    if kind is not None and kind != "custom":
        raise _unsupported("server tools run on Anthropic's servers, out of Warden's tool fence", f"{param}.type")
    for k in t:
        if k in _TOOL_KEYS:
            continue
        why = _TOOL_UNSUPPORTED.get(k)
        raise _unsupported(why or f"the field {_name(k)} is not one this translation knows", f"{param}.{k}" if why else param)
    schema = t.get("input_schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _schema("input_schema must be a JSON Schema object with type 'object'", f"{param}.input_schema")
    return function_tool(t, schema, param)


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise _schema("must be an object with a 'type'", "tool_choice")
    kind = choice.get("type")
    allowed = {"auto": {"type", "disable_parallel_tool_use"}, "any": {"type", "disable_parallel_tool_use"}, "tool": {"type", "name", "disable_parallel_tool_use"}, "none": {"type"}}
    keys = allowed.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise _schema("type must be 'auto', 'any', 'tool' or 'none'", "tool_choice.type")
    for k in choice:
        if k not in keys:
            raise _schema(f"has the field {_name(k)}, which tool_choice '{kind}' does not define", "tool_choice")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    else:
        name = choice.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _schema("name must be 1 to 128 letters, digits, '_' or '-'", "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    dpt = choice.get("disable_parallel_tool_use")
    if dpt is not None:
        if not isinstance(dpt, bool):
            raise _schema("disable_parallel_tool_use must be a boolean", "tool_choice.disable_parallel_tool_use")
        if dpt and "tools" in out:
            out["parallel_tool_calls"] = False
