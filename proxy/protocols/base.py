"""The protocol adapter interface: one API's wire format at the edge of the one pipeline.

An adapter never runs a flow.  It turns its API's request into the
*internal representation* the flows, the plugins and the audit record work
on, and turns what they produce back into its API's replies, stream events
and errors.

The internal representation is the OpenAI chat-completions shape: a chat
request body (``ex.client_body``/``ex.body``), a ``chat.completion`` answer
(``ex.response_body``) and ``chat.completion.chunk`` stream events.  So the
chat flow (upstream turns, tool judging, corrective turns), every plugin
(retrieval injection, the tools fence, the limits token estimate,
idempotent replays) and the one audit record format stay the same whichever
API the application speaks; an adapter only translates at the edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_warden.proxy.errors import BadRequest, WardenError
from llm_warden.proxy.exchange import Exchange


@dataclass(frozen=True, slots=True)
class Bounds:
    """The request bounds of ``[server]`` an adapter enforces while parsing."""

    max_messages: int
    """Most entries in a request's conversation (400 ``request.max_messages``)."""
    max_tools: int
    """Most tools one request may offer (400 ``request.max_tools``)."""


class StreamRenderer(ABC):
    """Renders one streamed answer, event by event, in an API's format.

    The chat flow hands it internal ``chat.completion.chunk`` objects as it
    relays them (tool-call deltas only once judged and whole), keep-alive
    comments, and at the end the usage; the renderer returns the bytes to
    send.  It may keep state (an open content block, the stop reason).
    """

    @abstractmethod
    def event(self, chunk: dict[str, Any], raw: bytes | None) -> bytes | None:
        """The bytes for one internal chunk (``None``: nothing to send).

        ``raw`` is the provider's exact SSE event when the chunk was not
        changed (an adapter of the same format relays it byte for byte).
        """

    @abstractmethod
    def keepalive(self, raw: bytes) -> bytes | None:
        """The bytes for a provider keep-alive comment (``raw``, an SSE comment line)."""

    @abstractmethod
    def end(self, usage_chunk: dict[str, Any] | None, usage: dict[str, int] | None) -> list[bytes]:
        """What ends a whole stream.

        ``usage_chunk`` is the provider's usage chunk when the client asked
        for one (``None`` otherwise); ``usage`` the totals over every
        upstream turn (``None`` when the provider reported none).
        """

    @abstractmethod
    def error(self, err: WardenError) -> bytes:
        """The event that ends a stream that went bad (the client already got a 200)."""


class Protocol(ABC):
    """One API's wire format: parse and validate its requests, render its replies and errors.

    ``name`` is the ``Exchange.protocol`` value (also the route's
    ``protocol``, the audit record's ``protocol`` and the trace's
    ``warden.protocol``).
    """

    name: str = ""
    object_arguments: bool = False
    """Whether every tool call must carry a JSON object as its arguments to be rendered at all.

    The chat format relays the model's arguments text as it is; an API that
    gives the application a parsed object (Anthropic's ``tool_use.input``)
    cannot render a call whose arguments are not one, so the core refuses
    such a call (``repair``, rule ``protocol.tool_input``) and a corrective
    turn asks the model for valid arguments."""

    def credential(self, headers: Mapping[str, str]) -> str | None:
        """The ``Authorization`` value to verify (``Bearer <token>``), from the API's own credential header.

        Raises :class:`~proxy.errors.Unauthorized` when the request carries
        credentials the API would read in two ways.
        """
        return headers.get("Authorization")

    @abstractmethod
    def parse(self, ex: Exchange, body: dict[str, Any], bounds: Bounds) -> None:
        """Validate a parsed request body (bounded) and set the exchange from it.

        Sets ``ex.model``, ``ex.stream`` and ``ex.client_body``/``ex.body``
        (the internal chat representation; ``ex.body_modified`` when it is
        not the client's bytes).  Raises a ``WardenError`` naming its rule
        (400 ``request.schema``, ``protocol.unsupported``...).
        """

    def not_an_object(self, body: Any) -> WardenError:
        """The refusal of a body that is JSON but not an object (400 ``request.json`` unless the API names it)."""
        return BadRequest("request body must be a JSON object", rule="request.json")

    @abstractmethod
    def render(self, ex: Exchange, status: int, body: bytes) -> bytes:
        """A whole answer in this API's format.

        Called after the response hooks for every reply that is not one of
        Warden's own refusals: the flow's answer (``ex.response_body`` as the
        hooks left it), a relayed provider error (status >= 400, an
        OpenAI-format error body) or a plugin's local reply.  Raises a
        ``WardenError`` when the answer cannot be rendered (it is then
        refused and recorded as such).
        """

    @abstractmethod
    def error_body(self, ex: Exchange, err: WardenError) -> bytes:
        """One of Warden's refusals as this API's error body (the status is ``err.status``)."""

    @abstractmethod
    def stream(self, ex: Exchange) -> StreamRenderer:
        """A renderer for one streamed answer of ``ex``."""

    def headers(self, ex: Exchange) -> dict[str, str]:
        """Response headers this API's clients read (besides ``x-request-id``)."""
        return {}
