"""The Warden server object: owns config, clients, the plugin chain and both apps.

Nothing is built at import time; ``Warden(config)`` composes the parts and
``start()``/``stop()`` bring them up and down in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llm_warden.proxy import dataplane
from llm_warden.proxy.admin import build_admin_app
from llm_warden.proxy.audit.base import AuditSink
from llm_warden.proxy.auth import Authenticator
from llm_warden.proxy.config import Config, load_config
from llm_warden.proxy.errors import ConfigError, WardenError
from llm_warden.proxy.exchange import Exchange, UpstreamTurn
from llm_warden.proxy.headers import safe_text
from llm_warden.proxy.logs import add_secrets
from llm_warden.proxy.metrics import Metrics
from llm_warden.proxy.pipeline import Pipeline
from llm_warden.proxy.plugin import Plugin, PluginChain, PluginContext, available_plugins
from llm_warden.proxy.secrets import secret_values
from llm_warden.proxy.upstream import Upstream, UpstreamResponse

if TYPE_CHECKING:
    from llm_warden.proxy.mcp.gateway import McpGateway
    from llm_warden.proxy.tracing import Tracing

log = logging.getLogger("warden")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


async def _reload_plugin(plugin: Plugin, sections: dict[str, Any]) -> None:
    extras = {name: sections.get(name) for name in type(plugin).extra_sections}
    await plugin.reload(sections.get(type(plugin).config_section or ""), **extras)


class Warden:
    """One Warden instance: data plane, admin plane and everything they share."""

    def __init__(
        self,
        config: Config,
        plugin_classes: dict[str, type[Plugin]] | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        self.config = config
        self.plugin_classes = plugin_classes if plugin_classes is not None else available_plugins()
        self.auth = Authenticator(config.auth, config)
        self.upstream = Upstream(config.upstream)
        self.metrics = Metrics(config.metrics)
        self.tracing: Tracing | None = None
        if config.tracing.enabled:
            from llm_warden.proxy.tracing import Tracing

            self.tracing = Tracing(config)
        add_secrets(secret_values(config))
        self.audit = audit
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.begun = 0
        """Data-plane requests begun since start (only grows)."""
        self.admin_routes: list[tuple[str, str, Any]] = []
        self.services: dict[str, Any] = {"upstream": self.upstream, "metrics": self.metrics, "warden": self}
        plugins: list[Plugin] = []
        for name in config.plugins.enabled:
            cls = self.plugin_classes[name]
            section = config.plugin_sections.get(cls.config_section) if cls.config_section else None
            plugins.append(cls(section))
        self.chain = PluginChain(plugins)
        self.mcp: McpGateway | None = None
        if config.mcp.servers:
            from llm_warden.proxy.mcp.gateway import McpGateway

            self.mcp = McpGateway(self, config.mcp)
        self.pipeline = Pipeline(self, dataplane.FLOWS)
        self.stream_cut = asyncio.Event()
        """Set at the drain deadline: every open stream ends at once with an error event (rule ``server.drain``)."""
        self._cut_watch: asyncio.Task[None] | None = None
        if config.auth.mode == "none":
            log.warning(
                "AUTH IS OFF ([auth] mode = \"none\"): every request runs as tenant %r, user %r. Use this for local trials only.",
                config.auth.dev_tenant,
                config.auth.dev_subject,
            )

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the upstream client, the audit store and every plugin, in that order.

        When any step fails, what already started is stopped again before the
        error propagates — plugins in reverse (the failing one too, so it can
        release what it opened before raising), then the audit store (its
        writer process reaped) and the clients.  Otherwise the store's
        threads and writer child would keep the process from exiting.
        """
        started: list[Plugin] = []
        try:
            await self.upstream.start()
            if self.audit is not None:
                await self.audit.start()
                self.services["audit"] = self.audit
                self.metrics.bind_audit(self.audit)
            for plugin in self.chain.plugins:
                ctx = PluginContext(
                    config=self.config,
                    section=plugin.section,
                    services=self.services,
                    audit_event=self.record_event,
                )
                started.append(plugin)
                try:
                    await plugin.start(ctx)
                except Exception as e:
                    log.error("plugin %s failed to start: %s: %s", plugin.name, type(e).__name__, e)
                    raise
                self.admin_routes.extend(ctx.admin_routes)
            if self.mcp is not None:
                await self.mcp.start()
                self.admin_routes.extend(self.mcp.admin_routes())
        except BaseException:
            await self._shutdown(started)
            raise
        self._cut_watch = asyncio.create_task(self._watch_cut())
        self.ready = True

    async def _watch_cut(self) -> None:
        await self.stream_cut.wait()
        n = self.pipeline.cut_streams()
        if n:
            log.warning("drain deadline: %d open stream(s) ended with an error event", n)

    async def stop(self) -> None:
        await self._shutdown(self.chain.plugins)

    async def _shutdown(self, plugins: list[Plugin]) -> None:
        """Stop ``plugins`` (in reverse), the audit store and the clients; every step runs even when one fails."""
        self.ready = False
        if self._cut_watch is not None:
            self._cut_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cut_watch
            self._cut_watch = None
        if self.mcp is not None:
            try:
                await self.mcp.stop()
            except Exception:
                log.exception("the MCP gateway failed to stop cleanly")
        for plugin in reversed(plugins):
            try:
                await plugin.stop()
            except Exception:
                log.exception("plugin %s failed to stop cleanly", plugin.name)
        try:
            if self.audit is not None:
                await self.audit.stop()
        finally:
            await self.upstream.close()
            await self.auth.close()
            if self.tracing is not None:
                await self.tracing.shutdown()

    async def reload(self, path: str | None = None) -> dict[str, Any]:
        """Re-read the config file and apply plugin sections (policy, tools, limits...).

        An invalid file is refused and the running config stays.  Core
        sections (listeners, upstream, auth, audit) need a restart: a change
        there is reported, not applied.
        """
        source = path or self.config.path
        try:
            if source is None:
                raise ConfigError("<file>", "this server was not started from a config file")
            new = load_config(source, self.plugin_classes)
            if new.plugins.enabled != self.config.plugins.enabled:
                raise ConfigError("plugins.enabled", "changing the plugin list needs a restart")
            await self._reload_plugins(new.plugin_sections)
        except ConfigError as e:
            self.metrics.config_reloads.labels(result="refused").inc()
            log.error("config reload refused, the running config stays: %s", e)
            await self.record_event("config_reload", {"subject": "warden"}, {"result": "refused", "error": str(e)})
            return {"result": "refused", "error": str(e)}
        restart = [
            name
            for name in ("server", "upstream", "auth", "admin", "audit", "database", "metrics", "tracing", "logging", "mcp")
            if getattr(new, name) != getattr(self.config, name)
        ]
        self.config.plugin_sections = new.plugin_sections
        self.metrics.config_reloads.labels(result="applied").inc()
        if restart:
            log.warning("config reload applied plugin sections; changes to [%s] need a restart", "], [".join(restart))
        else:
            log.info("config reloaded from %s", source)
        await self.record_event("config_reload", {"subject": "warden"}, {"result": "applied", "needs_restart": restart})
        return {"result": "applied", "needs_restart": restart}

    async def _reload_plugins(self, sections: dict[str, Any]) -> None:
        """Give every plugin its new sections, all or nothing: when one refuses,
        those already reloaded get their running sections back."""
        done: list[Plugin] = []
        try:
            for plugin in self.chain.plugins:
                if type(plugin).config_section is not None:
                    await _reload_plugin(plugin, sections)
                    done.append(plugin)
        except ConfigError:
            for plugin in done:
                try:
                    await _reload_plugin(plugin, self.config.plugin_sections)
                except Exception:
                    log.exception("plugin %s could not return to its running config", plugin.name)
            raise

    # -- apps ----------------------------------------------------------------------

    def data_app(self) -> web.Application:
        return dataplane.build_data_app(self)

    def admin_app(self) -> web.Application:
        return build_admin_app(self)

    # -- per request ---------------------------------------------------------------

    def new_exchange(self, request: web.Request) -> Exchange:
        """The identify stage: request id, trace context and client address of a new exchange.

        The caller's ``x-request-id`` is kept only when it is a strict token
        (it becomes an index key and a header); otherwise the exchange gets a
        new id and the caller's value is recorded, escaped and redacted.
        """
        rand = os.urandom(36).hex()
        rid = request.headers.get("x-request-id")
        ex = Exchange(request_id="", route="unrouted", method=safe_text(request.method, 32), path=safe_text(request.raw_path.partition("?")[0], 2048))
        if rid is None or not _REQUEST_ID.match(rid) or self._redacts(rid):
            if rid is not None:
                ex.client_request_id = safe_text(rid, 256)
            rid = "req_" + rand[:24]
        ex.request_id = rid
        tp = request.headers.get("traceparent")
        m = _TRACEPARENT.match(tp) if tp else None
        if m and m.group(1) != "ff" and m.group(2) != "0" * 32 and m.group(3) != "0" * 16:
            ex.trace_id = m.group(2)
            ex.traceparent = f"00-{ex.trace_id}-{rand[24:40]}-{m.group(4)}"
        else:
            ex.trace_id = rand[40:72]
            ex.traceparent = f"00-{ex.trace_id}-{rand[24:40]}-01"
        ex.client_ip = request.remote
        return ex

    def _redacts(self, text: str) -> bool:
        """Whether the audit log's redaction would change ``text`` (a secret-looking id is never an index key)."""
        projector = getattr(self.audit, "projector", None)
        if projector is None:
            return False
        return bool(projector.redactor.value(text, {}, pii=False) != text)

    def upstream_extra_headers(self, ex: Exchange) -> dict[str, str]:
        h = {"x-request-id": ex.request_id, "content-type": "application/json"}
        if ex.traceparent:
            h["traceparent"] = ex.traceparent
        return h

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        if self.audit is None:
            return
        await self.audit.record_event(kind, actor, data)
        self.metrics.audit_records.labels(kind=kind).inc()

    async def send_turn(self, ex: Exchange, method: str, path: str, body: bytes | None, headers: dict[str, str], reason: str = "initial", payload: Any = None) -> tuple[UpstreamTurn, UpstreamResponse]:
        """Start one upstream turn of ``ex``: recorded on the exchange, with its own span id in ``traceparent``; a failure is kept on the turn."""
        span_id = os.urandom(8).hex()
        turn = UpstreamTurn(index=len(ex.turns), body=body or b"", started=time.perf_counter(), reason=reason, payload=payload, span_id=span_id)
        ex.turns.append(turn)
        if ex.traceparent:
            headers["traceparent"] = f"00-{ex.trace_id}-{span_id}-{ex.traceparent[-2:]}"
        try:
            ur = await self.upstream.send(method, path, body, headers)
        except WardenError as e:
            turn.error = e.message
            turn.error_kind = "timeout" if e.status == 504 else "connection"
            turn.duration_s = time.perf_counter() - turn.started
            raise
        turn.status = ur.status
        return turn, ur
