"""The Warden server object: owns config, clients, the plugin chain and both apps.

Nothing is built at import time; ``Warden(config)`` composes the parts and
``start()``/``stop()`` bring them up and down in order.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy import dataplane
from proxy.admin import build_admin_app
from proxy.audit.base import AuditSink
from proxy.auth import Authenticator
from proxy.config import Config, load_config
from proxy.errors import AuditUnavailable, ConfigError, ServiceUnavailable, WardenError, error_body
from proxy.exchange import Exchange, UpstreamTurn
from proxy.logs import add_secret
from proxy.metrics import Metrics
from proxy.plugin import Plugin, PluginChain, PluginContext, available_plugins
from proxy.upstream import Upstream, UpstreamResponse

if TYPE_CHECKING:
    from proxy.tracing import Tracing

log = logging.getLogger("warden")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


async def _feedback_flow(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    """``POST /v1/feedback``: the authenticated principal's verdict on one of its tenant's exchanges."""
    from proxy.audit.feedback import submit_feedback

    if w.audit is None:
        raise ServiceUnavailable("feedback needs the audit log, which is disabled", rule="audit.enabled")
    assert ex.principal is not None
    result = await submit_feedback(w.audit, ex.principal, ex.body)  # type: ignore[arg-type]
    ex.status = 200
    ex.response_body = result
    await w.finish(ex)
    return web.Response(status=200, body=orjson.dumps(result), headers=w.response_headers(ex, {"Content-Type": "application/json"}))


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
            from proxy.tracing import Tracing

            self.tracing = Tracing(config)
        add_secret(config.upstream.api_key)
        self.audit = audit
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.admin_routes: list[tuple[str, str, Any]] = []
        self.services: dict[str, Any] = {"upstream": self.upstream, "metrics": self.metrics, "warden": self}
        plugins: list[Plugin] = []
        for name in config.plugins.enabled:
            cls = self.plugin_classes[name]
            section = config.plugin_sections.get(cls.config_section) if cls.config_section else None
            plugins.append(cls(section))
        self.chain = PluginChain(plugins)
        self._forward_extra = {"X-Warden-Proxy": "1"}
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
        except BaseException:
            await self._shutdown(started)
            raise
        self.ready = True

    async def stop(self) -> None:
        await self._shutdown(self.chain.plugins)

    async def _shutdown(self, plugins: list[Plugin]) -> None:
        """Stop ``plugins`` (in reverse), the audit store and the clients; every step runs even when one fails."""
        self.ready = False
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
        restart = [name for name in ("server", "upstream", "auth", "admin", "audit", "metrics", "tracing", "logging") if getattr(new, name) != getattr(self.config, name)]
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

    def extra_data_routes(self) -> list[tuple[str, str, str, Any, bool]]:
        """Data-plane routes owned by core parts other than the proxy flows: (method, path, route name, flow, parse JSON)."""
        return [("POST", "/v1/feedback", "feedback", _feedback_flow, True)]

    def data_app(self) -> web.Application:
        return dataplane.build_data_app(self)

    def admin_app(self) -> web.Application:
        return build_admin_app(self)

    # -- per request ---------------------------------------------------------------

    def new_exchange(self, request: web.Request, route: str) -> Exchange:
        rand = os.urandom(36).hex()
        rid = request.headers.get("x-request-id")
        if rid is None or not _REQUEST_ID.match(rid):
            rid = "req_" + rand[:24]
        ex = Exchange(request_id=rid, route=route, method=request.method, path=request.path)
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

    def upstream_extra_headers(self, ex: Exchange) -> dict[str, str]:
        h = {"x-request-id": ex.request_id, "content-type": "application/json"}
        if ex.traceparent:
            h["traceparent"] = ex.traceparent
        return h

    def response_headers(self, ex: Exchange, base: dict[str, str]) -> dict[str, str]:
        out = dict(base)
        out.update(ex.response_headers)
        out["x-request-id"] = ex.request_id
        return out

    async def finish(self, ex: Exchange) -> None:
        """End the exchange and write its audit record (once).

        In ``sync`` durability this returns only after the record is
        committed, and raises ``AuditUnavailable`` (503) when it cannot be.
        """
        if ex.recorded:
            return
        ex.recorded = True
        ex.ended = time.perf_counter()
        if self.audit is None:
            return
        try:
            await self.audit.record_exchange(ex)
        except AuditUnavailable:
            self.metrics.audit_write_failures.inc()
            raise
        except Exception:
            self.metrics.audit_write_failures.inc()
            log.exception("audit write failed for %s", ex.request_id)
            raise AuditUnavailable("the audit log cannot be written; refusing to answer without a record", rule="audit.durability") from None
        self.metrics.audit_records.labels(kind="exchange").inc()

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        if self.audit is None:
            return
        await self.audit.record_event(kind, actor, data)
        self.metrics.audit_records.labels(kind=kind).inc()

    def error_response(self, ex: Exchange, err: WardenError) -> web.Response:
        headers = {"Content-Type": "application/json", **err.headers}
        if err.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="warden"'
        return web.Response(status=err.status, body=error_body(err), headers=self.response_headers(ex, headers))

    async def refuse(self, ex: Exchange, err: WardenError) -> web.Response:
        """Answer with an OpenAI-format error, recorded in the audit log first."""
        ex.error = err
        ex.status = err.status
        if err.rule:
            self.metrics.refusals.labels(rule=err.rule[:64], status=str(err.status)).inc()
        try:
            await self.finish(ex)
        except WardenError as audit_err:
            ex.error = audit_err
            ex.status = audit_err.status
            return self.error_response(ex, audit_err)
        return self.error_response(ex, err)

    async def relay_upstream_error(self, ex: Exchange, ur: UpstreamResponse, raw: bytes) -> web.Response:
        """Relay a provider error status with its body (made OpenAI-shaped if it is not)."""
        ex.status = ur.status
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
            text = raw[:500].decode("utf-8", "replace") if raw else ""
            parsed = {"error": {"message": f"provider answered {ur.status}: {text}".strip(), "type": "api_error", "code": "upstream_error", "param": None}}
            raw = orjson.dumps(parsed)
        ex.response_body = parsed
        ex.error_detail = str(parsed["error"].get("message", ""))[:500]
        await self.finish(ex)
        headers = {"Content-Type": "application/json", **ur.relay_headers()}
        headers["Content-Type"] = "application/json"
        return web.Response(status=ur.status, body=raw, headers=self.response_headers(ex, headers))

    async def send_turn(self, ex: Exchange, method: str, path: str, body: bytes | None, headers: dict[str, str], reason: str = "initial") -> tuple[UpstreamTurn, UpstreamResponse]:
        """Start one upstream turn of ``ex``: recorded on the exchange, failures counted and kept on the turn."""
        turn = UpstreamTurn(index=len(ex.turns), body=body or b"", started=time.perf_counter(), reason=reason)
        ex.turns.append(turn)
        try:
            ur = await self.upstream.send(method, path, body, headers)
        except WardenError as e:
            turn.error = e.message
            turn.duration_s = time.perf_counter() - turn.started
            self.count_upstream_error(e)
            raise
        turn.status = ur.status
        return turn, ur

    def count_upstream_error(self, err: WardenError) -> None:
        kind = "timeout" if err.status == 504 else "connection"
        self.metrics.upstream_errors.labels(kind=kind).inc()
