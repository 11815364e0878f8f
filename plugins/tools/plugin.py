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

import argparse
import asyncio
import contextlib
import logging
import re
from collections import Counter
from typing import Any

from llm_warden.plugins.tools.admin import ToolsAdmin
from llm_warden.plugins.tools.check import ToolPolicy, offer_failure
from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.judge import ExchangeState, ToolJudge
from llm_warden.plugins.tools.offer import offer
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.plugins.tools.request import fence_tools, scan_history
from llm_warden.plugins.tools.store import StateBackendDown, ToolStateStore, ToolStore
from llm_warden.proxy.errors import BadRequest, ConfigError, ServiceUnavailable
from llm_warden.proxy.exchange import Decision, Exchange, Principal, StateKey, ToolCall, ToolOffer
from llm_warden.proxy.plugin import Plugin, PluginContext

log = logging.getLogger("warden.tools")

HEADER = "x-warden-tool-decisions"
HEADER_MAX = 1024
DEPRECATION_HEADER = "x-warden-deprecation"
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


STATE_KEY = StateKey("tools", ExchangeState)


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
        self.store: ToolStore | None = None
        self.judge = ToolJudge(self.registry, section, self.mode, None)
        self.decision_counts: Counter[tuple[str, str]] = Counter()
        self.deprecated_calls: Counter[tuple[str, str, str]] = Counter()
        """Judged calls of deprecated versions by (tool, version, ``warned`` | ``retired``)."""
        self.approvals_pending = 0
        self._ctx: PluginContext | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def add_cli(cls, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        """``warden policy test CASES``."""
        from llm_warden.plugins.tools.cli import add_cli

        add_cli(sub)

    # -- lifecycle -------------------------------------------------------

    async def start(self, ctx: PluginContext) -> None:
        """Compile the registry, open the state database, mount the admin API."""
        self._ctx = ctx
        if not self._tools_given:
            self._set_registry(ToolRegistry(ctx.config.plugin_sections.get("tools") or []))
        store = self._make_store(ctx)
        try:
            await store.open()
        except StateBackendDown:
            # Redis down at start: come up refusing approvals and read-only
            # until the refresh loop reaches it (fail closed).
            self.mode.loaded = False
        except BaseException:
            await store.close()
            raise
        self.store = store
        self.judge.store = store
        if self.mode.loaded:
            try:
                await store.changed_elsewhere()
                await self._load_state()
            except StateBackendDown:
                self.mode.loaded = False
        for method, path, handler in ToolsAdmin(self).routes():
            ctx.add_admin_route(method, path, handler)
        ctx.services["tools"] = self
        self._bind_metrics(ctx.services.get("metrics"))
        if self.policy.mode_refresh_s > 0 or not self.mode.loaded:
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="tools-state-refresh")

    def _make_store(self, ctx: PluginContext) -> ToolStore:
        """The store named by ``state_backend``."""
        if self.policy.state_backend == "redis":
            from llm_warden.plugins.tools.redis_store import RedisToolStateStore

            return RedisToolStateStore(self.policy.redis_url, self.policy.redis_key_prefix)
        return ToolStateStore(ctx.config.resolve_path(self.policy.state_db))

    def _bind_metrics(self, metrics: Any) -> None:
        """Expose pending approvals and read-only mode at scrape time.

        Decisions are counted by the core from ``ex.tool_decisions``
        (``warden_tool_calls_total``), not here.
        """
        if metrics is None:
            return
        metrics.gauge("warden_approvals_pending", "Tool-call approvals waiting for a reviewer.", callback=lambda: float(self.approvals_pending))
        metrics.counter(
            "warden_tool_deprecated_calls",
            "Calls of deprecated tool versions, by tool, version and status (warned: before the sunset, allowed with a warning; retired: refused).",
            ("tool", "version", "status"),
            callback=self._deprecated_counts,
        )
        metrics.gauge("warden_read_only", "1 while read-only mode is on, per tenant ('*' = global).", ("tenant",), callback=self._read_only_gauge)

    def _deprecated_counts(self) -> dict[tuple[str, ...], float]:
        return {k: float(v) for k, v in self.deprecated_calls.items()}

    def _read_only_gauge(self) -> dict[str, float]:
        out = {"*": 1.0 if self.mode.global_read_only else 0.0}
        for tenant, setting in self.mode.tenants.items():
            out[tenant] = 1.0 if setting.read_only else 0.0
        return out

    async def stop(self) -> None:
        self._stopping = True
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
        if self.store is not None:
            if section.state_backend != self.policy.state_backend:
                raise ConfigError("policy.state_backend", "cannot change on reload; restart Warden to switch the state backend")
            if section.state_backend == "sqlite" and section.state_db != self.policy.state_db:
                raise ConfigError("policy.state_db", "cannot change on reload; restart Warden to move the state database")
            if section.state_backend == "redis":
                for name in ("redis_url", "redis_key_prefix"):
                    if getattr(section, name) != getattr(self.policy, name):
                        raise ConfigError(f"policy.{name}", "cannot change on reload; restart Warden to move the tool state")
        self.section = section
        self.policy = section
        self.judge.policy = section
        self.mode.config_default = section.read_only
        self._set_registry(registry)

    def _set_registry(self, registry: ToolRegistry) -> None:
        self.registry = registry
        self.judge.registry = registry
        if self._ctx is not None:
            served = {s.name for s in self._ctx.config.mcp.servers}
            for server in sorted(set(registry.servers) - served):
                # Fail closed (its tools are refused like any undeclared one) but say so: most likely a typo.
                log.warning("[[tools]] entries name server %r, which is not in [[mcp.servers]]: they govern nothing", server)

    @property
    def tool_policy(self) -> ToolPolicy:
        """The running policy as one object (registry, ``[policy]``, the judge's clock), for any channel."""
        return ToolPolicy(self.registry, self.policy, self.judge.clock)

    async def _load_state(self) -> None:
        store = self.store_required()
        glob, tenants = await store.load_modes()
        self.mode.global_setting = glob
        self.mode.tenants = tenants
        self.mode.loaded = True
        self.approvals_pending = await store.pending_count()

    async def _refresh_loop(self) -> None:
        """Re-read the stored mode every ``mode_refresh_s`` (other replicas change it).

        While the mode was never loaded (state backend down since start) it
        retries every second even with ``mode_refresh_s = 0``.  On failure the
        last known mode stays; the store logs an outage once.
        """
        while not self._stopping:
            if self.policy.mode_refresh_s <= 0 and self.mode.loaded:
                return
            await asyncio.sleep(self.policy.mode_refresh_s if self.policy.mode_refresh_s > 0 else 1.0)
            try:
                if self.store is None:
                    return
                if not self.mode.loaded or await self.store.changed_elsewhere():
                    await self._load_state()
                else:
                    self.approvals_pending = await self.store.pending_count()
            except StateBackendDown:
                pass
            except Exception:
                log.exception("refreshing the tool state failed; keeping the last known mode")

    def store_required(self) -> ToolStore:
        if self.store is None:
            raise ServiceUnavailable("the tool state store is not running", rule=f"policy.{self._store_key()}")
        return self.store

    def _store_key(self) -> str:
        return "state_backend" if self.policy.state_backend == "redis" else "state_db"

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
        """This exchange's tool state, kept on the exchange itself.

        Not keyed by request id: ``x-request-id`` comes from the client and
        two concurrent requests may carry the same one.
        """
        return ex.slots.setdefault(STATE_KEY, ExchangeState)

    async def on_request(self, ex: Exchange) -> None:
        """Fence offered tools; enforce the registry schemas; link tool results.

        Raises ``Forbidden`` when ``tool_choice``/``function_call`` forces a
        tool the principal may not use.
        """
        ex.max_corrections = self.policy.max_corrections
        body = ex.body
        if not isinstance(body, dict):
            return
        if "tools" in body or "functions" in body:
            n = body.get("n")
            if n is not None and n != 1:
                raise BadRequest(
                    "'n' must be 1 when tools are offered: Warden judges and corrects the tool calls of one choice only",
                    param="n",
                    rule="tools.n",
                )
            tenant = ex.principal.tenant if ex.principal is not None else None
            mode = self.mode.read_only_for(tenant)
            registry, policy, principal = self.registry, self.policy, ex.principal
            now = self.judge.clock()
            deprecated: list[str] = []

            def gate(name: str) -> tuple[str, str] | None:
                why = offer_failure(registry, policy, name, principal, mode, now)
                if why is not None:
                    tool = registry.get(name)
                    if tool is not None and tool.deprecation is not None and why[0] == f"{tool.key}.deprecated":
                        deprecated.append(tool.deprecation.header_entry(now))
                return why

            def lookup(name: str) -> tuple[dict[str, Any], str, str] | None:
                tool = registry.get(name)
                if tool is None:
                    return None
                dep = tool.deprecation
                if dep is None:
                    return tool.spec.schema, tool.spec.description, ""
                deprecated.append(dep.header_entry(now))
                return tool.spec.schema, tool.spec.description, dep.model_note()

            new_body, removed = fence_tools(body, gate, lookup)
            if deprecated:
                entries = list(dict.fromkeys(deprecated))
                ex.response_headers[DEPRECATION_HEADER] = ", ".join(entries)
                self._state(ex).deprecated_offered = entries
            if removed:
                ex.tools_withheld.update(removed)
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
        """Judge one complete tool call (see :mod:`plugins.tools.judge`): a chat function, or the
        MCP gateway's call of ``call.server``'s tool."""
        return await self.judge_call(ex, call, call.server)

    def offer_failure(self, principal: Principal | None, name: str, server: str | None = None) -> tuple[str, str] | None:
        """``(rule, why)`` when the tool ``name`` (of MCP server ``server``; ``None``: a chat function)
        may not be offered to ``principal`` now — undeclared, retired, not permitted, or a write tool
        in read-only mode — else ``None``.  What an MCP ``tools/list`` leaves out."""
        mode = self.mode.read_only_for(principal.tenant if principal is not None else None)
        return self.tool_policy.offer_failure(name, principal, mode, server)

    async def judge_call(self, ex: Exchange, call: ToolCall, server: str | None = None) -> Decision:
        """The verdict on one call of any channel: a chat function (``server`` ``None``) or MCP server
        ``server``'s tool, judged against the same ``[[tools]]`` entries, mode, limits and approvals."""
        decision = await self.judge.judge(ex, call, self._state(ex), server)
        tool = self.registry.resolve(call.name, server)
        label = tool.ref if tool is not None else "(undeclared)"
        self.decision_counts[(label, decision.kind)] += 1
        if decision.details is not None and decision.details.get("approval") == "requested":
            self.approvals_pending += 1
        return decision

    def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
        """``{"deprecated_offered": [...]}``: the deprecated versions this request offered (as in ``x-warden-deprecation``)."""
        st = ex.slots.get(STATE_KEY)
        if st is None or not st.deprecated_offered:
            return None
        return {"deprecated_offered": list(st.deprecated_offered)}

    async def on_complete(self, ex: Exchange) -> None:
        """Count the calls of deprecated versions (``warden_tool_deprecated_calls_total``).

        Read from every verdict of the exchange, including the core's refusal
        of a retired version that the request phase withheld.
        """
        for rec in ex.tool_decisions:
            tool = self.registry.resolve(rec.call.name, rec.call.server)
            if tool is None or tool.deprecation is None:
                continue
            status = "retired" if rec.decision.rule == f"{tool.key}.deprecated" else "warned"
            label = f"{tool.spec.server}/{tool.spec.name}" if tool.spec.server else tool.spec.name
            self.deprecated_calls[(label, tool.deprecation.version, status)] += 1

    def on_tool_offer(self, ex: Exchange, name: str, server: str) -> ToolOffer:
        """Whether MCP server ``server``'s tool ``name`` may be shown to this principal (see :mod:`plugins.tools.offer`)."""
        return offer(self.tool_policy, self.mode, ex.principal, name, server)

    async def on_response(self, ex: Exchange) -> None:
        """Add ``x-warden-tool-decisions`` summarising every verdict of the exchange."""
        ex.response_headers[HEADER] = decisions_header(ex)


    def metrics(self) -> dict[str, Any]:
        """Counters for the metrics exporter: decisions by (tool, kind), pending approvals."""
        return {"decisions": dict(self.decision_counts), "approvals_pending": self.approvals_pending}
