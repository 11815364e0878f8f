"""The MCP gateway's lifecycle and shared state: upstream clients, stdio supervisors, pins, metrics, admin API."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from llm_warden.proxy.errors import BadRequest, NotFound
from llm_warden.proxy.mcp.config import McpConfig, McpServerConfig
from llm_warden.proxy.mcp.pins import PinStore
from llm_warden.proxy.mcp.sessions import SessionSealer
from llm_warden.proxy.mcp.upstream import HttpUpstream, StdioServer

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden

MAX_RECENT_WRITES = 10000


class McpGateway:
    """Everything the MCP flow shares across requests (built by :class:`~proxy.app.Warden` when ``[mcp] servers`` is set)."""

    def __init__(self, w: Warden, cfg: McpConfig) -> None:
        self.w = w
        self.cfg = cfg
        self.servers: dict[str, McpServerConfig] = {s.name: s for s in cfg.servers}
        self.sealer = SessionSealer(cfg.session_key())
        self.pins = PinStore(w.config.resolve_path(cfg.pin_db))
        self.http: dict[str, HttpUpstream] = {}
        self.stdio: dict[str, StdioServer] = {s.name: StdioServer(s, cfg.max_message_bytes) for s in cfg.servers if s.transport == "stdio"}
        self._client: aiohttp.ClientSession | None = None
        self.recent_writes: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()
        """(session, tool, canonical arguments digest) → (request id, when) of write calls that succeeded."""
        self.writes_in_flight: dict[tuple[str, str, str], float] = {}
        """Keys of allowed write calls not yet answered → when they were allowed (an identical call meanwhile is refused)."""
        self.reported_changes: set[tuple[str, str, str]] = set()
        self.background: set[asyncio.Task[None]] = set()
        m = w.metrics
        self.requests = m.counter("warden_mcp_requests", "MCP messages relayed or refused, by server, method and outcome.", ("server", "method", "outcome"))
        self.tool_calls = m.counter("warden_mcp_tool_calls", "MCP tool calls judged, by server, tool (configured names only) and decision.", ("server", "tool", "decision"))
        self.hidden = m.counter("warden_mcp_tools_hidden", "Upstream tools withheld from tools/list, by server and rule.", ("server", "rule"))
        m.gauge("warden_mcp_stdio_restarts", "Restarts of supervised stdio MCP servers, by server.", ("server",), callback=lambda: {n: float(s.restarts) for n, s in self.stdio.items()})
        m.gauge("warden_mcp_stdio_up", "1 while a supervised stdio MCP server is initialized and serving.", ("server",), callback=lambda: {n: 1.0 if s.ready else 0.0 for n, s in self.stdio.items()})

    async def start(self) -> None:
        await self.pins.load()
        self._client = aiohttp.ClientSession(auto_decompress=True)
        for s in self.cfg.servers:
            if s.transport == "http":
                self.http[s.name] = HttpUpstream(s, self._client)
        for srv in self.stdio.values():
            await srv.start()

    async def stop(self) -> None:
        for srv in self.stdio.values():
            await srv.stop()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- duplicate-mutation guard ---------------------------------------------

    def earlier_write(self, key: tuple[str, str, str]) -> str | None:
        """The request id of an identical write call that succeeded within ``duplicate_window_s``."""
        hit = self.recent_writes.get(key)
        if hit is None:
            return None
        if time.monotonic() - hit[1] > self.cfg.duplicate_window_s:
            self.recent_writes.pop(key, None)
            return None
        return hit[0]

    def reserve_write(self, key: tuple[str, str, str], max_age_s: float) -> bool:
        """Mark ``key`` in flight; ``False`` when an identical call already is (a reservation older than ``max_age_s`` lapses)."""
        now = time.monotonic()
        since = self.writes_in_flight.get(key)
        if since is not None and now - since <= max_age_s:
            return False
        if len(self.writes_in_flight) >= MAX_RECENT_WRITES:
            self.writes_in_flight = {k: t for k, t in self.writes_in_flight.items() if now - t <= max_age_s}
        self.writes_in_flight[key] = now
        return True

    def remember_write(self, key: tuple[str, str, str], request_id: str) -> None:
        if self.cfg.duplicate_window_s <= 0:
            return
        self.recent_writes[key] = (request_id, time.monotonic())
        self.recent_writes.move_to_end(key)
        while len(self.recent_writes) > MAX_RECENT_WRITES:
            self.recent_writes.popitem(last=False)

    # -- admin API ------------------------------------------------------------

    def admin_routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/admin/mcp/pins", self._list_pins), ("POST", "/admin/mcp/pins", self._accept_pin)]

    def pin_table(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, s in self.servers.items():
            tools: dict[str, Any] = {}
            names = {t for (srv, t) in self.pins.seen if srv == name} | {t for (srv, t) in self.pins.accepted if srv == name} | set(s.pins)
            for tool in sorted(names):
                seen = self.pins.seen.get((name, tool))
                entry = {"config": s.pins.get(tool), "accepted": self.pins.accepted.get((name, tool)), "seen": seen}
                entry["status"] = self.pins.status(name, tool, seen, s.pins.get(tool)) if seen else "not seen"
                tools[tool] = entry
            out[name] = tools
        return out

    async def _list_pins(self, request: web.Request) -> web.Response:
        from llm_warden.proxy.admin import json_response, require_all_tenants

        require_all_tenants(request, "MCP tool pins")
        return json_response({"servers": self.pin_table()})

    async def _accept_pin(self, request: web.Request) -> web.Response:
        """``{"server", "tool", "digest"}``: accept a tool's description and schema (audited as ``mcp_pin_accepted``)."""
        from llm_warden.proxy.admin import admin_principal, json_response, require_all_tenants

        require_all_tenants(request, "MCP tool pins")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("the body must be JSON", rule="admin.mcp.pins") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object {server, tool, digest}", rule="admin.mcp.pins")
        server, tool, digest = body.get("server"), body.get("tool"), body.get("digest")
        if not isinstance(server, str) or server not in self.servers:
            raise NotFound("no such MCP server", rule="admin.mcp.pins")
        if not isinstance(tool, str) or not 0 < len(tool) <= 128 or not tool.isprintable():
            raise BadRequest("tool must be a tool name", rule="admin.mcp.pins")
        if not isinstance(digest, str) or len(digest) != 71 or not digest.startswith("sha256:") or any(c not in "0123456789abcdef" for c in digest[7:]):
            raise BadRequest("digest must be 'sha256:' and 64 lowercase hex digits", rule="admin.mcp.pins")
        admin = admin_principal(request)
        previous = await self.pins.accept(server, tool, digest, admin.subject)
        await self.w.record_event("mcp_pin_accepted", admin.summary(), {"server": server, "tool": tool, "digest": digest, "previous": previous})
        return json_response({"server": server, "tool": tool, "digest": digest, "previous": previous})
