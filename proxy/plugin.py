"""The plugin interface and the chain that runs it.

A plugin is one concern (tools, retrieval, limits, ...) in ``plugins/``.  It
subclasses :class:`Plugin` and overrides only the hooks it needs; the chain
precomputes, at load, which plugins implement which hook, so an unused hook
costs nothing on the hot path.

Order: request hooks run in the configured order, response and complete
hooks in reverse (like Envoy filters); the runner in :mod:`proxy.pipeline`
calls them, once each, for every data-plane request whatever its fate.  A
hook refuses by raising a :class:`~proxy.errors.WardenError`.

The core never imports a plugin by name: plugin classes are found through the
``warden.plugins`` entry point group (see ``pyproject.toml``), whose single
composition root is ``plugins/__init__.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, Exchange, ToolCall, ToolOffer

if TYPE_CHECKING:
    from llm_warden.proxy.config import Config

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class StreamEvent:
    """One SSE event of a streamed answer, whole (never a partial frame).

    ``data`` is the parsed JSON chunk (``None`` for ``[DONE]`` or a non-JSON
    event).  A hook that changes ``data`` sets ``modified``; the core then
    re-serializes it.  Setting ``drop`` removes the event from the stream.
    """

    raw: bytes
    data: dict[str, Any] | None
    modified: bool = False
    drop: bool = False


@dataclass
class PluginContext:
    """What a plugin gets at start: its config, shared services, and registration points."""

    config: Config
    section: Any
    services: dict[str, Any]
    admin_routes: list[tuple[str, str, AdminHandler]] = field(default_factory=list)
    audit_event: Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[None]] | None = None

    def add_admin_route(self, method: str, path: str, handler: AdminHandler) -> None:
        """Register a route on the admin listener; the core enforces admin auth on it."""
        self.admin_routes.append((method, path, handler))

    async def record_admin_action(self, action: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        """Write an admin-action audit record (mode change, approval, ingest...)."""
        if self.audit_event is not None:
            await self.audit_event(action, actor, data)


class Plugin:
    """Base class of every plugin.  Override only what you need.

    Class attributes:
      - ``name``: the name used in ``[plugins] enabled``.
      - ``config_section``: the TOML section the plugin owns (``None`` for none).
      - ``config_type``: a dataclass that section is validated into.
      - ``db_migrations``: PostgreSQL schema components the plugin owns, by
        name, each a folder of migrations (``warden db migrate`` applies them).
    """

    name: ClassVar[str] = ""
    config_section: ClassVar[str | None] = None
    config_type: ClassVar[type | None] = None
    extra_sections: ClassVar[dict[str, Any]] = {}
    db_migrations: ClassVar[dict[str, Path]] = {}

    def __init__(self, section: Any) -> None:
        self.section = section

    async def start(self, ctx: PluginContext) -> None:
        """Called once when the server starts, before it is ready."""

    async def stop(self) -> None:
        """Called once at shutdown, after in-flight requests drained.

        Also called when the server's start failed after this plugin's
        ``start`` was entered (its own or a later one's failed), so it must
        cope with a start that did not finish.
        """

    def ready(self) -> str | None:
        """Why this plugin cannot serve now (``/readyz`` answers 503 with it), or ``None`` when it can.

        Asked on every readiness probe: answer from state the plugin keeps, never by I/O.
        """
        return None

    async def reload(self, section: Any, **extra_sections: Any) -> None:
        """Apply a new validated config section (SIGHUP / file change).

        The plugin's ``extra_sections`` (e.g. ``[[tools]]``) come as keyword
        arguments named after them.  Raise :class:`~proxy.errors.ConfigError`
        to refuse; the old one stays.
        """
        self.section = section

    async def on_request(self, ex: Exchange) -> None:
        """Fires after auth, routing and body parsing, before the flow (the first upstream call).

        May change ``ex.body`` through ``ex.set_body``, add
        ``ex.response_headers`` or set ``ex.local_reply``.  Raise a
        ``WardenError`` to refuse.  Not called when an earlier stage refused.
        """

    async def on_response(self, ex: Exchange) -> None:
        """Fires once the reply is known, before it is sent (non-streaming) or
        after the last relayed event and before the stream's end (streaming).

        Called for every whole reply — the provider's answer, a relayed
        provider error, a local reply, or Warden's own refusal (then
        ``ex.error`` is set).  Not called for a stream that was cut.  May
        change ``ex.response_body`` (setting ``ex.response_modified``) and
        ``ex.response_headers``; raising a ``WardenError`` turns the reply
        into that refusal.
        """

    async def on_stream_event(self, ex: Exchange, event: StreamEvent) -> None:
        """Fires for every whole SSE event relayed to the client.  Tool-call
        deltas are not shown here: they are assembled and judged with
        ``on_tool_call`` first."""

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision | None:
        """Judge one complete tool call.  Return ``None`` to abstain."""
        return None

    def on_tool_offer(self, ex: Exchange, name: str, server: str) -> ToolOffer | None:
        """May MCP server ``server``'s tool ``name`` be shown to this exchange's principal now (the MCP gateway's ``tools/list``)?

        Answer from configuration and state the plugin keeps (never I/O);
        ``None`` abstains.  A call is still judged by ``on_tool_call``."""
        return None

    async def on_complete(self, ex: Exchange) -> None:
        """Fires once for every exchange, after the response hooks and before
        the audit record is written (so what it settles is recorded), whatever
        the fate of the request.  For reconciliation and bookkeeping; must not
        raise (an exception is logged and ignored)."""

    def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
        """What this plugin wants in the exchange's audit record (under
        ``plugins.<name>``), asked at the record stage after every hook ran.

        Plain JSON values only; redacted like the rest of the record.
        Plugin-private state (``ex.slots``) is never recorded otherwise.
        """
        return None

    @classmethod
    def add_cli(cls, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        """Add ``warden`` subcommands; each must set ``func(args) -> int``."""


HOOKS = ("on_request", "on_response", "on_stream_event", "on_tool_call", "on_tool_offer", "on_complete", "audit_fields")


def available_plugins() -> dict[str, type[Plugin]]:
    """Plugin classes by name, from the ``warden.plugins`` entry point group."""
    found: dict[str, type[Plugin]] = {}
    for ep in entry_points(group="warden.plugins"):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise ConfigError("plugins", f"entry point {ep.name!r} is not a Plugin")
        found[ep.name] = cls
    return found


class PluginChain:
    """The configured plugins, with per-hook lists precomputed at load."""

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self.by_hook: dict[str, list[Plugin]] = {}
        for hook in HOOKS:
            base = getattr(Plugin, hook)
            impl = [p for p in plugins if getattr(type(p), hook) is not base]
            self.by_hook[hook] = impl
        self.request = self.by_hook["on_request"]
        self.response = list(reversed(self.by_hook["on_response"]))
        self.stream = list(reversed(self.by_hook["on_stream_event"]))
        self.tool = self.by_hook["on_tool_call"]
        self.offer = self.by_hook["on_tool_offer"]
        self.complete = list(reversed(self.by_hook["on_complete"]))
        self.audit = self.by_hook["audit_fields"]

    def get(self, name: str) -> Plugin | None:
        for p in self.plugins:
            if p.name == name:
                return p
        return None

    async def run_request(self, ex: Exchange) -> None:
        for p in self.request:
            await p.on_request(ex)

    async def run_response(self, ex: Exchange) -> None:
        for p in self.response:
            await p.on_response(ex)

    async def run_stream_event(self, ex: Exchange, event: StreamEvent) -> None:
        for p in self.stream:
            await p.on_stream_event(ex, event)
            if event.drop:
                return

    async def judge_tool_call(self, ex: Exchange, call: ToolCall) -> Decision:
        """The first non-allow verdict wins; all abstaining means allow."""
        verdict: Decision | None = None
        for p in self.tool:
            d = await p.on_tool_call(ex, call)
            if d is None:
                continue
            if d.kind != "allow":
                return d
            verdict = d
        return verdict or Decision.allow("no_tool_policy")

    def offer_tool(self, ex: Exchange, name: str, server: str) -> ToolOffer | None:
        """The first refusal wins; ``None`` when no plugin governs tools (the caller then hides the tool)."""
        verdict: ToolOffer | None = None
        for p in self.offer:
            o = p.on_tool_offer(ex, name, server)
            if o is None:
                continue
            if not o.allowed:
                return o
            verdict = verdict or o
        return verdict
