"""The ``tools`` plugin: fenced tool calling.

Request phase (:meth:`ToolsPlugin.on_request`): offered tools are cut down to
what the principal may use (no write tools while read-only), the registry's
schemas replace the application's, and tool results in the history are
linked to their calls for the audit record.

Response phase (:meth:`ToolsPlugin.on_tool_call`): the core hands over every
complete tool call; the verdict (allow, deny, repair, hold) comes from
:class:`~plugins.tools.judge.ToolJudge`.  The core runs the corrective turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import Counter, OrderedDict
from typing import Any

from plugins.tools.admin import ToolsAdmin
from plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from plugins.tools.judge import ExchangeState, ToolJudge
from plugins.tools.policy import ModeState, permission_failure
from plugins.tools.request import fence_tools, scan_history
from plugins.tools.store import ToolStateStore
from proxy.errors import ConfigError, ServiceUnavailable
from proxy.exchange import Decision, Exchange, ToolCall
from proxy.plugin import Plugin, PluginContext

log = logging.getLogger("warden.tools")

HEADER = "x-warden-tool-decisions"
HEADER_MAX = 1024
MAX_TRACKED_EXCHANGES = 10000
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")
_VERDICT = {"allow": "allowed", "deny": "denied", "repair": "repair", "hold": "held"}


def decisions_header(ex: Exchange) -> str:
    """``refund=held:apr_123, lookup=allowed``: one entry per judged call, bounded."""
    if not ex.tool_decisions:
        return "none"
    parts: list[str] = []
    for rec in ex.tool_decisions:
        d = rec.decision
        name = _UNSAFE.sub("_", rec.call.name[:64]) or "_"
        entry = f"{name}={_VERDICT.get(d.kind, d.kind)}"
        if d.approval_id:
            entry += f":{_UNSAFE.sub('_', d.approval_id)}"
        elif d.kind in ("deny", "repair"):
            entry += f":{_UNSAFE.sub('_', d.rule)}"
        parts.append(entry)
    out = ""
    for i, entry in enumerate(parts):
        candidate = entry if not out else f"{out}, {entry}"
        if len(candidate) > HEADER_MAX - 16:
            return f"{out}, +{len(parts) - i} more" if out else f"+{len(parts)} more"
        out = candidate
    return out


class ToolsPlugin(Plugin):
    """Registry, schema validation, least privilege, read-only mode and approvals for tool calls."""

    name = "tools"
    config_section = "policy"
    config_type = PolicyConfig
    extra_sections = {"tools": list[ToolSpec]}

    section: PolicyConfig

    def __init__(self, section: PolicyConfig, tools: list[ToolSpec] | None = None) -> None:
        super().__init__(section)
        self.policy = section
        self._tools_given = tools is not None
        self.registry = ToolRegistry(tools or [])
        self.mode = ModeState(section.read_only)
        self.store: ToolStateStore | None = None
        self.judge = ToolJudge(self.registry, section, self.mode, None)
        self.decision_counts: Counter[tuple[str, str]] = Counter()
        self.approvals_pending = 0
        self._states: OrderedDict[str, ExchangeState] = OrderedDict()
        self._ctx: PluginContext | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._tool_calls_metric: Any = None

    # -- lifecycle -------------------------------------------------------

    async def start(self, ctx: PluginContext) -> None:
        """Compile the registry, open the state database, mount the admin API."""
        self._ctx = ctx
        if not self._tools_given:
            self._set_registry(ToolRegistry(ctx.config.plugin_sections.get("tools") or []))
        store = ToolStateStore(ctx.config.resolve_path(self.policy.state_db))
        await store.open()
        self.store = store
        self.judge.store = store
        await store.changed_elsewhere()
        await self._load_state()
        for method, path, handler in ToolsAdmin(self).routes():
            ctx.add_admin_route(method, path, handler)
        ctx.services["tools"] = self
        self._bind_metrics(ctx.services.get("metrics"))
        if self.policy.mode_refresh_s > 0:
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="tools-state-refresh")

    def _bind_metrics(self, metrics: Any) -> None:
        """Count decisions on the core's ``warden_tool_calls_total`` and export pending approvals."""
        self._tool_calls_metric = getattr(metrics, "tool_calls", None)
        registry = getattr(metrics, "registry", None)
        if registry is None:
            return
        from prometheus_client import Gauge

        try:
            gauge = Gauge("warden_tool_approvals_pending", "Tool-call approvals waiting for a reviewer.", registry=registry)
        except ValueError:
            return
        gauge.set_function(lambda: float(self.approvals_pending))

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
            self._refresh_task = None
        if self.store is not None:
            await self.store.close()
            self.store = None
            self.judge.store = None

    async def reload(self, section: PolicyConfig, tools: list[ToolSpec] | None = None, **extra_sections: Any) -> None:
        """Apply a new ``[policy]`` and (when given) ``[[tools]]``; schemas are recompiled.

        The core passes ``tools`` (this plugin's extra section) as a keyword.

        Raises ``ConfigError`` (the old configuration stays) when a tool is
        invalid or declared twice.  ``state_db`` cannot change without a restart.
        """
        registry = ToolRegistry(tools) if tools is not None else self.registry
        if section.state_db != self.policy.state_db and self.store is not None:
            raise ConfigError("policy.state_db", "cannot change on reload; restart Warden to move the state database")
        self.section = section
        self.policy = section
        self.judge.policy = section
        self.mode.config_default = section.read_only
        self._set_registry(registry)

    def _set_registry(self, registry: ToolRegistry) -> None:
        self.registry = registry
        self.judge.registry = registry

    async def _load_state(self) -> None:
        store = self.store_required()
        glob, tenants = await store.load_modes()
        self.mode.global_setting = glob
        self.mode.tenants = tenants
        self.approvals_pending = await store.pending_count()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.mode_refresh_s)
            try:
                if self.store is None:
                    return
                if await self.store.changed_elsewhere():
                    await self._load_state()
                else:
                    self.approvals_pending = await self.store.pending_count()
            except Exception:
                log.exception("refreshing the tool state failed; keeping the last known mode")

    def store_required(self) -> ToolStateStore:
        if self.store is None:
            raise ServiceUnavailable("the tool state store is not running", rule="policy.state_db")
        return self.store

    async def set_mode(self, tenant: str | None, read_only: bool | None, actor: dict[str, Any]) -> None:
        """Persist a read-only setting and apply it to the next request."""
        store = self.store_required()
        await store.set_mode(tenant, read_only, actor)
        glob, tenants = await store.load_modes()
        self.mode.global_setting = glob
        self.mode.tenants = tenants

    async def refresh_pending(self) -> None:
        self.approvals_pending = await self.store_required().pending_count()

    async def record_admin_action(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        if self._ctx is not None:
            await self._ctx.record_admin_action(kind, actor=actor, data=data)

    # -- hooks -----------------------------------------------------------

    def _state(self, ex: Exchange) -> ExchangeState:
        st = self._states.get(ex.request_id)
        if st is None:
            st = ExchangeState()
            self._states[ex.request_id] = st
            while len(self._states) > MAX_TRACKED_EXCHANGES:
                self._states.popitem(last=False)
        return st

    async def on_request(self, ex: Exchange) -> None:
        """Fence offered tools; enforce the registry schemas; link tool results.

        Raises ``Forbidden`` when ``tool_choice``/``function_call`` forces a
        tool the principal may not use.
        """
        ex.annotations["max_corrections"] = self.policy.max_corrections
        body = ex.body
        if not isinstance(body, dict):
            return
        if "tools" in body or "functions" in body:
            tenant = ex.principal.tenant if ex.principal is not None else None
            read_only, where = self.mode.read_only_for(tenant)
            registry = self.registry
            unknown_deny = self.policy.unknown_tools == "deny"

            def gate(name: str) -> tuple[str, str] | None:
                tool = registry.get(name)
                if tool is None:
                    if unknown_deny:
                        return "policy.unknown_tools", "it is not declared in the tool registry"
                    if read_only:
                        return "policy.read_only", f"undeclared tools count as write tools and read-only mode is on {where}"
                    return None
                denied = permission_failure(tool, ex.principal)
                if denied is not None:
                    return denied
                if tool.spec.effect == "write" and read_only:
                    return "policy.read_only", f"it is a write tool and read-only mode is on {where}"
                return None

            def lookup(name: str) -> tuple[dict[str, Any], str] | None:
                tool = registry.get(name)
                return None if tool is None else (tool.spec.schema, tool.spec.description)

            new_body, removed = fence_tools(body, gate, lookup)
            if removed:
                ex.annotations["tools_removed"] = {name: rule for name, (rule, _) in removed.items()}
            if new_body is not None:
                ex.set_body(new_body)
                body = new_body
        messages = body.get("messages")
        if isinstance(messages, list) and messages:
            hist = scan_history(messages, self.judge.is_write, self.policy.tool_result_max_bytes)
            if hist.results:
                ex.tool_results.extend(hist.results)
            if hist.executed:
                self._state(ex).executed = hist.executed

    async def on_tool_call(self, ex: Exchange, call: ToolCall) -> Decision:
        """Judge one complete tool call (see :mod:`plugins.tools.judge`)."""
        decision = await self.judge.judge(ex, call, self._state(ex))
        label = call.name if call.name in self.registry.tools else "(undeclared)"
        self.decision_counts[(label, decision.kind)] += 1
        if self._tool_calls_metric is not None:
            self._tool_calls_metric.labels(tool=label, decision=decision.kind).inc()
        if decision.details is not None and decision.details.get("approval") == "requested":
            self.approvals_pending += 1
        return decision

    async def on_response(self, ex: Exchange) -> None:
        """Add ``x-warden-tool-decisions`` summarising every verdict of the exchange."""
        ex.response_headers[HEADER] = decisions_header(ex)

    async def on_complete(self, ex: Exchange) -> None:
        """Forget the per-exchange state."""
        self._states.pop(ex.request_id, None)

    def metrics(self) -> dict[str, Any]:
        """Counters for the metrics exporter: decisions by (tool, kind), pending approvals."""
        return {"decisions": dict(self.decision_counts), "approvals_pending": self.approvals_pending}
