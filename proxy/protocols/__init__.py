"""Protocol adapters: each API's wire format at the edge of the one pipeline.

A route names its protocol (``Route.protocol``); the pipeline asks
:func:`adapter_for` for the adapter that parses that API's requests and
renders its replies, stream events and errors.  Before a request is routed
(authentication, the canonical-path check) the adapter is chosen by path
(:func:`protocol_for_path`), so every refusal on an API's paths comes back
in that API's format.  See :mod:`proxy.protocols.base` for the interface and
the internal representation.
"""

from __future__ import annotations

from llm_warden.proxy.protocols.anthropic import AnthropicMessages
from llm_warden.proxy.protocols.anthropic_count import AnthropicCountTokens
from llm_warden.proxy.protocols.base import Bounds, Protocol, StreamRenderer
from llm_warden.proxy.protocols.mcp import MCP_PATH, McpProtocol
from llm_warden.proxy.protocols.openai_chat import OpenAIChat, OpenAIRelay
from llm_warden.proxy.protocols.openai_responses import OpenAIResponses

__all__ = ["Bounds", "Protocol", "StreamRenderer", "adapter_for", "protocol_for_path", "ANTHROPIC_PATH"]

ANTHROPIC_PATH = "/v1/messages"
"""The Messages API's path; it and every path below it answer in Anthropic's format."""

_RELAY = OpenAIRelay()
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (OpenAIChat(), AnthropicMessages(), AnthropicCountTokens(), OpenAIResponses(), McpProtocol())}
"""Adapters by ``Exchange.protocol``; every other protocol (embeddings, models, feedback, pass-through) is OpenAI-format."""


def adapter_for(protocol: str) -> Protocol:
    """The adapter that renders exchanges of ``protocol``."""
    return PROTOCOLS.get(protocol, _RELAY)


def protocol_for_path(path: str) -> str:
    """The protocol a request's errors are rendered in before it is routed (by its raw path)."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return AnthropicMessages.name
    if path == MCP_PATH or path.startswith(MCP_PATH + "/"):
        return McpProtocol.name
    return OpenAIChat.name
