"""``POST /v1/messages/count_tokens`` over a native Anthropic provider (``[upstream] api = "anthropic"``).

The request is validated and translated like a Messages request (the same
refusals, the same internal chat body), so the request hooks govern it as
they govern the message it counts: the principal is checked, the tools fence
removes the tools the principal may not be offered, retrieval injects what it
would inject.  The flow (:func:`proxy.dataplane.count_tokens`) then sends that
governed body, translated back, to the provider's counting endpoint — the
count is that of the request Warden would send — and the answer
``{"input_tokens": N}`` is relayed.  Errors are Anthropic's format, as on
``/v1/messages``.  Over an OpenAI-compatible provider the route stays refused
by name (404 ``server.routes.ungoverned``).
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_warden.proxy.errors import BadRequest
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.protocols.anthropic import AnthropicMessages
from llm_warden.proxy.protocols.base import Bounds

NAME = "anthropic.count_tokens"
FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})
"""The count request's fields Warden carries (a subset of a Messages request's; no ``max_tokens``, no ``stream``)."""


class AnthropicCountTokens(AnthropicMessages):
    """The token-counting endpoint: parsed as a Messages request, answered with the provider's count."""

    name = NAME

    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        for k in body:
            if k not in FIELDS:
                ex.body_refused = "protocol.unsupported"
                raise BadRequest(
                    f"{k if len(k) <= 64 and k.isidentifier() else 'body'}: not a field of a token-counting request that Warden carries; Warden refuses what it cannot translate faithfully",
                    param=k if len(k) <= 64 and k.isidentifier() else "body",
                    rule="protocol.unsupported",
                )
        # max_tokens is required of a message, not of a count: the smallest, so a token budget reserves the prompt.
        super().parse(ex, {**body, "max_tokens": 1}, bounds)

    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        if status >= 400:
            return super().render(ex, status, body)
        return orjson.dumps(ex.response_body) if isinstance(ex.response_body, dict) else body
